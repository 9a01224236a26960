"""Dropout: modekernels.Dropout vs torch.nn.Dropout vs torch.compile(torch.nn.Dropout).

    python benchmarks/bench_dropout.py [--device cpu|cuda] [--dtype float32 bfloat16]
                                       [--sizes 8x256x56x56 ...] [--p 0.5] [--out bench-results]

Times the training forward and forward+backward. Bytes that must move: the forward reads x and
writes y; forward+backward also reads the incoming gradient and writes the input's gradient.
Given --sizes or --dtype, every size runs in every dtype.
"""
import argparse
import functools
import itertools
import math

import torch

import common
import modekernels
from common import COMPILE, Bench, Case
from modekernels import _ops, reference

VARIANTS = ("modekernels", "torch", COMPILE)
DIRECTIONS = ("fwd", "fwd+bwd")
TENSOR_PASSES = {"fwd": 2, "fwd+bwd": 4}  # full-size tensors read or written
SIZES = ("8x256x56x56", "64x256x56x56", "7x37x59x113")
DTYPES = ("float32", "bfloat16")
# Without --sizes or --dtype: both dtypes at the common and the odd size, and the large tensor
# (where allocating the output shows) in float32 only, which keeps a 2-core CPU run near a minute.
DEFAULT = [*itertools.product(("8x256x56x56", "7x37x59x113"), DTYPES), ("64x256x56x56", "float32")]


def cases(sizes):
    """sizes: (shape, dtype) pairs."""
    return [Case("dropout", shape, dtype, direction=direction, variant=variant)
            for (shape, dtype), direction, variant in itertools.product(sizes, DIRECTIONS, VARIANTS)]


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
    return common.compiled(torch.nn.Dropout(p))


def check_mask(x, y, p, grad=None, grad_in=None):
    """Every y is x / (1 - p) or 0, kept at a rate near 1 - p; grad_in is grad under y's mask."""
    kept = y != 0
    common.assert_close(y, torch.where(kept, x.float() / (1 - p), 0.0), x.dtype, "output")
    rate = kept.sum().item() / kept.numel()
    six_sigma = 6 * math.sqrt(p * (1 - p) / kept.numel())
    assert abs(rate - (1 - p)) <= six_sigma, f"keep rate {rate:.4f}, expected {1 - p:.4f} ± {six_sigma:.4f}"
    if grad is not None:
        assert torch.equal(grad_in != 0, kept), "the gradient's mask differs from the output's"
        common.assert_close(grad_in, torch.where(kept, grad.float() / (1 - p), 0.0), x.dtype, "gradient")


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


def prepare(case, device, p):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", help=f"default: {' '.join(DTYPES)}")
    parser.add_argument("--sizes", nargs="+", help=f"shapes; default: {' '.join(SIZES)}")
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timed case")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.sizes is None and args.dtype is None:
        sizes = DEFAULT
    else:
        sizes = itertools.product(args.sizes or SIZES, args.dtype or DTYPES)
    grid = cases([(common.parse_shape(s), common.parse_dtype(d)) for s, d in sizes])
    prepare_case = functools.partial(prepare, device=device, p=args.p)
    rows = common.run(grid, prepare_case, device, args.min_run_time)
    common.report(rows, common.environment(device), args.out, f"dropout-{device.type}")


if __name__ == "__main__":
    main()
