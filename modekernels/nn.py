"""Modules: subclasses of torch's layers that override forward only.

Constructor arguments, parameters, buffers, state_dict, repr and isinstance checks are those of
the installed torch; only the kernels underneath change.
"""
import torch

from . import functional as F


class _NotScriptable:
    """torch.jit.script would fail on our forward (Python around our ops) with a message about
    its syntax; it calls this hook first, before it compiles or changes anything."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile modekernels.{type(self).__name__}: use torch.compile, "
            "torch.export or torch.jit.trace, or modekernels.revert(model) to script torch's own "
            "layers")


class Dropout(_NotScriptable, torch.nn.Dropout):
    def forward(self, input):
        return F.dropout(input, self.p, self.training, self.inplace)


class Dropout1d(_NotScriptable, torch.nn.Dropout1d):
    def forward(self, input):
        return F.dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(_NotScriptable, torch.nn.Dropout2d):
    def forward(self, input):
        return F.dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(_NotScriptable, torch.nn.Dropout3d):
    def forward(self, input):
        return F.dropout3d(input, self.p, self.training, self.inplace)


class DropoutAdd(_NotScriptable, torch.nn.modules.dropout._DropoutNd):
    """residual + Dropout(p)(input) in one pass: forward(input, residual). `inplace` is unused."""

    def forward(self, input, residual):
        return F.dropout_add(input, residual, self.p, self.training)


class BiasDropoutAdd(_NotScriptable, torch.nn.modules.dropout._DropoutNd):
    """residual + Dropout(p)(input + bias), the transformer residual path, in one pass.

    forward(input, bias, residual); bias is over the last dimension. `inplace` is unused.
    """

    def forward(self, input, bias, residual):
        return F.bias_dropout_add(input, bias, residual, self.p, self.training)


class _BatchNormForward(_NotScriptable):
    """forward() of torch's _BatchNorm on our kernels; everything else is torch's own.

    Differences from torch's forward, none visible in results: num_batches_tracked is incremented
    by the update op (after every check passed, so a failed call changes nothing), and
    momentum=None reads that counter on the device instead of calling float() on it.
    """

    def forward(self, input):
        return self._batch_norm(F.batch_norm, input)

    def _batch_norm(self, fn, input, *residual):
        if not isinstance(input, torch.fx.Proxy):  # FX symbolic tracing knows no shapes
            self._check_input_dim(input)
        training, track_running_stats = self.training, self.track_running_stats
        # Each buffer and parameter read once: a module's __getattr__ costs about 0.3 us a read.
        running_mean, running_var = self.running_mean, self.running_var
        use_batch_stats = training or (running_mean is None and running_var is None)
        momentum = self.momentum
        counter = self.num_batches_tracked if training and track_running_stats else None
        if momentum is None and counter is None:
            momentum = 0.0  # torch's exponential_average_factor when nothing is counted
        if training and not track_running_stats:
            running_mean = running_var = None
        return fn(input, *residual, running_mean, running_var, self.weight, self.bias,
                  use_batch_stats, momentum, self.eps, num_batches_tracked=counter)


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    pass


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    pass


class LazyBatchNorm1d(_BatchNormForward, torch.nn.LazyBatchNorm1d):
    """torch.nn.LazyBatchNorm1d: num_features is taken from the first input, on our kernels from
    that first call on, and the layer then becomes a modekernels.BatchNorm1d."""
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_BatchNormForward, torch.nn.LazyBatchNorm2d):
    """torch.nn.LazyBatchNorm2d, becoming a modekernels.BatchNorm2d (see LazyBatchNorm1d)."""
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_BatchNormForward, torch.nn.LazyBatchNorm3d):
    """torch.nn.LazyBatchNorm3d, becoming a modekernels.BatchNorm3d (see LazyBatchNorm1d)."""
    cls_to_become = BatchNorm3d


class _BatchNormReLUForward(_BatchNormForward):
    """relu(BatchNorm(input)) in one pass; a BatchNorm in every other respect (state, isinstance)."""

    def forward(self, input):
        return self._batch_norm(F.batch_norm_relu, input)


class _BatchNormAddReLUForward(_BatchNormForward):
    """relu(BatchNorm(input) + residual) in one pass: forward(input, residual)."""

    def forward(self, input, residual):
        return self._batch_norm(F.batch_norm_add_relu, input, residual)


class BatchNormReLU1d(_BatchNormReLUForward, BatchNorm1d):
    pass


class BatchNormReLU2d(_BatchNormReLUForward, BatchNorm2d):
    pass


class BatchNormReLU3d(_BatchNormReLUForward, BatchNorm3d):
    pass


class BatchNormAddReLU1d(_BatchNormAddReLUForward, BatchNorm1d):
    pass


class BatchNormAddReLU2d(_BatchNormAddReLUForward, BatchNorm2d):
    pass


class BatchNormAddReLU3d(_BatchNormAddReLUForward, BatchNorm3d):
    pass
