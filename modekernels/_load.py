"""Loads the compiled extension, explaining a mismatch between build and runtime torch."""
import importlib

import torch


def _built_with():
    try:
        from ._build_info import BUILT_WITH
    except ImportError:
        return None
    return BUILT_WITH


def load_extension():
    try:
        return importlib.import_module("modekernels._C")
    except ImportError as exc:
        built = _built_with()
        if built is None:
            raise ImportError(
                "modekernels' C++/CUDA extension is not built: run "
                "`pip install -e . --no-build-isolation` in the source tree") from exc
        raise ImportError(
            f"modekernels._C failed to load ({exc}). It was built for torch {built['torch']} / "
            f"CUDA {built['cuda']}, and this is torch {torch.__version__} / CUDA {torch.version.cuda}: "
            "rebuild with `pip install -e . --no-build-isolation`") from exc


def built_with():
    """What the loaded extension was compiled against: torch, CUDA (None for CPU-only), archs."""
    return _built_with()
