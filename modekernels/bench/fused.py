"""Fused suite: fused variants against the unfused torch sequence they replace, eager and compiled.

Cases: BatchNorm2d+ReLU, BatchNorm2d+add+ReLU and Dropout2d on an NCHW activation, contiguous and
channels_last, dropout+residual and bias+dropout+residual on a (batch, tokens, width) transformer
activation; training forward+backward, and the eval forward of all but Dropout2d (the identity in
eval). Bytes that must move count the full-size tensors each pass reads or writes at the least
(TENSOR_PASSES).
"""
import functools
import itertools

import torch
from torch.nn import functional as F

import modekernels

from . import harness
from .batch_norm import LAYOUTS, to_layout
from .harness import COMPILE, Bench, Case

P = 0.1
VARIANTS = ("modekernels", "torch", COMPILE)
DIRECTIONS = ("fwd", "fwd+bwd")
# Shapes per size: an NCHW activation for the BatchNorm and channel-wise ops, a (batch, tokens,
# width) transformer activation for the residual ones.
ACTIVATIONS = {"tiny": ((2, 8, 6, 6),), "quick": ((8, 256, 56, 56),),
               "full": ((8, 256, 56, 56), (32, 256, 56, 56))}
TOKENS = {"tiny": ((2, 8, 32),), "quick": ((8, 512, 1024),),
          "full": ((16, 512, 1024), (32, 1024, 1024))}
SHAPES = {"bn_relu": ACTIVATIONS, "bn_add_relu": ACTIVATIONS, "dropout_add": TOKENS,
          "bias_dropout_add": TOKENS, "dropout2d": ACTIVATIONS}
# Full-size tensors read or written: (forward, forward+backward), in either mode. BatchNorm+ReLU:
# x, y; then dy, x, dx (the ReLU's gate is recomputed from x). BatchNorm+add+ReLU: x, residual, y;
# then dy, x, y (the gate), dx and the residual's gradient. The dropout sums' residual gradient is
# grad_output itself (no pass).
TENSOR_PASSES = {"bn_relu": (2, 5), "bn_add_relu": (3, 8), "dropout_add": (3, 5),
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
        return residual + F.dropout(x if bias is None else x + bias, P, self.training)


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
    return harness.compiled(module) if variant == COMPILE else module


@functools.lru_cache(maxsize=1)
def inputs(shape, dtype, device):
    gen = torch.Generator().manual_seed(0)
    x, residual, grad = ((torch.rand(shape, generator=gen) + 0.5).to(device, dtype) for _ in range(3))
    bias = torch.rand(shape[-1], generator=gen).to(device, dtype)
    return x, residual, bias, grad


def call(op, variant, module, x, residual, bias):
    if op == "bn_add_relu" or op == "dropout_add":
        return module(x, residual)
    if op == "bias_dropout_add":
        return module(x, bias, residual) if variant == "modekernels" else module(x, residual, bias)
    return module(x)


def check(op, training, x, residual, bias, y):
    """BatchNorm outputs against torch's sequence; dropout outputs element by element."""
    if op.startswith("bn"):
        reference = layer(op, "torch", x.shape[1]).to(x.device, torch.float64).train(training)
        expected = call(op, "torch", reference, x.double(), residual.double(), bias.double())
        harness.assert_close(y, expected, x.dtype, op)
        return
    base = {"dropout_add": x, "bias_dropout_add": x + bias, "dropout2d": x}[op].double()
    dropped = y.double() - (residual.double() if op != "dropout2d" else 0)
    if not training:
        harness.assert_close(dropped, base, x.dtype, op)
        return
    kept = (dropped - base / (1 - P)).abs() <= (dropped - 0).abs()
    harness.assert_close(dropped, torch.where(kept, base / (1 - P), 0.0), x.dtype, op)


def prepare(case, device):
    x, residual, bias, grad = inputs(case.shape, case.dtype, device)
    x, residual, grad = (to_layout(t, case.layout) for t in (x, residual, grad))
    # BatchNorm parameters stay float32 for bfloat16 inputs, as in mixed-precision training.
    module = layer(case.op, case.variant, x.shape[1]).to(device, harness.param_dtype(case.dtype))
    module.train(case.mode == "train")
    # fwd+bwd differentiates with respect to the activation and, where there is one, the residual
    # (in a ResNet block or a transformer layer both need their gradient).
    xr = x.detach().requires_grad_()
    rr = residual.detach().requires_grad_()
    wrt = (xr, rr) if case.op in ("bn_add_relu", "dropout_add", "bias_dropout_add") else (xr,)
    passes = TENSOR_PASSES[case.op][DIRECTIONS.index(case.direction)]

    def verify():
        check(case.op, module.training, x, residual, bias,
              call(case.op, case.variant, module, x, residual, bias))

    if case.direction == "fwd":
        return Bench(lambda: call(case.op, case.variant, module, x, residual, bias), verify,
                     passes * x.nbytes, output_bytes=x.nbytes)
    return Bench(lambda: torch.autograd.grad(call(case.op, case.variant, module, xr, rr, bias), wrt, grad),
                 verify, passes * x.nbytes, forward=lambda: call(case.op, case.variant, module, xr, rr, bias))


def cases(size, dtypes):
    """Each fused op at the size's shapes (the NCHW activation's in both layouts): training
    forward+backward (and the forward alone with full), and the eval forward of the ops that
    compute something in eval."""
    directions = DIRECTIONS if size == "full" else DIRECTIONS[1:]
    modes = [("train", d) for d in directions]
    return [Case(op, shape, dtype, layout, mode, direction, variant)
            for op, shapes in SHAPES.items() for shape in shapes[size]
            for layout in (LAYOUTS if len(shape) == 4 else LAYOUTS[:1])
            for (mode, direction), dtype, variant in itertools.product(
                modes + ([("eval", "fwd")] if op != "dropout2d" else []), dtypes, VARIANTS)]
