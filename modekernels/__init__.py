"""modekernels: drop-in Dropout and BatchNorm layers on hand-written CPU and CUDA kernels."""
from . import _ops, functional, reference
from ._ops import decompositions
from ._load import built_with
from .distributed import SyncBatchNorm
from .models import (FusedReLU, ModeError, ModeReport, check_modes, convert, evaluating,
                     freeze_batchnorm, modes, revert, training, unfreeze_batchnorm)
from .nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAddReLU1d, BatchNormAddReLU2d,
                 BatchNormAddReLU3d, BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d,
                 BiasDropoutAdd, Dropout, Dropout1d, Dropout2d, Dropout3d, DropoutAdd,
                 LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d)
from .precise import precise_batchnorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAddReLU1d", "BatchNormAddReLU2d",
    "BatchNormAddReLU3d", "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
    "BiasDropoutAdd", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "DropoutAdd", "FusedReLU",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "ModeError", "ModeReport",
    "SyncBatchNorm", "built_with", "check_modes", "convert", "decompositions", "evaluating",
    "freeze_batchnorm", "functional", "modes", "precise_batchnorm", "reference", "revert",
    "training", "unfreeze_batchnorm",
]
