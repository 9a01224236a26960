"""Fused variants against the unfused torch sequence they replace, eager and torch.compile'd.

    python benchmarks/bench_fused.py [--device cpu|cuda] [--dtype float32 bfloat16] [--out bench-results]

Cases (training mode): BatchNorm2d+ReLU and BatchNorm2d+add+ReLU on 8x256x56x56, dropout+residual
and bias+dropout+residual on a 16x512x1024 transformer activation, and Dropout2d. Bytes that
must move count the full-size tensors each pass reads or writes at the least (TENSOR_PASSES).
"""
import argparse
import functools
import itertools

import torch
from torch.nn import functional as F

import common
import modekernels
from common import COMPILE, Bench, Case

P = 0.1
VARIANTS = ("modekernels", "torch", COMPILE)
DIRECTIONS = ("fwd", "fwd+bwd")
SHAPES = {"bn_relu": (8, 256, 56, 56), "bn_add_relu": (8, 256, 56, 56), "dropout_add": (16, 512, 1024),
          "bias_dropout_add": (16, 512, 1024), "dropout2d": (8, 256, 56, 56)}
# Full-size tensors read or written: (forward, forward+backward).
TENSOR_PASSES = {"bn_relu": (2, 6), "bn_add_relu": (3, 8), "dropout_add": (3, 5),
                 "bias_dropout_add": (3, 5), "dropout2d": (2, 4)}


class TorchBNReLU(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels)

    def forward(self, x, residual=None):
        y = self.bn(x)
        return torch.relu(y if residual is None else y + residual)


class TorchDropoutAdd(torch.nn.Module):
    def forward(self, x, residual, bias=None):
        return residual + F.dropout(x if bias is None else x + bias, P)


def layer(op, variant, channels):
    if variant == "modekernels":
        return {"bn_relu": lambda: modekernels.BatchNormReLU2d(channels),
                "bn_add_relu": lambda: modekernels.BatchNormAddReLU2d(channels),
                "dropout_add": lambda: modekernels.DropoutAdd(P),
                "bias_dropout_add": lambda: modekernels.BiasDropoutAdd(P),
                "dropout2d": lambda: modekernels.Dropout2d(P)}[op]()
    module = {"bn_relu": lambda: TorchBNReLU(channels), "bn_add_relu": lambda: TorchBNReLU(channels),
              "dropout_add": TorchDropoutAdd, "bias_dropout_add": TorchDropoutAdd,
              "dropout2d": lambda: torch.nn.Dropout2d(P)}[op]()
    return common.compiled(module) if variant == COMPILE else module


@functools.lru_cache(maxsize=1)
def inputs(op, dtype, device):
    gen = torch.Generator().manual_seed(0)
    shape = SHAPES[op]
    x, residual, grad = ((torch.rand(shape, generator=gen) + 0.5).to(device, dtype) for _ in range(3))
    bias = torch.rand(shape[-1], generator=gen).to(device, dtype)
    return x, residual, bias, grad


def call(op, variant, module, x, residual, bias):
    if op == "bn_add_relu" or op == "dropout_add":
        return module(x, residual)
    if op == "bias_dropout_add":
        return module(x, bias, residual) if variant == "modekernels" else module(x, residual, bias)
    return module(x)


def check(op, x, residual, bias, y):
    """BatchNorm outputs against torch's sequence; dropout outputs element by element."""
    if op.startswith("bn"):
        expected = call(op, "torch", layer(op, "torch", x.shape[1]).to(x.device, torch.float64),
                        x.double(), residual.double(), bias.double())
        common.assert_close(y, expected, x.dtype, op)
        return
    base = {"dropout_add": x, "bias_dropout_add": x + bias, "dropout2d": x}[op].float()
    dropped = y.float() - (residual.float() if op != "dropout2d" else 0)
    kept = (dropped - base / (1 - P)).abs() <= (dropped - 0).abs()
    common.assert_close(dropped, torch.where(kept, base / (1 - P), 0.0), x.dtype, op)


def prepare(case, device):
    x, residual, bias, grad = inputs(case.op, case.dtype, device)
    module = layer(case.op, case.variant, x.shape[1]).to(device)
    if case.op.startswith("bn"):
        module = module.to(device)  # parameters in float32 even for bfloat16 inputs, as in training
    xr = x.detach().requires_grad_()
    passes = TENSOR_PASSES[case.op][DIRECTIONS.index(case.direction)]

    def verify():
        check(case.op, x, residual, bias, call(case.op, case.variant, module, x, residual, bias))

    if case.direction == "fwd":
        return Bench(lambda: call(case.op, case.variant, module, x, residual, bias), verify,
                     passes * x.nbytes, output_bytes=x.nbytes)
    return Bench(lambda: torch.autograd.grad(call(case.op, case.variant, module, xr, residual, bias), xr, grad),
                 verify, passes * x.nbytes, forward=lambda: call(case.op, case.variant, module, xr, residual, bias))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument("--ops", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timed case")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    grid = [Case(op, SHAPES[op], common.parse_dtype(dtype), direction=direction, variant=variant)
            for op, dtype, direction, variant in itertools.product(args.ops, args.dtype, DIRECTIONS, VARIANTS)]
    rows = common.run(grid, functools.partial(prepare, device=device), device, args.min_run_time)
    common.report(rows, common.environment(device), args.out, f"fused-{device.type}")


if __name__ == "__main__":
    main()
