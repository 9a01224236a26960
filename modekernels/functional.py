"""The functional API: the same signatures and semantics as torch.nn.functional."""
import functools
import sys
import warnings

import torch
from torch.overrides import handle_torch_function, has_torch_function

from . import _ops


def _torch_function(fn):
    """fn under torch's __torch_function__ protocol, as torch.nn.functional's functions are: an
    argument that overrides it (a tensor subclass, an FX proxy during symbolic tracing) gets the
    call, with this function as its target."""
    @functools.wraps(fn)
    def public(*args, **kwargs):
        overridable = (*args, *kwargs.values())
        if has_torch_function(overridable):
            return handle_torch_function(public, overridable, *args, **kwargs)
        return fn(*args, **kwargs)
    return public


def _warn(message, stacklevel=4):
    """torch's deprecation warnings for some input ranks, pointed at the caller (the default
    stacklevel: _warn, the functional, its public wrapper). Not while torch.compile traces, which
    cannot take warnings.warn in a full graph; torch's functionals sit in its graphs whole and
    compile with these inputs too."""
    if not torch.compiler.is_compiling():
        warnings.warn(message, stacklevel=stacklevel)


def _warn_rank(name, input, spatial):
    """torch's deprecation warning for a `name` (dropout2d, dropout3d) input of another rank than
    its `spatial` dimensions and a channel, with or without a batch."""
    if input.dim() not in (spatial + 1, spatial + 2):
        _warn(f"{name}: Received a {input.dim()}-D input to {name}, which is deprecated "
              "and will result in an error in a future release. To retain the behavior "
              f"and silence this warning, please use dropout instead. Note that {name} "
              f"exists to provide channel-wise dropout on inputs with {spatial} spatial "
              "dimensions, a channel dimension, and an optional batch dimension "
              f"(i.e. {spatial + 1}D or {spatial + 2}D inputs).", stacklevel=5)


@_torch_function
def dropout(input, p=0.5, training=True, inplace=False, generator=None):
    """torch.nn.functional.dropout on modekernels' fused kernels.

    In eval mode, with p == 0, or for an empty tensor, `input` itself is returned (a copy of a
    nested one, as torch's). `generator` (a torch.Generator on input's device) makes the mask
    reproducible independently of the global seed.
    """
    _check_p(p)
    p = _check_args("dropout_" if inplace else "dropout", input, p, training, generator)
    if input.is_nested:
        return _nested_dropout(input, p, training, inplace, generator)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0 and not input.is_floating_point():
        return _zeroed(input, inplace)
    if inplace:
        return _ops.dropout_(input, p, generator)
    return _ops.dropout(input, p, generator)[0]


def _nested_dropout(input, p, training, inplace, generator):
    """Dropout of a nested tensor. As torch's: eval and p = 0 give a copy (in place, the input),
    p = 1 zeros; in place, any other p is refused. Out of place, a jagged one's values are
    dropped, its offsets and lengths kept; a mask over torch's older strided layout is refused
    (torch's dropout takes it)."""
    if not training or p == 0.0:
        return input if inplace else input.clone()
    if p == 1.0:
        return _zeroed(input, inplace)
    if inplace:
        raise NotImplementedError("modekernels dropout_: in-place dropout of a nested tensor "
                                  "(torch's dropout_ cannot draw one either)")
    if input.layout != torch.jagged:
        raise TypeError(f"modekernels dropout: nested tensors of the torch.jagged layout only, but "
                        f"got {input.layout}")
    values = _ops.dropout(input.values(), p, generator)[0]
    return torch.nested.nested_tensor_from_jagged(values, input.offsets(), input.lengths(),
                                                  jagged_dim=input._ragged_idx)


def _check_p(p):
    """torch's Python check of a dropout's p, ahead of every other: a p that does not compare
    with floats raises Python's TypeError there, and NaN passes (_check_args refuses it)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _check_args(op, input, p, training, generator, tensors=()):
    """torch's checks of a dropout's arguments after its Python check of p (_check_p), in its
    order: the types that torch's argument parser enforces on its `op` (a p that is a tensor of
    one element but not 0-d, or that requires grad, and a truthy non-bool `training` are
    refused), then its op's RuntimeError for a NaN p; then ours: `generator` a torch.Generator
    (as torch's random functions want it). The fused ops name their other `tensors` ((name,
    value) pairs, which come after input in their signatures), and count them in the positions
    of p and training. Returns p as a Python float, as torch's parser passes it on."""
    for position, (name, value) in enumerate((("input", input), *tensors), start=1):
        _check_tensor(op, name, position, value)
    p = _as_float(op, "p", 2 + len(tensors), p)
    _check_bool(op, "train", 3 + len(tensors), training)
    if p != p:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}(): argument 'generator' must be torch.Generator, not "
                        f"{_typename(generator)}")
    return p


def _check_tensor(op, name, position, value):
    """torch's argument parser's TypeError for a tensor argument that is not one."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}(): argument '{name}' (position {position}) must be Tensor, not "
                        f"{_typename(value)}")


def _check_bool(op, name, position, value):
    """torch's argument parser takes a bool flag only; a truthy None or 1 would pass here."""
    if value is not True and value is not False:
        raise TypeError(f"{op}(): argument '{name}' (position {position}) must be bool, not "
                        f"{_typename(value)}")


def _as_float(op, name, position, value):
    """`value` as the float torch's argument parser makes of it. The parser takes a Python int or
    float, a numpy number or bool, a symbolic number, or a 0-d tensor that does not require grad
    (read as with .item()), where a float is due, and raises this TypeError for anything else
    (Fraction and Decimal too; the op's schema would raise a RuntimeError, for momentum only
    after the batch statistics were computed). Our ops take the float: a numpy number or tensor
    would reach them as a tensor under torch.compile."""
    if type(value) is float:  # the usual case, ahead of the isinstance checks below
        return value
    if isinstance(value, torch.Tensor):
        ok = value.dim() == 0 and not value.requires_grad
    else:
        ok = isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) or _is_numpy_number(value)
    if not ok:
        raise TypeError(f"{op}(): argument '{name}' (position {position}) must be float, not "
                        f"{_typename(value)}")
    return value if isinstance(value, (torch.SymInt, torch.SymFloat)) else float(value)


def _is_numpy_number(value):
    """Whether `value` is a numpy scalar that torch's parser reads as a number (where numpy was
    never imported, no value is one of its scalars, and this imports nothing)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, (np.number, np.bool_))


# A class made by a class statement: a heap type (Py_TPFLAGS_HEAPTYPE) that is not immutable
# (Py_TPFLAGS_IMMUTABLETYPE, which C types made from a spec, such as re.Pattern, have).
_HEAP_TYPE, _IMMUTABLE_TYPE = 1 << 9, 1 << 8


def _typename(value):
    """A type's name as torch's argument parser writes it (the C type's tp_name): `int`,
    `numpy.bool`, `decimal.Decimal`, `re.Pattern`, but `Fraction` for a class written in Python,
    and `Tensor`."""
    if isinstance(value, torch.Tensor):
        return "Tensor"
    t = type(value)
    if t.__module__ == "builtins" or t.__flags__ & (_HEAP_TYPE | _IMMUTABLE_TYPE) == _HEAP_TYPE:
        return t.__name__
    return f"{t.__module__}.{t.__qualname__}"


@_torch_function
def dropout_add(input, residual, p=0.5, training=True, generator=None):
    """residual + dropout(input) in one pass; in eval (or with p == 0) the plain sum, also one pass.

    Every mode runs the same op, so shapes and dtypes are checked alike in training and eval
    (no broadcasting or type promotion), and eval leaves the random generator untouched.
    """
    p = _train_p("dropout_add", input, p, training, generator, (("residual", residual),))
    return _ops.dropout_add(input, residual, p, generator)[0]


@_torch_function
def bias_dropout_add(input, bias, residual, p=0.5, training=True, generator=None):
    """residual + dropout(input + bias), bias over the last dimension, in one pass.

    In eval (or with p == 0) this is residual + input + bias, also in one pass and without
    touching the random generator.
    """
    p = _train_p("bias_dropout_add", input, p, training, generator,
                 (("bias", bias), ("residual", residual)))
    return _ops.bias_dropout_add(input, bias, residual, p, generator)[0]


def _train_p(op, input, p, training, generator, tensors):
    """The probability the fused ops run with: 0 (the plain sum, no random draw) in eval or for an
    empty input, as torch's dropout draws nothing then either."""
    _check_p(p)
    p = _check_args(op, input, p, training, generator, tensors)
    return p if training and input.numel() else 0.0


def _zeroed(input, inplace):
    """torch's p = 1 shortcut: the input times a zero of its own dtype, before any check of its
    dtype or rank (so integer, bool and complex inputs give zeros of theirs, NaN stays NaN). Our
    kernels take the floating-point inputs of every rank they support."""
    zero = torch.zeros((), dtype=input.dtype, device=input.device)  # new_zeros: not for nested
    return input.mul_(zero) if inplace else input * zero


def _check_feature_args(input, p, training, inplace, generator):
    """_check_args for the channel-wise dropouts, named as torch's op (feature_dropout[_])."""
    return _check_args("feature_dropout_" if inplace else "feature_dropout", input, p, training,
                       generator)


def _feature_dropout(input, p, training, inplace, generator):
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0 and (input.dim() < 2 or not input.is_floating_point()):
        return _zeroed(input, inplace)
    if inplace:
        return _ops.feature_dropout_(input, p, generator)
    return _ops.feature_dropout(input, p, generator)[0]


def _unbatched_feature_dropout(input, batched, p, training, inplace, generator):
    if batched:
        return _feature_dropout(input, p, training, inplace, generator)
    input = input.unsqueeze_(0) if inplace else input.unsqueeze(0)
    result = _feature_dropout(input, p, training, inplace, generator)
    return result.squeeze_(0) if inplace else result.squeeze(0)


@_torch_function
def dropout1d(input, p=0.5, training=True, inplace=False, generator=None):
    """torch.nn.functional.dropout1d: one mask per channel of (N, C, L) or (C, L)."""
    _check_p(p)
    if input.dim() not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {input.dim()}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs).")
    p = _check_feature_args(input, p, training, inplace, generator)
    return _unbatched_feature_dropout(input, input.dim() == 3, p, training, inplace, generator)


@_torch_function
def dropout2d(input, p=0.5, training=True, inplace=False, generator=None):
    """torch.nn.functional.dropout2d: one mask per channel of (N, C, H, W).

    Like torch, a 3-D input is taken as (N, C, L), with torch's warning.
    """
    _check_p(p)
    _warn_rank("dropout2d", input, 2)
    if input.dim() == 3:
        _warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.")
    p = _check_feature_args(input, p, training, inplace, generator)
    return _feature_dropout(input, p, training, inplace, generator)


@_torch_function
def dropout3d(input, p=0.5, training=True, inplace=False, generator=None):
    """torch.nn.functional.dropout3d: one mask per channel of (N, C, D, H, W) or (C, D, H, W)."""
    _check_p(p)
    _warn_rank("dropout3d", input, 3)
    p = _check_feature_args(input, p, training, inplace, generator)
    return _unbatched_feature_dropout(input, input.dim() == 5, p, training, inplace, generator)


@_torch_function
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, num_batches_tracked=None):
    """torch.nn.functional.batch_norm on modekernels' kernels.

    Beyond torch's signature, `num_batches_tracked` (the module's counter) may be passed: it is
    incremented on the device in training, and with momentum=None the running statistics become
    the cumulative average over the batches it counts, without a host synchronization.
    """
    return _batch_norm(input, None, False, running_mean, running_var, weight, bias, training,
                       momentum, eps, num_batches_tracked)


@_torch_function
def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, *, num_batches_tracked=None):
    """relu(batch_norm(input, ...)) in one pass over memory, forward and backward."""
    return _batch_norm(input, None, True, running_mean, running_var, weight, bias, training,
                       momentum, eps, num_batches_tracked)


@_torch_function
def batch_norm_add_relu(input, residual, running_mean, running_var, weight=None, bias=None,
                        training=False, momentum=0.1, eps=1e-5, *, num_batches_tracked=None):
    """relu(batch_norm(input, ...) + residual), the tail of a ResNet block, in one pass."""
    _check_tensor("batch_norm_add_relu", "residual", 2, residual)  # None is no residual to add
    return _batch_norm(input, residual, True, running_mean, running_var, weight, bias, training,
                       momentum, eps, num_batches_tracked)


def _batch_norm(input, residual, relu, running_mean, running_var, weight, bias, training, momentum,
                eps, num_batches_tracked):
    momentum, eps = _check_arguments(input, weight, bias, running_mean, running_var, training,
                                     momentum, eps, num_batches_tracked)
    if not training:
        if running_mean is None or running_var is None:  # an empty input (_check_running_stats)
            C = input.shape[1]
            running_mean, running_var = input.new_zeros(C), input.new_ones(C)
        return _ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps, residual,
                                    relu)
    output, mean, var = _ops.batch_norm_train(input, weight, bias, eps, residual, relu)
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    _update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    return output


def _check_arguments(input, weight, bias, running_mean, running_var, training, momentum, eps,
                     num_batches_tracked):
    """The checks of a batch_norm call that come before any kernel, on every path (the
    synchronized one too): the types torch's argument parser enforces, in its order, then the
    running statistics. Returns (momentum, eps) as the parser passes them on (_as_float)."""
    _check_tensors(input, weight, bias, running_mean, running_var)
    momentum, eps = _check_flags(training, momentum, eps, num_batches_tracked)
    _check_running_stats(running_mean, running_var, training, (input, weight, bias))
    return momentum, eps


_OPTIONAL_TENSOR = (torch.Tensor, type(None))


def _check_tensors(input, weight, bias, running_mean, running_var):
    """torch's TypeError for a tensor argument of batch_norm that is not one (None where
    optional), at its position in torch's batch_norm op, in every mode (torch's functional
    trips over such an input in training before its parser sees it)."""
    if (isinstance(input, torch.Tensor) and isinstance(weight, _OPTIONAL_TENSOR)
            and isinstance(bias, _OPTIONAL_TENSOR) and isinstance(running_mean, _OPTIONAL_TENSOR)
            and isinstance(running_var, _OPTIONAL_TENSOR)):
        return  # the usual case, ahead of the loop that finds the first wrong one
    for position, (name, value) in enumerate((("input", input), ("weight", weight), ("bias", bias),
                                              ("running_mean", running_mean),
                                              ("running_var", running_var)), start=1):
        if value is not None or name == "input":
            _check_tensor("batch_norm", name, position, value)


def _check_flags(training, momentum, eps, num_batches_tracked):
    """The types torch's argument parser enforces on batch_norm's flag and numbers, in both modes
    (momentum may also be None here where num_batches_tracked is given: the cumulative average)."""
    _check_bool("batch_norm", "training", 6, training)
    if momentum is not None or num_batches_tracked is None:
        momentum = _as_float("batch_norm", "momentum", 7, momentum)
    return momentum, _as_float("batch_norm", "eps", 8, eps)


def _update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked):
    """A training call's update, after every check: the running statistics (the op also counts
    the call), or only the counter where a layer tracking statistics has none (torch's layer
    counts then too)."""
    if running_mean is not None or running_var is not None:
        _ops.batch_norm_update_stats_(running_mean, running_var, mean, var, count, momentum,
                                      num_batches_tracked)
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(1)


def _check_stat_dtype(name, stat, input):
    """In training, the eval op's dtype rule for a running statistic (csrc/batch_norm
    check_channel), with its TypeError: input's dtype, or float32 for a float16/bfloat16 input.
    The update op writes statistics of any floating dtype; torch's CPU layer refuses others in
    both modes (`mixed dtype (CPU)`), and so do we, before anything is computed or written."""
    reduced = input.dtype in (torch.float16, torch.bfloat16)
    if (stat.dtype == input.dtype or (reduced and stat.dtype == torch.float32)
            or input.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16)):
        return  # (the op's error for an input of another dtype comes first, as in eval)
    wanted = _c10_name(input.dtype) + (" or float32" if reduced else "")
    raise TypeError(f"modekernels batch_norm: expected {name} to be {wanted} like input, but got "
                    f"{_c10_name(stat.dtype)}")


def _c10_name(dtype):
    """dtype as the kernels' messages print it: Float, BFloat16."""
    return torch.empty((), dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


def _check_running_stats(running_mean, running_var, training, inputs):
    """torch's errors for running statistics given as None where they are needed, or requiring
    grad where grad mode is on (torch's autograd refuses those in both modes; below it, ours
    would update them in training and give them no gradient in eval), or created in inference mode
    where autograd records the call (grad mode on, and one of `inputs`, the input, weight and
    bias, requiring grad): torch's autograd saves the running statistics in training too, and
    raises before its kernel updates them (ours keep nothing of them for backward in training, and
    would update them; in eval, ours save them and raise alike)."""
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is None and not training and inputs[0].numel():  # (an empty one is returned)
            raise RuntimeError(f"{name} must be defined in evaluation mode")
        if stat is not None and training:
            _check_stat_dtype(name, stat, inputs[0])
        if stat is not None and stat.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"The function 'batch_norm' is not differentiable with respect to "
                               f"argument '{name}'. This input cannot have requires_grad True.")
    # (Not while torch.compile traces, which cannot read is_inference: a compiled graph takes them.)
    stats = (running_mean, running_var)
    if (training and not torch.compiler.is_compiling()
            and any(s is not None and s.is_inference() for s in stats) and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in inputs)):
        raise RuntimeError("Inference tensors cannot be saved for backward. Please do not use Tensors "
                           "created in inference mode in computation tracked by autograd. To work "
                           "around this, you can make a clone to get a normal tensor and use it in "
                           "autograd, or use `torch.no_grad()` instead of `torch.inference_mode()`.")
