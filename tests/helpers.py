"""Shared parametrizations and tolerances for the test suite."""
import inspect

import pytest
import torch

cuda = pytest.mark.cuda


def _torchvision():
    try:
        import torchvision
    except Exception:  # absent, or built for another torch (its import raises RuntimeError then)
        return None
    return torchvision


# torchvision where one built for this torch is installed (pip's newest needs the newest torch).
torchvision = _torchvision()
needs_torchvision = pytest.mark.skipif(torchvision is None,
                                       reason="needs a torchvision that imports with this torch")

DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Absolute/relative tolerances for comparing with torch's own layers, per dtype.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


# BatchNorm (and the fused paths built on it) against torch: float16/bfloat16 outputs differ by
# the input dtype's rounding of values of order 1, and reductions add their own.
BN_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=8e-2, rtol=5e-2),
}


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def make_layout(x, layout):
    """x (4-D) as 'contiguous', 'channels_last', a 'strided' view, or a 'transposed' view."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.stack([x, x], dim=-1)[..., 0]  # same values, every other element in memory
    if layout == "transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(layout)


LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]


# BatchNorm's bias=False is torch >= 2.12 (pytorch/pytorch#176573); on older torch the layer is
# built with its bias and then has it removed, as that argument does.
_BN_TAKES_BIAS = "bias" in inspect.signature(torch.nn.modules.batchnorm._NormBase.__init__).parameters


def batchnorm(cls, *args, bias=True, **kwargs):
    """cls(*args, bias=bias, **kwargs) on any torch."""
    if _BN_TAKES_BIAS:
        return cls(*args, bias=bias, **kwargs)
    module = cls(*args, **kwargs)
    if not bias:
        module.register_parameter("bias", None)
    return module
