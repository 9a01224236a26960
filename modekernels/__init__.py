"""modekernels: drop-in Dropout and BatchNorm layers on hand-written CPU and CUDA kernels."""
from . import _ops, functional, reference
from ._load import built_with
from .nn import Dropout

__all__ = ["Dropout", "built_with", "functional", "reference"]
