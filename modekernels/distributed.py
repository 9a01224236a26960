"""SyncBatchNorm: BatchNorm with the batch statistics of every process of a torch.distributed group.

The kernels compute local statistics and apply the normalization; what crosses processes goes
through torch.distributed's own collectives, one per pass:

- forward: every rank packs (count, mean, biased var) of all its channels into one float64
  tensor; one all-gather brings every rank's row to every rank, and each merges them alike;
- backward: (sum(dy), sum(dy * (x - mean))) of all channels in one tensor, one all-reduce.

Unlike torch.nn.SyncBatchNorm, this works on CPU tensors (gloo) as well as on CUDA (nccl).
"""
import functools
import warnings

import torch
import torch.distributed as dist

from . import _ops, functional as F, nn as _nn

# Fused layers: a SyncBatchNorm would drop their ReLU (and residual), so they are never converted.
_FUSED = (_nn._BatchNormReLUForward, _nn._BatchNormAddReLUForward)


class SyncBatchNorm(_nn._BatchNormForward, torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm on modekernels' kernels, on CPU (gloo) and CUDA alike.

    Constructor, parameters, buffers, state_dict, repr and input checks are those of
    torch.nn.SyncBatchNorm, but unlike our other layers it is not a subclass of torch's:
    DistributedDataParallel refuses every torch.nn.SyncBatchNorm in a CPU module ("SyncBatchNorm
    layers only work with GPU modules"), and the CPU is where this layer is needed. In training
    mode, with torch.distributed initialized and more than one process in `process_group`
    (default: the whole world), the batch statistics are those of the inputs of all its processes
    together: every process must call forward (and backward) the same number of times, also with
    an empty batch (N = 0), which adds nothing but still joins the collectives. The running
    statistics are updated with the global mean and the unbiased variance over the global count,
    identically on every process. Weight and bias gradients are this process's share, as in
    torch: summed over processes (DistributedDataParallel averages them), they are the whole
    batch's.

    Otherwise (eval mode, a single process, torch.distributed not initialized) it computes
    exactly what modekernels' BatchNorm layers do, without communicating.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, **kwargs):
        # kwargs: the keyword-only arguments of newer torch's (`bias`).
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **kwargs)
        self.process_group = process_group

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input):
        if isinstance(input, torch.fx.Proxy) and getattr(input.tracer, "root", self) is not self:
            # FX symbolic tracing keeps the layer whole, as torch's SyncBatchNorm (a leaf module):
            # whether to synchronize is decided when the graph runs.
            tracer = input.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (input,), {})
        if not isinstance(input, torch.fx.Proxy):  # the traced root: FX knows no shapes
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
        group = self._sync_group()
        if group is None:
            return self._batch_norm(F.batch_norm, input)
        return self._batch_norm(functools.partial(_sync_batch_norm, group=group), input)

    def _sync_group(self):
        """The process group to take the statistics over, or None when this call is local."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm, making this class's layers.

        Every BatchNorm (any _BatchNorm: torch's BatchNorm1d/2d/3d and SyncBatchNorm, ours, user
        subclasses) becomes a new SyncBatchNorm sharing its parameters and buffers, with its
        `training` flag and `qconfig`; `module` itself is returned if it is not a BatchNorm.
        modekernels' fused BatchNormReLU / BatchNormAddReLU layers are left as they are, with a
        warning: they keep computing per-process statistics.
        """
        if isinstance(module, _FUSED):
            warnings.warn(f"{type(module).__name__} is left unsynchronized: a fused BatchNorm "
                          "layer cannot become a SyncBatchNorm; undo the fusion "
                          "(modekernels.revert) first to synchronize it")
            return module
        # torch's method builds torch's class and recurses through cls.convert_sync_batchnorm.
        torch_method = torch.nn.SyncBatchNorm.convert_sync_batchnorm.__func__
        converted = torch_method(cls, module, process_group)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            converted.__class__ = cls  # a fresh torch.nn.SyncBatchNorm: the same attributes
        return converted


def _sync_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, *,
                     num_batches_tracked, group):
    """functional.batch_norm's training mode (`training` is true) with the statistics of every
    process of `group`. Checks that need the global count run before anything is written."""
    momentum, eps = F._check_arguments(input, weight, bias, running_mean, running_var, training,
                                       momentum, eps, num_batches_tracked)
    # The ops' own checks of eps and of the per-channel tensors (shape, dtype, device), run on
    # an empty batch before the collective: a process whose channel count differs would send a
    # message of another size, which gloo answers by aborting every process.
    empty = input.detach().narrow(0, 0, 0)
    with torch.no_grad():
        _ops.batch_norm_train(empty, weight, bias, eps)
        if running_mean is not None:
            _ops.batch_norm_eval(empty, running_mean, running_var, None, None, eps)
    mean, var, count = _global_moments(input.detach(), group)
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{input.shape} and 1 value in all processes together")
    output = _SyncBatchNormFunction.apply(input, weight, bias, mean, var, count, eps, group)
    F._update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    return output


def _global_moments(input, group):
    """(mean, biased var) per channel over the inputs of all of `group`, and their count.

    mean and var are in the opmath dtype (float32, float64 for float64 inputs); count is the
    number of values per channel, summed over processes. One all-gather of (2C + 1) float64 per
    process. Processes are merged with the k-way form of Chan et al.'s update: deviations from
    the global mean, all non-negative terms, so no cancellation; an empty batch has weight 0.
    Reading the count synchronizes a CUDA device with the host, as torch's SyncBatchNorm does.
    """
    C = input.shape[1]
    mean, var = _ops.batch_norm_stats(input)
    count = input.new_full((1,), input.numel() // C, dtype=torch.float64)
    local = torch.cat([count, mean.double(), var.double()])
    rows = local.new_empty(dist.get_world_size(group) * local.numel())
    _all_gather(rows, local, group)  # gloo takes the flat (concatenated) form only
    counts, means, variances = rows.view(-1, local.numel()).split([1, C, C], dim=1)
    total = counts.sum()
    weights = counts / total.clamp(min=1)
    global_mean = (weights * means).sum(0)
    global_var = (weights * (variances + (means - global_mean).square())).sum(0)
    return global_mean.to(mean.dtype), global_var.to(mean.dtype), int(total.item())


def _all_gather(output, input, group):
    # torch deprecates all_gather_into_tensor for all_gather_single; older torch has only it.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group)


class _SyncBatchNormFunction(torch.autograd.Function):
    """The normalization with given global statistics, and its synchronized backward.

    forward(input, weight, bias, mean, var, count, eps, group); mean and var are the global
    statistics, count the global number of values per channel. The input gradient is that of
    the whole distributed batch (one all-reduce, only when it is wanted, as in torch); the weight
    and bias gradients come from this process's sums alone.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, count, eps, group):
        ctx.eps, ctx.count, ctx.group = eps, count, group
        ctx.save_for_backward(input, weight, mean, var)
        return _ops.batch_norm_eval(input, mean, var, weight, bias, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, var = ctx.saved_tensors
        want_input, want_weight, want_bias = ctx.needs_input_grad[:3]
        sums = _ops.batch_norm_grad_sums(grad_output, input, mean)
        local_count = input.numel() // input.shape[1]
        _, grad_weight, grad_bias, _ = _ops.batch_norm_backward(
            grad_output, input, mean, var, weight, ctx.eps, True,
            [False, want_weight, want_bias], *sums, local_count)
        grad_input = None
        if want_input:
            packed = torch.cat(sums)
            dist.all_reduce(packed, group=ctx.group)
            grad_input = _ops.batch_norm_backward(
                grad_output, input, mean, var, weight, ctx.eps, True, [True, False, False],
                *packed.chunk(2), ctx.count)[0]
        return grad_input, grad_weight, grad_bias, None, None, None, None, None
