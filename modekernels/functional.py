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



def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, num_batches_tracked=None):
    """torch.nn.functional.batch_norm on modekernels' kernels.

    Beyond torch's signature, `num_batches_tracked` (the module's counter) may be passed: it is
    incremented on the device in training, and with momentum=None the running statistics become
    the cumulative average over the batches it counts, without a host synchronization.
    """
    return _batch_norm(input, None, False, running_mean, running_var, weight, bias, training,
                       momentum, eps, num_batches_tracked)


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, *, num_batches_tracked=None):
    """relu(batch_norm(input, ...)) in one pass over memory, forward and backward."""
    return _batch_norm(input, None, True, running_mean, running_var, weight, bias, training,
                       momentum, eps, num_batches_tracked)


def batch_norm_add_relu(input, residual, running_mean, running_var, weight=None, bias=None,
                        training=False, momentum=0.1, eps=1e-5, *, num_batches_tracked=None):
    """relu(batch_norm(input, ...) + residual), the tail of a ResNet block, in one pass."""
    return _batch_norm(input, residual, True, running_mean, running_var, weight, bias, training,
                       momentum, eps, num_batches_tracked)


def _batch_norm(input, residual, relu, running_mean, running_var, weight, bias, training, momentum,
                eps, num_batches_tracked):
    if not training:
        return _ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps, residual,
                                    relu)
    output, mean, var = _ops.batch_norm_train(input, weight, bias, eps, residual, relu)
    if running_mean is not None or running_var is not None:
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        _ops.batch_norm_update_stats_(running_mean, running_var, mean, var, count, momentum,
                                      num_batches_tracked)
    return output
