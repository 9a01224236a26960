"""Dropout suite: modekernels.Dropout vs torch.nn.Dropout vs torch.compile(torch.nn.Dropout).

Times the training forward and forward+backward. Bytes that must move: the forward reads x and
writes y; forward+backward also reads the incoming gradient and writes the input's gradient.
"""
import functools
import itertools
import math

import torch

import modekernels
from modekernels import _ops, reference

from . import harness
from .harness import COMPILE, Bench, Case

P = 0.5
VARIANTS = ("modekernels", "torch", COMPILE)
DIRECTIONS = ("fwd", "fwd+bwd")
TENSOR_PASSES = {"fwd": 2, "fwd+bwd": 4}  # full-size tensors read or written
# Quick: a cache-sized, a common and an odd activation; full adds large ones (where allocating
# the output shows).
QUICK = ((1, 64, 56, 56), (8, 256, 56, 56), (7, 37, 59, 113))
SHAPES = {"tiny": ((2, 8, 6, 6), (3, 5, 7)), "quick": QUICK,
          "full": QUICK + ((32, 256, 56, 56), (64, 256, 56, 56))}


def cases(size, dtypes):
    grid = itertools.product(SHAPES[size], dtypes, DIRECTIONS, VARIANTS)
    return [Case("dropout", shape, dtype, direction=direction, variant=variant)
            for shape, dtype, direction, variant in grid]


@functools.lru_cache(maxsize=1)
def inputs(shape, dtype, device):
    """(x, incoming gradient), the same for every variant of a size.

    Drawn from [0.5, 1.5): with no zeros, a zero in an output can only be a dropped element.
    """
    gen = torch.Generator().manual_seed(0)
    return tuple((torch.rand(shape, generator=gen) + 0.5).to(device, dtype) for _ in range(2))


def layer(variant, p):
    if variant == "modekernels":
        return modekernels.Dropout(p)
    if variant == "torch":
        return torch.nn.Dropout(p)
    return harness.compiled(torch.nn.Dropout(p))


def check_mask(x, y, p, grad=None, grad_in=None):
    """Every y is x / (1 - p) or 0, kept at a rate near 1 - p; grad_in is grad under y's mask."""
    kept = y != 0
    harness.assert_close(y, torch.where(kept, x.double() / (1 - p), 0.0), x.dtype, "output")
    rate = kept.sum().item() / kept.numel()
    six_sigma = 6 * math.sqrt(p * (1 - p) / kept.numel())
    assert abs(rate - (1 - p)) <= six_sigma, f"keep rate {rate:.4f}, expected {1 - p:.4f} ± {six_sigma:.4f}"
    if grad is not None:
        assert torch.equal(grad_in != 0, kept), "the gradient's mask differs from the output's"
        harness.assert_close(grad_in, torch.where(kept, grad.double() / (1 - p), 0.0), x.dtype, "gradient")


@functools.lru_cache
def check_exact(shape, dtype, device, p):
    """modekernels' forward and backward equal the reference for the rng_state they return."""
    x, _ = inputs(shape, dtype, device)
    assert modekernels.Dropout(p).eval()(x) is x, "eval mode must return the input"
    xr = x.detach().requires_grad_()
    y, rng_state = _ops.dropout(xr, p)
    expected = reference.dropout(x, p, rng_state)
    assert torch.equal(y, expected), "forward differs from modekernels.reference.dropout"
    # With x itself as the incoming gradient, the backward's mask and scale must give y again.
    (grad_in,) = torch.autograd.grad(y, xr, x)
    assert torch.equal(grad_in, expected), "backward differs from modekernels.reference.dropout"


def prepare(case, device, p=P):
    x, grad = inputs(case.shape, case.dtype, device)
    xr = x.detach().requires_grad_()
    drop = layer(case.variant, p)
    nbytes = TENSOR_PASSES[case.direction] * x.nbytes

    def verify():
        if case.variant == "modekernels":
            check_exact(case.shape, case.dtype, device, p)
        if case.direction == "fwd":
            check_mask(x, drop(x), p)
        else:
            y = drop(xr)
            check_mask(x, y, p, grad, *torch.autograd.grad(y, xr, grad))

    if case.direction == "fwd":
        return Bench(lambda: drop(x), verify, nbytes, output_bytes=x.nbytes)
    return Bench(lambda: torch.autograd.grad(drop(xr), xr, grad), verify, nbytes,
                 forward=lambda: drop(xr))
