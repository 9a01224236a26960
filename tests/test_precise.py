"""precise_batchnorm against the average of per-batch statistics computed directly."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import modekernels

from helpers import BN_TOL

NUM_BATCHES = 5


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.BatchNorm1d(10, momentum=None))


def batches(n=NUM_BATCHES, size=6):
    gen = torch.Generator().manual_seed(1)
    return [3 + 2 * torch.randn(size, 3, 8, 8, generator=gen) for _ in range(n)]


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def state(model):
    """Everything precise_batchnorm may touch: buffers, and each BatchNorm's flag and momentum."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return buffers, [(m.training, m.momentum) for m in batchnorms(model)]


def assert_same_state(before, after):
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1]


def direct_statistics(model, inputs):
    """Per BatchNorm: (mean over batches of the batch means, mean of the unbiased variances),
    with the BatchNorm layers normalizing by batch statistics, as while training."""
    model = copy.deepcopy(model)
    seen = {m: [] for m in batchnorms(model)}

    def record(module, args):
        x = args[0].transpose(0, 1).flatten(1).double()
        seen[module].append((x.mean(1), x.var(1)))

    for m in seen:
        m.training = True
        m.register_forward_pre_hook(record)
    torch.manual_seed(2)
    with torch.no_grad():
        for x in inputs:
            model(x)
    return [tuple(torch.stack(s).mean(0) for s in zip(*stats)) for stats in seen.values()]


def assert_precise(model, inputs, loader, **kwargs):
    """precise_batchnorm(model, loader, **kwargs) gives direct_statistics(model, inputs)."""
    expected = direct_statistics(model, inputs)
    torch.manual_seed(2)  # the same dropout masks as direct_statistics's
    assert modekernels.precise_batchnorm(model, loader, **kwargs) is model
    for m, (mean, var) in zip(batchnorms(model), expected):
        torch.testing.assert_close(m.running_mean.double(), mean, **BN_TOL[torch.float32])
        torch.testing.assert_close(m.running_var.double(), var, **BN_TOL[torch.float32])


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["torch", "converted_fused"])
def test_average_of_batch_statistics_and_state_restored(kind, mode):
    model = small_model().train(mode == "train")
    if kind == "converted_fused":
        modekernels.convert(model, fuse=True)
    model[0].eval()  # a module in another mode than the model stays so
    model[1].momentum = 0.3
    for m in batchnorms(model):
        m.num_batches_tracked.fill_(7)
    flags = modekernels.modes(model).training
    params = {name: p.clone() for name, p in model.named_parameters()}

    assert_precise(model, batches(), batches(), num_batches=NUM_BATCHES, progress=False)
    assert modekernels.modes(model).training == flags
    assert [m.momentum for m in batchnorms(model)] == [0.3, None]
    assert all(m.num_batches_tracked.item() == 7 for m in batchnorms(model))
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("form", ["tuple", "list", "dict", "forward"])
def test_batch_forms(form):
    inputs = batches(3)
    loader = {
        "tuple": [(x, torch.zeros(len(x))) for x in inputs],
        "list": [[x, "label"] for x in inputs],
        "dict": [{"input": x} for x in inputs],
        "forward": [{"images": x} for x in inputs],
    }[form]
    forward = (lambda model, batch: model(batch["images"])) if form == "forward" else None
    assert_precise(small_model().eval(), inputs, loader, num_batches=None, progress=False,
                   forward=forward)


def test_reads_only_num_batches_with_a_progress_bar(capsys):
    inputs = batches()
    read = []

    def loader():
        for x in inputs:
            read.append(x)
            yield x

    assert_precise(small_model().eval(), inputs[:3], loader(), num_batches=3)
    assert len(read) == 3
    assert "precise_batchnorm" in capsys.readouterr().err


def test_frozen_batchnorm_is_left_alone():
    model = small_model()
    modekernels.freeze_batchnorm(model[1:2])
    model[1].running_mean.fill_(0.5)
    before = model[1].running_mean.clone()
    modekernels.precise_batchnorm(model, batches(), progress=False, num_batches=NUM_BATCHES)
    assert torch.equal(model[1].running_mean, before)
    assert not model[6].running_mean.eq(0).all()


class WithUnusedBranch(torch.nn.Module):
    """small_model and a BatchNorm that forward never calls (an auxiliary head, say)."""

    def __init__(self):
        super().__init__()
        self.body, self.aux = small_model(), torch.nn.BatchNorm1d(10)

    def forward(self, x):
        return self.body(x)


def test_a_layer_no_batch_reaches_keeps_its_statistics():
    model = WithUnusedBranch()
    model.aux.running_mean.fill_(5.0)
    model.aux.running_var.fill_(7.0)
    model.aux.num_batches_tracked.fill_(100)
    before = [b.clone() for b in model.aux.buffers()]
    modekernels.precise_batchnorm(model, batches(), progress=False, num_batches=NUM_BATCHES)
    assert all(torch.equal(b, a) for b, a in zip(model.aux.buffers(), before))
    assert not model.body[6].running_mean.eq(0).all()


class Failing:
    """A data loader that raises after `good` batches."""

    def __init__(self, good):
        self.good = good

    def __iter__(self):
        yield from batches(self.good)
        raise OSError("disk gone")


@pytest.mark.parametrize("loader,num_batches,error,message", [
    (Failing(2), 5, OSError, "disk gone"),
    (batches(2), 5, ValueError, r"needs 5 batch\(es\), but the data loader yielded 2"),
    ([], None, ValueError, r"needs at least 1 batch\(es\), but the data loader yielded 0"),
], ids=["loader_raises", "too_few_batches", "no_batches"])
def test_failure_restores_everything(loader, num_batches, error, message):
    model = modekernels.convert(small_model())
    for m in batchnorms(model):
        m.running_mean.uniform_()
        m.num_batches_tracked.fill_(3)
    before = state(model)
    with pytest.raises(error, match=message):
        modekernels.precise_batchnorm(model, loader, num_batches=num_batches, progress=False)
    assert_same_state(before, state(model))


def test_uninitialized_lazy_layers_are_refused_before_anything_changes():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyBatchNorm1d(), torch.nn.BatchNorm1d(192))
    with pytest.raises(ValueError, match="lazy BatchNorm layer.* not initialized yet"):
        modekernels.precise_batchnorm(model, batches(), progress=False, num_batches=NUM_BATCHES)
    assert model[2].running_mean.eq(0).all() and model[2].num_batches_tracked.item() == 0


def test_bad_num_batches():
    with pytest.raises(ValueError, match="num_batches must be at least 1 or None, got 0"):
        modekernels.precise_batchnorm(small_model(), batches(), num_batches=0)
