"""Typed wrappers over torch.ops.modekernels, with their fake kernels and autograd formulas.

The schemas live in csrc/ops.cpp; importing this module loads the extension that registers them.
"""
import torch

from ._load import load_extension

load_extension()
_ops = torch.ops.modekernels


def _in_layout(t, stride):
    """t with exactly the given strides (copied only if it has others)."""
    if t.stride() == stride:
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


# ----------------------------------------------------------------------------------- dropout
# The mask is laid over the memory order of the forward output and rebuilt from its 16-byte
# rng_state, so a backward first puts the incoming gradient in the output's strides.

def dropout(input, p, generator=None):
    """(output, rng_state): output = input * mask / (1 - p), always in training mode."""
    return _ops.dropout.default(input, p, generator)


def dropout_(input, p, generator=None):
    """In-place dropout; returns input. Differentiable through an autograd.Function."""
    return _DropoutInplace.apply(input, p, generator)


def dropout_backward(grad_output, rng_state, p, stride=None):
    """grad_output * mask / (1 - p) with the mask of rng_state, laid over `stride`."""
    if stride is not None:
        grad_output = _in_layout(grad_output, stride)
    return _ops.dropout_backward.default(grad_output, rng_state, p)


@torch.library.register_fake("modekernels::dropout")
def _(input, p, generator=None):
    return torch.empty_like(input), input.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("modekernels::dropout_")
def _(input, p, generator=None):
    return input.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("modekernels::dropout_backward")
def _(grad_output, rng_state, p):
    return torch.empty_like(grad_output)


def _save_mask(ctx, p, rng_state, out):
    ctx.p = p
    ctx.stride = out.stride()
    ctx.save_for_backward(rng_state)


def _apply_saved_mask(ctx, grad):
    (rng_state,) = ctx.saved_tensors
    return dropout_backward(grad, rng_state, ctx.p, ctx.stride)


def _dropout_setup(ctx, inputs, output):
    out, rng_state = output
    _save_mask(ctx, inputs[1], rng_state, out)


def _dropout_grad(ctx, grad_out, _grad_state):
    return _apply_saved_mask(ctx, grad_out), None, None


def _dropout_backward_setup(ctx, inputs, output):
    _, rng_state, p = inputs
    _save_mask(ctx, p, rng_state, output)


def _dropout_backward_grad(ctx, grad):
    # dropout_backward is linear in grad_output: its own gradient applies the same mask again.
    return _apply_saved_mask(ctx, grad), None, None


torch.library.register_autograd("modekernels::dropout", _dropout_grad, setup_context=_dropout_setup)
torch.library.register_autograd("modekernels::dropout_backward", _dropout_backward_grad,
                                setup_context=_dropout_backward_setup)


class _DropoutInplace(torch.autograd.Function):
    # register_autograd takes only functional schemas, so the mutating op gets a Function.
    @staticmethod
    def forward(ctx, input, p, generator):
        rng_state = _ops.dropout_.default(input, p, generator)
        ctx.mark_dirty(input)
        _save_mask(ctx, p, rng_state, input)
        return input

    @staticmethod
    def backward(ctx, grad):
        return _apply_saved_mask(ctx, grad), None, None
