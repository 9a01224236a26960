"""PreciseBN: BatchNorm running statistics recomputed as a true average over many batches.

The running statistics that training leaves are an exponential moving average: dominated by the
last few dozen batches, and collected while the weights were still changing. With the weights
fixed, `precise_batchnorm` replaces them by the equal-weight average over many batches of each
batch's statistics, as fvcore's `update_bn_stats` (PreciseBN) does.
"""
import collections.abc
import itertools

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .models import _is_frozen


def precise_batchnorm(model, data_loader, num_batches=200, progress=True, forward=None):
    """Sets each BatchNorm's running_mean and running_var to its average over `num_batches` batches.

    Afterwards running_mean is the mean over the batches of each batch's mean, and running_var
    the mean of each batch's unbiased variance, every batch weighing the same. This is done for
    every BatchNorm layer (any _BatchNorm: torch's, modekernels', SyncBatchNorm) that tracks
    running statistics, except frozen ones (`freeze_batchnorm`), which keep theirs; a model
    without any is returned as it is, the loader unread.

    How: under torch.no_grad(), those layers run in training mode from reset statistics with
    momentum=None (the cumulative average). Every other module keeps its mode: call
    `model.eval()` first for the statistics of the activations seen at inference (dropout off),
    or leave the model in training mode for those seen in training (as fvcore does). With
    SyncBatchNorm under torch.distributed, a batch is that of all processes together, and every
    process must call this with the same number of batches.

    Batches: `forward(model, batch)` runs one if given; otherwise a tuple or list runs
    `model(batch[0])`, a mapping `model(**batch)`, anything else `model(batch)`. Batches must
    not be empty.

    `num_batches`: the loader must yield at least that many (only that many are read), or
    ValueError; None reads the whole loader. `progress` shows a tqdm bar (when tqdm is
    installed).

    Afterwards each layer's `training`, `momentum` and `num_batches_tracked` are what they were
    (the recomputation is not training). A layer that no batch reached (a branch the batches did
    not take) keeps its running statistics, and if anything raises, every layer gets its
    statistics back. Returns `model`.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1 or None, got {num_batches}")
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
              and m.running_mean is not None and not _is_frozen(m)]
    if not layers:
        return model
    lazy = [m for m in layers if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"precise_batchnorm: {len(lazy)} lazy BatchNorm layer(s) not initialized "
                         "yet; run the model on one batch first")
    saved = [(m.training, m.momentum, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone()) for m in layers]
    completed = False
    try:
        for m in layers:
            m.reset_running_stats()
            m.training, m.momentum = True, None
        seen = _run(model, data_loader, num_batches, progress, forward or _forward)
        if seen == 0 or (num_batches is not None and seen < num_batches):
            raise ValueError(f"precise_batchnorm needs {num_batches or 'at least 1'} batch(es), "
                             f"but the data loader yielded {seen}")
        completed = True
    finally:
        for m, (training, momentum, mean, var, count) in zip(layers, saved):
            if not completed or m.num_batches_tracked.item() == 0:  # failed, or not reached
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
            m.training, m.momentum = training, momentum
            m.num_batches_tracked.copy_(count)
    return model


def _forward(model, batch):
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, collections.abc.Mapping):
        return model(**batch)
    return model(batch)


def _run(model, data_loader, num_batches, progress, forward):
    """Runs forward(model, batch) on up to num_batches batches; returns how many it ran."""
    batches = data_loader if num_batches is None else itertools.islice(data_loader, num_batches)
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            batches = tqdm(batches, total=num_batches, desc="precise_batchnorm")
    seen = 0
    with torch.no_grad():
        for batch in batches:
            forward(model, batch)
            seen += 1
    return seen
