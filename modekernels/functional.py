"""The functional API: the same signatures and semantics as torch.nn.functional."""
from . import _ops


def dropout(input, p=0.5, training=True, inplace=False, generator=None):
    """torch.nn.functional.dropout on modekernels' fused kernels.

    In eval mode, with p == 0, or for an empty tensor, `input` itself is returned. `generator`
    (a torch.Generator on input's device) makes the mask reproducible independently of the global
    seed.
    """
    if not 0.0 <= p <= 1.0:  # NaN included
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if inplace:
        return _ops.dropout_(input, p, generator)
    return _ops.dropout(input, p, generator)[0]
