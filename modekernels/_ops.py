"""Typed wrappers over torch.ops.modekernels, with their fake kernels, vmap rules, the in-place
dropouts' autograd and the BatchNorm double backward.

The schemas live in csrc/ops.cpp and the other ops' autograd in csrc/*/*_autograd.cpp (C++, for
its per-call cost); importing this module loads the extension that registers them.
"""
import torch
import torch.autograd.forward_ad as fwAD

from ._load import load_extension

load_extension()
_ops = torch.ops.modekernels


def _in_layout(t, stride):
    """t with exactly the given strides (copied only if it has others)."""
    if t.stride() == stride:
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def _check_devices(family, reference, like, **tensors):
    """The kernels' device check (csrc), for the fake kernels, which a meta or fake input reaches
    even beside real tensors on another device: each of `tensors` on reference's device."""
    if reference is None:  # a required tensor given as None, as the kernels' checks report it
        raise TypeError(f"modekernels {family}: expected {like} to be a Tensor, but got None")
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise RuntimeError(f"modekernels {family}: expected {name} on {reference.device} like "
                               f"{like}, but got {t.device}")


def _check_like(family, input, name, t):
    """The kernels' check of a tensor that must be like input (a residual), for the fake kernels."""
    torch._check(t.shape == input.shape and t.dtype == input.dtype, lambda: (
        f"modekernels {family}: expected {name} like input ({list(input.shape)}, {input.dtype}, "
        f"{input.device}), but got {list(t.shape)}, {t.dtype}, {t.device}"))


def _check_channels(input, **tensors):
    """The kernels' check of the per-channel tensors' shape, (C,), with torch's message, for the
    fake kernels: under torch.compile a wrong one would otherwise surface as autograd's "invalid
    gradient" when the graph is built."""
    C = input.shape[1]
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.numel() == C, lambda: f"{name} should contain {C} elements not {t.numel()}")
            torch._check(t.dim() == 1, lambda: f"modekernels batch_norm: expected {name} to be 1-D, "
                                               f"but got shape {list(t.shape)}")


# Forward-mode AD (torch.autograd.forward_ad): the ops' C++ autograd kernels carry tangents
# (csrc/common/autograd.h). Here only the in-place dropouts, whose Python Function has no
# forward-mode formula, and the BatchNorm backward op, whose autograd is the Python double
# backward below, handle them. Outside a dual level that costs one integer comparison.

def _split_duals(*tensors):
    """(primals, tangents) of tensors (None entries kept), or (tensors, None) if none has a
    tangent."""
    if fwAD._current_level < 0:
        return tensors, None
    pairs = [(None, None) if t is None else fwAD.unpack_dual(t) for t in tensors]
    if all(tangent is None for _, tangent in pairs):
        return tensors, None
    return tuple(primal for primal, _ in pairs), tuple(tangent for _, tangent in pairs)


# ----------------------------------------------------------------------------------- dropout
# An elementwise mask is laid over the memory order of the forward output and rebuilt from its
# 16-byte rng_state, so its backward first puts the incoming gradient in the output's strides. A
# channel-wise (feature) mask belongs to the (n, c) indices and needs no such care.

def dropout(input, p, generator=None):
    """(output, rng_state): output = input * mask / (1 - p), always in training mode."""
    return _ops.dropout.default(input, p, generator)


def _copied_back(input):
    """Whether an in-place dropout runs out of place and is copied into input, which autograd
    and torch's transforms record as torch's copy_, instead of through _DropoutInplace: under
    torch.func's transforms (vmap, grad, jacrev, ...) and forward-mode AD, which that Function
    does not support; and while torch.compile traces, which drops its mark_dirty
    (pytorch/pytorch#133491; torch 2.14 still): an input from outside the graph would then get
    its gradient without the mask."""
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or _split_duals(input)[1] is not None)


def _check_writable(input, recorded):
    """The errors torch gives an in-place op on a leaf that requires grad (or a view of one) and
    on an inference tensor outside inference mode, before the kernel writes: autograd raises the
    first only after the op has run, and the mask would already be in input. Not while
    torch.compile traces: it traces no view bases, and checks its graph inputs itself."""
    if torch.compiler.is_compiling():
        return
    if recorded:
        if input.is_leaf:
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place "
                               "operation.")
        if input._is_view() and input._base.is_leaf:
            raise RuntimeError("a view of a leaf Variable that requires grad is being used in an "
                               "in-place operation.")
    if input.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not "
                           "allowed.You can make a clone to get a normal tensor before doing "
                           "inplace update.See https://github.com/pytorch/rfcs/pull/17 for more "
                           "details.")


def _inplace(input, p, generator, feature):
    """In-place dropout; returns input itself, as torch's does. Through _DropoutInplace where
    autograd records the op, copied back where that Function cannot run (_copied_back), else the
    bare op (a Function would return a detached alias of input under no_grad)."""
    recorded = input.requires_grad and torch.is_grad_enabled()
    _check_writable(input, recorded)
    if _copied_back(input):
        return input.copy_((feature_dropout if feature else dropout)(input, p, generator)[0])
    if recorded:
        return _DropoutInplace.apply(input, p, generator, feature)
    (_ops.feature_dropout_ if feature else _ops.dropout_).default(input, p, generator)
    return input


def dropout_(input, p, generator=None):
    """In-place dropout; returns input (_inplace)."""
    return _inplace(input, p, generator, False)


def dropout_add(input, residual, p, generator=None):
    """(residual + dropout(input), rng_state) in one pass."""
    return _ops.dropout_add.default(input, residual, p, generator)


def bias_dropout_add(input, bias, residual, p, generator=None):
    """(residual + dropout(input + bias), rng_state) in one pass; bias over the last dimension."""
    return _ops.bias_dropout_add.default(input, bias, residual, p, generator)


def feature_dropout(input, p, generator=None):
    """(output, rng_state): one mask per (n, c) of an (N, C, *) input."""
    return _ops.feature_dropout.default(input, p, generator)


def feature_dropout_(input, p, generator=None):
    """In-place channel-wise dropout; returns input."""
    return _inplace(input, p, generator, True)


def dropout_backward(grad_output, rng_state, p, stride=None):
    """grad_output * mask / (1 - p) with the mask of rng_state, laid over `stride`."""
    if stride is not None:
        grad_output = _in_layout(grad_output, stride)
    return _ops.dropout_backward.default(grad_output, rng_state, p)


def _state_fake(input):
    return input.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("modekernels::dropout")
def _(input, p, generator=None):
    return torch.empty_like(input), _state_fake(input)


@torch.library.register_fake("modekernels::dropout_")
def _(input, p, generator=None):
    return _state_fake(input)


def _sum_fake(residual, input):
    """The output of residual + dropout(input) in torch's layout (dropout.cpp's sum_layout)."""
    if torch._prims_common.is_non_overlapping_and_dense_or_false(residual):
        return torch.empty_like(residual)
    return torch.empty_like(residual + torch.empty_like(input))


@torch.library.register_fake("modekernels::dropout_add")
def _(input, residual, p, generator=None):
    _check_devices("dropout", input, "input", residual=residual)
    _check_like("dropout", input, "residual", residual)
    return _sum_fake(residual, input), _state_fake(input)


@torch.library.register_fake("modekernels::bias_dropout_add")
def _(input, bias, residual, p, generator=None):
    _check_devices("dropout", input, "input", bias=bias, residual=residual)
    _check_like("dropout", input, "residual", residual)
    last = input.shape[-1] if input.dim() else 0
    torch._check(input.dim() >= 1 and bias.shape == (last,) and bias.dtype == input.dtype, lambda: (
        f"modekernels bias_dropout_add: expected bias of shape ({last},) like input's last "
        f"dimension, dtype and device, but got {list(bias.shape)}, {bias.dtype}, {bias.device}"))
    return _sum_fake(residual, input), _state_fake(input)


def _check_feature_input(input):
    torch._check(input.dim() >= 2,
                 lambda: "Feature dropout requires at least 2 dimensions in the input")


@torch.library.register_fake("modekernels::feature_dropout")
def _(input, p, generator=None):
    _check_feature_input(input)
    return torch.empty_like(input), _state_fake(input)


@torch.library.register_fake("modekernels::feature_dropout_")
def _(input, p, generator=None):
    _check_feature_input(input)
    return _state_fake(input)


@torch.library.register_fake("modekernels::dropout_backward")
def _(grad_output, rng_state, p):
    _check_devices("dropout", grad_output, "grad_output", rng_state=rng_state)
    return torch.empty_like(grad_output)


@torch.library.register_fake("modekernels::feature_dropout_backward")
def _(grad_output, rng_state, p):
    _check_devices("dropout", grad_output, "grad_output", rng_state=rng_state)
    return torch.empty_like(grad_output)


def _mask(grad, rng_state, p, stride, feature):
    """grad through the mask of rng_state, as the forward output of those strides had it. A
    tangent on grad goes through the same mask (the backward ops' kernels carry it)."""
    if p == 0:  # every element was kept with factor 1 (the fused ops' eval sums)
        return grad
    if feature:
        return _ops.feature_dropout_backward.default(grad, rng_state, p)
    return dropout_backward(grad, rng_state, p, stride)


class _DropoutInplace(torch.autograd.Function):
    # The mutating ops' autograd: forward(input, p, generator, feature) -> input. It returns the
    # changed input alone, which autograd requires where input is a view, and keeps the
    # rng_state for the backward as an intermediate. The op writes through input.data, whose
    # version counter is its own, so that input's counts the write once, by mark_dirty, as torch's
    # in-place ops count theirs. In Python, not C++ as the other ops' autograd: compiled
    # autograd refuses a C++ Function that marks an input dirty.
    @staticmethod
    def forward(ctx, input, p, generator, feature):
        op = _ops.feature_dropout_ if feature else _ops.dropout_
        rng_state = op.default(input.data, p, generator)
        ctx.mark_dirty(input)
        ctx.p, ctx.feature, ctx.stride = p, feature, input.stride()
        ctx.save_for_backward(rng_state)
        return input

    @staticmethod
    def backward(ctx, grad):
        return _mask(grad, ctx.saved_tensors[0], ctx.p, ctx.stride, ctx.feature), None, None, None


# vmap: the randomness modes of torch.vmap, as torch's own random ops follow them. "error" raises;
# "different" gives every sample a mask of its own: the op runs once over the whole batch;
# "same" gives every sample one mask, drawn for a sample's shape and applied by torch ops. A
# batched bias is also applied by torch ops. Every op at p == 1, and the fused ops at p == 0
# (their eval sums), draw nothing and run in every mode.

def _check_randomness(info, p):
    if 0 < p < 1 and info.randomness == "error":
        raise RuntimeError("vmap: called random operation while in randomness error mode. Please "
                           "either use the 'same' or 'different' randomness flags on vmap or "
                           "perform the randomness operation out of vmap")


def _batch_first(t, bdim, size):
    return t.expand(size, *t.shape) if bdim is None else t.movedim(bdim, 0)


def _composed_dropout(x, p, generator, mask_shape, feature=False, bias=None, residual=None):
    """((x + bias) * mask / (1 - p) + residual, rng_state) by torch ops in the opmath dtype; the
    mask (of mask_shape, broadcast over x) comes from one call of the op."""
    ones = x.new_ones(mask_shape, dtype=_opmath(x.dtype))
    multiplier, rng_state = (feature_dropout if feature else dropout)(ones, p, generator)
    y = x.to(ones.dtype)
    if bias is not None:
        y = y + bias.to(ones.dtype)
    y = y * multiplier
    if residual is not None:
        y = y + residual.to(ones.dtype)
    return (y.to(x.dtype), rng_state), (0, None)


def _dropout_vmap(info, in_dims, input, p, generator=None):
    _check_randomness(info, p)
    x = input.movedim(in_dims[0], 0)
    if info.randomness == "same":
        return _composed_dropout(x, p, generator, x.shape[1:])
    return dropout(x, p, generator), (0, None)


def _feature_dropout_vmap(info, in_dims, input, p, generator=None):
    _check_randomness(info, p)
    x = input.movedim(in_dims[0], 0)  # (B, N, C, *): one mask per (b, n, c) or per (n, c)
    if info.randomness == "same":
        return _composed_dropout(x, p, generator, (*x.shape[1:3], *[1] * (x.dim() - 3)), True)
    out, rng_state = feature_dropout(x.flatten(0, 1), p, generator)
    return (out.unflatten(0, x.shape[:2]), rng_state), (0, None)


def _dropout_add_vmap(info, in_dims, input, residual, p, generator=None):
    _check_randomness(info, p)
    x, r = (_batch_first(t, d, info.batch_size) for t, d in zip((input, residual), in_dims))
    if info.randomness == "same" and p > 0:
        return _composed_dropout(x, p, generator, x.shape[1:], residual=r)
    return dropout_add(x, r, p, generator), (0, None)


def _bias_dropout_add_vmap(info, in_dims, input, bias, residual, p, generator=None):
    _check_randomness(info, p)
    x = _batch_first(input, in_dims[0], info.batch_size)
    r = _batch_first(residual, in_dims[2], info.batch_size)
    if in_dims[1] is not None:  # a bias per sample, broadcast over each sample's rows
        b = bias.movedim(in_dims[1], 0).reshape(info.batch_size, *[1] * (x.dim() - 2), -1)
        shape = x.shape[1:] if info.randomness == "same" else x.shape
        return _composed_dropout(x, p, generator, shape, bias=b, residual=r)
    if info.randomness == "same" and p > 0:
        return _composed_dropout(x, p, generator, x.shape[1:], bias=bias, residual=r)
    return bias_dropout_add(x, bias, r, p, generator), (0, None)


for _name, _rule in [("dropout", _dropout_vmap), ("feature_dropout", _feature_dropout_vmap),
                     ("dropout_add", _dropout_add_vmap),
                     ("bias_dropout_add", _bias_dropout_add_vmap)]:
    torch.library.register_vmap(f"modekernels::{_name}", _rule)


# -------------------------------------------------------------------------------- batch norm
# batch_norm_train and batch_norm_eval are functional and differentiable; the running statistics
# are updated by the separate mutating op batch_norm_update_stats_, which autograd never sees.

def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels_format(input):
    """The outputs' memory format, as batch_norm.cpp's kernel_format chooses it."""
    if input.dim() == 2:
        return torch.contiguous_format
    if input.device.type == "cpu":
        for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
            if input.is_contiguous(memory_format=fmt):
                return fmt
    return torch._prims_common.suggest_memory_format(input)


def _grad_input_format(grad_output, input):
    """grad_input's memory format, as batch_norm.cpp's grad_input_format chooses it."""
    fmt = _channels_format(input)
    if input.device.type != "cpu" or input.dim() == 2:
        return fmt
    suggest = torch._prims_common.suggest_memory_format
    alike = (input.is_contiguous(memory_format=fmt)
             and grad_output.is_contiguous(memory_format=_channels_format(grad_output))
             and suggest(input) == suggest(grad_output))
    return fmt if alike else suggest(input)


def _channel_stats_fake(input):
    torch._check(input.dim() >= 2)
    stats = input.new_empty((input.shape[1],), dtype=_opmath(input.dtype))
    return stats, torch.empty_like(stats)


def batch_norm_train(input, weight, bias, eps, residual=None, relu=False):
    """(output, mean, biased var) with the batch statistics; mean/var in the opmath dtype.

    output = relu?(batch_norm(input) + residual?) in one pass.
    """
    return _ops.batch_norm_train.default(input, weight, bias, eps, residual, relu)


def batch_norm_eval(input, running_mean, running_var, weight, bias, eps, residual=None, relu=False):
    """relu?(batch_norm(input) + residual?) with the given (running) statistics."""
    return _ops.batch_norm_eval.default(input, running_mean, running_var, weight, bias, eps,
                                        residual, relu)


def batch_norm_update_stats_(running_mean, running_var, mean, var, count, momentum,
                             num_batches_tracked=None):
    _ops.batch_norm_update_stats_.default(running_mean, running_var, mean, var, count, momentum,
                                          num_batches_tracked)


@torch.library.register_fake("modekernels::batch_norm_train")
def _(input, weight, bias, eps, residual=None, relu=False):
    _check_devices("batch_norm", input, "input", weight=weight, bias=bias, residual=residual)
    _check_channels(input, weight=weight, bias=bias)
    if residual is not None:
        _check_like("batch_norm", input, "residual", residual)
    mean, var = _channel_stats_fake(input)
    return torch.empty_like(input, memory_format=_channels_format(input)), mean, var


@torch.library.register_fake("modekernels::batch_norm_eval")
def _(input, running_mean, running_var, weight, bias, eps, residual=None, relu=False):
    _check_devices("batch_norm", input, "input", running_mean=running_mean, running_var=running_var,
                   weight=weight, bias=bias, residual=residual)
    _check_channels(input, weight=weight, bias=bias, running_mean=running_mean,
                    running_var=running_var)
    if residual is not None:
        _check_like("batch_norm", input, "residual", residual)
    return torch.empty_like(input, memory_format=_channels_format(input))


def batch_norm_stats(input):
    """Per-channel (mean, biased var) of this batch, in the opmath dtype."""
    return _ops.batch_norm_stats.default(input)


def batch_norm_grad_sums(grad_output, input, mean):
    """Per-channel (sum(dy), sum(dy * (x - mean))), in the opmath dtype."""
    return _ops.batch_norm_grad_sums.default(grad_output, input, mean)


def batch_norm_backward(grad_output, input, mean, var, weight, eps, training, output_mask,
                        sum_dy=None, sum_dy_xmu=None, count=None, relu_output=None,
                        residual_grad=False, relu=False, bias=None):
    """(grad_input, grad_weight, grad_bias, grad_residual), None where not asked for.

    With sum_dy, sum_dy_xmu and count given (all-reduced over processes), the training-mode
    gradient is that of the whole distributed batch. After a fused ReLU, grad_output passes
    unless the ReLU's output was <= 0 (NaN passes, as in torch's ReLU backward): give that output
    as relu_output, or relu=True and the forward's bias to have the gate recomputed from input.
    residual_grad (with relu_output) also returns the gated grad_output (a fused residual's
    gradient), from the pass of grad_input.

    Forward-mode AD: the gradients are linear in grad_output, so its tangent goes through the same
    op; tangents of the other tensors are not supported.
    """
    args = (input, mean, var, weight, eps, training, output_mask, sum_dy, sum_dy_xmu, count,
            relu_output, residual_grad, relu, bias)
    (dy, *_), tangents = _split_duals(grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu,
                                      relu_output, bias)
    if tangents is not None and (sum_dy is not None or any(t is not None for t in tangents[1:])):
        raise NotImplementedError("modekernels batch_norm_backward: forward-mode AD through "
                                  "grad_output only, and without given sums")
    wanted = (*output_mask, residual_grad)
    grads = _ops.batch_norm_backward.default(dy, *args)
    if tangents is not None:
        t_grads = _ops.batch_norm_backward.default(tangents[0], *args)
        grads = [fwAD.make_dual(g, t) if w else g for g, t, w in zip(grads, t_grads, wanted)]
    return tuple(g if w else None for g, w in zip(grads, wanted))


@torch.library.register_fake("modekernels::batch_norm_stats")
def _(input):
    return _channel_stats_fake(input)


@torch.library.register_fake("modekernels::batch_norm_grad_sums")
def _(grad_output, input, mean):
    _check_devices("batch_norm", input, "input", grad_output=grad_output, mean=mean)
    return _channel_stats_fake(input)


@torch.library.register_fake("modekernels::batch_norm_backward")
def _(grad_output, input, mean, var, weight, eps, training, output_mask, sum_dy=None,
      sum_dy_xmu=None, count=None, relu_output=None, residual_grad=False, relu=False, bias=None):
    _check_devices("batch_norm", input, "input", grad_output=grad_output, mean=mean, var=var,
                   weight=weight, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, relu_output=relu_output,
                   bias=bias)
    param_dtype = weight.dtype if weight is not None else _opmath(input.dtype)
    C = input.shape[1]

    def like_input(wanted, fmt):
        return torch.empty_like(input, memory_format=fmt) if wanted else input.new_empty((0,))

    gw = input.new_empty((C,), dtype=param_dtype) if output_mask[1] and weight is not None else input.new_empty((0,))
    gb = input.new_empty((C,), dtype=param_dtype) if output_mask[2] else input.new_empty((0,))
    return (like_input(output_mask[0], _grad_input_format(grad_output, input)), gw, gb,
            like_input(residual_grad, _channels_format(input)))


@torch.library.register_fake("modekernels::batch_norm_update_stats_")
def _(running_mean, running_var, mean, var, count, momentum, num_batches_tracked):
    _check_devices("batch_norm", mean, "mean", running_mean=running_mean, running_var=running_var,
                   var=var, num_batches_tracked=num_batches_tracked)
    return None


# The double backward (gradient penalties, meta-learning): batch_norm_backward's own gradient, as
# torch defines it for its batch norm. In training mode the batch statistics are functions of
# input, so the gradient for input carries that dependence and mean and var get none. It is taken
# by autograd through torch's own batch_norm, on this op's ReLU gate, held constant as the
# derivative of a ReLU's gate is zero.

def _bn_backward_setup(ctx, inputs, output):
    (grad_output, input, mean, var, weight, eps, training, output_mask, sum_dy, _, _, relu_output,
     residual_grad, relu, bias) = inputs
    ctx.eps, ctx.training, ctx.relu, ctx.given_sums = eps, training, relu, sum_dy is not None
    ctx.wanted = (*output_mask, residual_grad)
    ctx.save_for_backward(grad_output, input, mean, var, weight, relu_output, bias)


def _bn_backward_grad(ctx, *grads_of_outputs):
    if ctx.given_sums:
        raise NotImplementedError("modekernels batch_norm_backward: no double backward with "
                                  "given (all-reduced) sum_dy and sum_dy_xmu")
    grad_output, input, mean, var, weight, relu_output, bias = ctx.saved_tensors
    # The ReLU's output and what it was computed from: the saved output, or the forward's output
    # recomputed from input, weight and bias, rounded as the forward rounded it.
    if relu_output is not None:
        relu_out, gated_by = relu_output, {11: relu_output}
    elif ctx.relu:
        relu_out = batch_norm_eval(input, mean, var, weight, bias, ctx.eps, relu=True)
        gated_by = {1: input, 4: weight, 14: bias}
    else:
        relu_out, gated_by = None, {}
    # open unless <= 0 (NaN passes), as torch's ReLU backward
    gate = None if relu_out is None else ~(relu_out <= 0)
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        dy, x = grad_output.detach().requires_grad_(), input.detach().requires_grad_()
        w = weight.detach().requires_grad_() if weight is not None else None
        gated = dy if gate is None else torch.where(gate, dy, 0)
        opmath = _opmath(input.dtype)
        stats = (None, None) if ctx.training else (mean.to(opmath), var.to(opmath))
        out = torch.nn.functional.batch_norm(x.to(opmath), *stats,
                                             w if w is None else w.to(opmath), None, ctx.training,
                                             0.0, ctx.eps)
        grad_input, *grad_weight = torch.autograd.grad(out, [x] + ([w] if w is not None else []),
                                                       gated.to(opmath), create_graph=True)
        reduce_dims = [d for d in range(input.dim()) if d != 1]
        grad_weight = grad_weight[0] if grad_weight else None
        firsts = (grad_input, grad_weight, gated.sum(reduce_dims), gated)
        pairs = [(f, g.to(f.dtype)) for f, g, wanted in zip(firsts, grads_of_outputs, ctx.wanted)
                 if wanted and f is not None and g is not None]
        leaves = [(i, t) for i, t in ((0, dy), (1, x), (4, w)) if ctx.needs_input_grad[i]]
        result = [None] * len(ctx.needs_input_grad)
        if pairs and leaves:
            grads = torch.autograd.grad([f for f, _ in pairs], [t for _, t in leaves],
                                        [g for _, g in pairs], allow_unused=True,
                                        create_graph=create_graph)
            for (i, _), g in zip(leaves, grads):
                result[i] = g
    # The gate's own derivative is zero, and torch's ReLU backward gives it as zeros for the
    # ReLU's output (threshold_backward): so what the gate is computed from gets zeros rather than
    # nothing, and stays in the graph where the gradient does not depend on it otherwise, as
    # through torch's ReLU.
    for i, t in gated_by.items():
        if pairs and t is not None and ctx.needs_input_grad[i] and result[i] is None:
            result[i] = torch.zeros_like(t)
    return tuple(result)


torch.library.register_autograd("modekernels::batch_norm_backward", _bn_backward_grad,
                                setup_context=_bn_backward_setup)


# vmap: BatchNorm over a batch of samples (each (N, C, *)) is one BatchNorm over (N, B * C, *),
# each sample's channels kept apart; per-channel tensors not vmapped over are repeated per sample.

def _fold_channels(t, bdim, size):
    """(N, size * C, *) from samples (N, C, *) vmapped over dimension bdim (or broadcast)."""
    return None if t is None else _batch_first(t, bdim, size).movedim(0, 1).flatten(1, 2)


def _fold_param(t, bdim, size):
    """(size * C,) from per-channel (C,) tensors vmapped over bdim (or repeated)."""
    if t is None:
        return None
    return t.repeat(size) if bdim is None else t.movedim(bdim, 0).flatten()


def _unfold_channels(t, size):
    return t.unflatten(1, (size, -1)).movedim(1, 0)


def _bn_train_vmap(info, in_dims, input, weight, bias, eps, residual=None, relu=False):
    B, in_dims = info.batch_size, (*in_dims, None)  # no entry for a residual left out
    out, mean, var = batch_norm_train(
        _fold_channels(input, in_dims[0], B), _fold_param(weight, in_dims[1], B),
        _fold_param(bias, in_dims[2], B), eps, _fold_channels(residual, in_dims[4], B), relu)
    return (_unfold_channels(out, B), mean.view(B, -1), var.view(B, -1)), (0, 0, 0)


def _bn_eval_vmap(info, in_dims, input, running_mean, running_var, weight, bias, eps,
                  residual=None, relu=False):
    B, in_dims = info.batch_size, (*in_dims, None)
    per_channel = (running_mean, running_var, weight, bias)
    params = (_fold_param(t, d, B) for t, d in zip(per_channel, in_dims[1:5]))
    out = batch_norm_eval(_fold_channels(input, in_dims[0], B), *params, eps,
                          _fold_channels(residual, in_dims[6], B), relu)
    return _unfold_channels(out, B), 0


def _bn_update_stats_vmap(info, in_dims, running_mean, running_var, mean, var, count, momentum,
                          num_batches_tracked=None):
    # Batched statistics go to batched running statistics only, sample by sample; an unbatched
    # counter counts the call once (as torch's module does), every sample reading the same count.
    if in_dims[0] is None or in_dims[1] is None:
        raise RuntimeError(
            "Batch norm got a batched tensor as input while the running_mean or running_var, "
            "which will be updated in place, were not batched.\nIf you are using a module and do "
            "not need eval mode, please set `track_running_stats` to be False.If you are using a "
            "prebuilt module and do not need eval mode, please see the functorch website for "
            "resources on how to patch your module to work with vmap")
    B, in_dims = info.batch_size, (*in_dims, None)
    stats = [_batch_first(t, d, B) for t, d in zip((running_mean, running_var, mean, var), in_dims)]
    if num_batches_tracked is None:
        counters = [None] * B
    elif in_dims[6] is not None:
        counters = num_batches_tracked.movedim(in_dims[6], 0)
    else:
        counters = [num_batches_tracked, *(num_batches_tracked.clone() for _ in range(B - 1))]
    for i in range(B):
        batch_norm_update_stats_(*(t[i] for t in stats), count, momentum, counters[i])
    return None, None


for _name, _rule in [("batch_norm_train", _bn_train_vmap), ("batch_norm_eval", _bn_eval_vmap),
                     ("batch_norm_update_stats_", _bn_update_stats_vmap)]:
    torch.library.register_vmap(f"modekernels::{_name}", _rule)


# ---------------------------------------------------------------------------- decompositions
# For torch.export's run_decompositions: the ops of an eval-mode graph as torch operations, so that
# exporters that know only torch's operators (torch.onnx, ...) take the graph. Same values; in
# float16/bfloat16 the sums may round once more than our kernels do.

def _add_relu(out, residual, relu):
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _batch_norm_train_decomposition(input, weight, bias, eps, residual=None, relu=False):
    # Batch statistics in eval mode: a BatchNorm with track_running_stats=False.
    dims = [d for d in range(input.dim()) if d != 1]
    var, mean = torch.var_mean(input.to(_opmath(input.dtype)), dim=dims, correction=0)
    out = torch.nn.functional.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    return _add_relu(out, residual, relu), mean, var


def _batch_norm_eval_decomposition(input, running_mean, running_var, weight, bias, eps,
                                   residual=None, relu=False):
    out = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, False,
                                         0.0, eps)
    return _add_relu(out, residual, relu)


def _no_draw(input):
    """The rng_state of a fused dropout that keeps everything (p == 0: eval mode)."""
    return torch.zeros(2, dtype=torch.int64, device=input.device)


# A fused dropout that drops (training mode) keeps its op: its masks are modekernels' own random
# stream, which no torch operator draws (NotImplemented: the op stays in the graph).

def _dropout_add_decomposition(input, residual, p, generator=None):
    return (residual + input, _no_draw(input)) if p == 0 else NotImplemented


def _bias_dropout_add_decomposition(input, bias, residual, p, generator=None):
    return (residual + (input + bias), _no_draw(input)) if p == 0 else NotImplemented


def decompositions():
    """{op: torch composition} for `ExportedProgram.run_decompositions` (torch.export): an
    eval-mode graph of modekernels' layers becomes one of torch's operators only, which exporters
    such as `torch.onnx.export` take. Training-mode graphs (running-statistics updates, dropout
    masks) keep modekernels' ops; torch.export and AOTInductor run those as they are."""
    return {
        _ops.batch_norm_train.default: _batch_norm_train_decomposition,
        _ops.batch_norm_eval.default: _batch_norm_eval_decomposition,
        _ops.dropout_add.default: _dropout_add_decomposition,
        _ops.bias_dropout_add.default: _bias_dropout_add_decomposition,
    }
