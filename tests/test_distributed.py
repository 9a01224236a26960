"""SyncBatchNorm: gloo process groups of 2 and 3 CPU processes against one process's BatchNorm.

Each process group is spawned once (spawning is slow) and runs every case; its processes save
what they computed and the tests compare it with torch's BatchNorm run here on the whole batch.
"""
import contextlib
import dataclasses
import functools
import io
import itertools
from typing import Callable
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

import modekernels
from modekernels.bench.distributed import payloads, process_group, spawn

from helpers import BN_TOL, batchnorm

STEPS = 2  # training steps per case, then one eval step
EVEN = {2: [4, 4], 3: [3, 3, 3]}  # world size -> batch size of each rank
UNEVEN = {2: [1, 6], 3: [5, 1, 2]}
EMPTY_RANK = {2: [0, 5], 3: [3, 0, 4]}


def layer(cls, num_features, **kwargs):
    torch.manual_seed(0)
    module = batchnorm(cls, num_features, **kwargs)
    if module.weight is not None:
        nn.init.uniform_(module.weight, 0.5, 1.5)
    if module.bias is not None:
        nn.init.normal_(module.bias)
    return module


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 25, 6), nn.BatchNorm1d(6))


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]  # torch's layers, seeded: the reference, and what is converted
    shape: tuple  # one sample: (C, *spatial)
    sizes: dict  # world size -> batch size of each rank
    dtype: torch.dtype = torch.float64
    channels_last: bool = False
    input_grad: bool = True
    via: str = "convert_sync_batchnorm"  # "convert": convert(model, sync=True); "ddp": in DDP too
    alone: bool = False  # each rank in a process group of its own
    out_shape: tuple = None  # one sample's output, if not `shape`


BN2D = functools.partial(layer, nn.BatchNorm2d, 4)
CASES = {
    "even_4d": Case(BN2D, (4, 5, 6), EVEN),
    "uneven_4d": Case(BN2D, (4, 5, 6), UNEVEN),
    "empty_rank_4d": Case(BN2D, (4, 5, 6), EMPTY_RANK),
    "all_empty": Case(BN2D, (4, 5, 6), {2: [0, 0], 3: [0, 0, 0]}),
    "uneven_2d": Case(functools.partial(layer, nn.BatchNorm1d, 6), (6,), UNEVEN),
    "empty_rank_2d_float32": Case(functools.partial(layer, nn.BatchNorm1d, 6), (6,), EMPTY_RANK,
                                  torch.float32),
    "momentum_none_3d": Case(functools.partial(layer, nn.BatchNorm1d, 5, momentum=None), (5, 7),
                             UNEVEN),
    "affine_false": Case(functools.partial(BN2D, affine=False), (4, 5, 6), EMPTY_RANK),
    "no_running_stats_no_bias": Case(
        functools.partial(BN2D, track_running_stats=False, bias=False), (4, 5, 6), UNEVEN),
    "channels_last_float32": Case(functools.partial(layer, nn.BatchNorm2d, 8), (8, 5, 6), EVEN,
                                  torch.float32, channels_last=True),
    "uneven_4d_bfloat16": Case(BN2D, (4, 5, 6), UNEVEN, torch.bfloat16),
    "input_without_grad": Case(BN2D, (4, 5, 6), UNEVEN, input_grad=False),
    "model_convert_sync": Case(small_model, (3, 5, 5), EMPTY_RANK, via="convert", out_shape=(6,)),
    # On the CPU, DistributedDataParallel refuses torch.nn.SyncBatchNorm, which ours is not.
    "model_ddp": Case(small_model, (3, 5, 5), UNEVEN, via="ddp", out_shape=(6,)),
    "group_of_one": Case(BN2D, (4, 5, 6), EVEN, alone=True),
}
SYNCED = [name for name, case in CASES.items() if not case.alone]


# ------------------------------------------------------------------- run here and on ranks

def batch(case, world, step, members):
    """(input, upstream gradient): the part of step's global batch that the ranks `members` hold."""
    sizes = case.sizes[world]
    gen = torch.Generator().manual_seed(100 * world + step)
    full = [torch.randn(sum(sizes), *shape, generator=gen, dtype=torch.float64)
            for shape in (case.shape, case.out_shape or case.shape)]
    bounds = [0, *itertools.accumulate(sizes)]
    x, g = (torch.cat([t[bounds[r]:bounds[r + 1]] for r in members]).to(case.dtype) for t in full)
    x = 2 * x + 3
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, g


def train(module, case, world, members):
    """STEPS training steps on the members' part of each batch; what they computed and left."""
    record = {"output": [], "grad_input": []}
    module.train()
    for step in range(STEPS):
        x, g = batch(case, world, step, members)
        x.requires_grad_(case.input_grad)
        out = module(x)
        (out * g).sum().backward()
        record["output"].append(out.detach())
        record["grad_input"].append(x.grad)
    module = getattr(module, "module", module)  # inside DistributedDataParallel: averaged grads
    record["grads"] = {name: p.grad.clone() for name, p in module.named_parameters()}
    record["buffers"] = {name: b.clone() for name, b in module.named_buffers()}
    return record


def evaluate(module, case, world, rank):
    """(output, grad_input) of one eval-mode step on rank's part of a batch, not communicating."""
    module.eval()
    x, g = batch(case, world, STEPS, [rank])
    x.requires_grad_()
    with no_communication():
        out = module(x)
        (out * g).sum().backward()
    return out.detach(), x.grad


@contextlib.contextmanager
def no_communication():
    """Any torch.distributed collective raises inside the block."""
    def refuse(*args, **kwargs):
        raise AssertionError("communicated")

    names = ["all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce", "broadcast"]
    with contextlib.ExitStack() as stack:
        for name in names:
            if hasattr(dist, name):
                stack.enter_context(mock.patch.object(dist, name, refuse))
        yield


def synchronized(case, group):
    module = case.build().to(case.dtype)
    if case.via == "convert":
        return modekernels.convert(module, sync=True, process_group=group)
    if case.via == "ddp":
        return nn.parallel.DistributedDataParallel(modekernels.convert(module, sync=True))
    return modekernels.SyncBatchNorm.convert_sync_batchnorm(module, group)


BAD_INPUTS = {  # name -> (input on `rank` of `world`, exception, part of its message[, layer eps[,
    # a running statistic made to require grad]])
    "1d": (lambda rank, world: torch.randn(4), ValueError,
           "expected at least 2D input (got 1D input)"),
    "no_channels": (lambda rank, world: torch.randn(3, 0), ValueError,
                    "SyncBatchNorm number of input channels should be non-zero"),
    "integer": (lambda rank, world: torch.ones(3, 4, dtype=torch.int64), TypeError,
                "to be float32, float64, float16 or bfloat16"),
    "one_value_in_all": (lambda rank, world: torch.randn(1 if rank == 0 else 0, 4), ValueError,
                         "Expected more than 1 value per channel when training"),
    "wrong_channels": (lambda rank, world: torch.randn(3, 5), RuntimeError,
                       "weight should contain 5 elements not 4"),
    "eps_zero": (lambda rank, world: torch.randn(3, 4), ValueError,
                 "batch_norm eps must be positive during training, but got 0", 0.0),
    "running_mean_requires_grad": (lambda rank, world: torch.randn(3, 4), RuntimeError,
                                   "not differentiable with respect to argument 'running_mean'",
                                   1e-5, "running_mean"),
}


def bad_inputs(rank, world):
    """{name: (exception raised, state unchanged)} for BAD_INPUTS, then one good step's output."""
    module = modekernels.SyncBatchNorm(4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    raised = {}
    for name, (make, _, _, *extra) in BAD_INPUTS.items():
        error = None
        module.eps = extra[0] if extra else 1e-5
        stat = extra[1] if len(extra) > 1 else None
        if stat:
            getattr(module, stat).requires_grad_()
        try:
            module(make(rank, world))
        except Exception as exc:  # compared with the expected one in the test
            error = exc
        if stat:
            getattr(module, stat).requires_grad_(False)
        after = module.state_dict()
        raised[name] = error, all(torch.equal(after[k], v) for k, v in before.items())
    module.eps = 1e-5
    x = torch.arange(12.0).reshape(3, 4) * (rank + 1)
    return raised, module(x).detach()


def collectives(input_grad):
    """Bytes handed to each collective in one training step of a float64 SyncBatchNorm(4)."""
    module = modekernels.SyncBatchNorm(4).double()
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=input_grad)
    with payloads() as sent:
        module(x).sum().backward()
    return sent


def worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    with process_group(rank, world, port, timeout_s=30):
        own = [dist.new_group([r]) for r in range(world)][rank]
        results = {}
        for name, case in CASES.items():
            module = synchronized(case, own if case.alone else None)
            with no_communication() if case.alone else contextlib.nullcontext():
                results[name] = train(module, case, world, [rank])
            results[name]["eval"] = evaluate(module, case, world, rank)
            results[name]["classes"] = sorted({type(m).__name__ for m in module.modules()})
        results["bad_inputs"] = bad_inputs(rank, world)
        results["payloads"] = [collectives(input_grad) for input_grad in (True, False)]
        torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    """(world size, what every rank saved)."""
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    spawn(worker, world, str(out_dir), timeout=180)  # TimeoutError if a collective hangs
    return world, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------------- tests

def close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **BN_TOL[dtype])


def compare(got, expected, case, rank, world):
    """got (one rank's record) against expected (a record of the batch `rows` come from)."""
    sizes = case.sizes[world]
    start = 0 if case.alone else sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    for key in ("output", "grad_input"):
        for step in range(STEPS):
            mine, theirs = got[key][step], expected[key][step]
            if case.input_grad or key == "output":
                close(mine, theirs[rows], case.dtype)
            else:
                assert mine is None and theirs is None
    assert got["buffers"].keys() == expected["buffers"].keys()
    for name, buffer in expected["buffers"].items():
        close(got["buffers"][name], buffer, case.dtype)


@pytest.mark.parametrize("name", SYNCED)
def test_matches_one_process_on_the_whole_batch(ranks, name):
    """Outputs and input gradients are the whole batch's rows; running statistics and
    num_batches_tracked are the whole batch's on every rank; parameter gradients are local
    and add up to the whole batch's."""
    world, results = ranks
    case = CASES[name]
    reference = case.build().to(case.dtype)
    expected = train(reference, case, world, range(world))
    for rank, saved in enumerate(results):
        got = saved[name]
        assert "SyncBatchNorm" in got["classes"]
        assert not {"BatchNorm1d", "BatchNorm2d"} & set(got["classes"])
        compare(got, expected, case, rank, world)
        eval_output, eval_grad = evaluate(reference, case, world, rank)  # local, no sync
        close(got["eval"][0], eval_output, case.dtype)
        close(got["eval"][1], eval_grad, case.dtype)
    for param, grad in expected["grads"].items():
        close(sum(saved[name]["grads"][param] for saved in results), grad, case.dtype)


def test_process_group_of_one_is_plain_batchnorm(ranks):
    world, results = ranks
    case = CASES["group_of_one"]
    for rank, saved in enumerate(results):
        reference = case.build().to(case.dtype)
        expected = train(reference, case, world, [rank])
        compare(saved["group_of_one"], expected, case, rank, world)
        for param, grad in expected["grads"].items():
            close(saved["group_of_one"]["grads"][param], grad, case.dtype)


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises_on_every_rank_and_changes_nothing(ranks, name):
    world, results = ranks
    _, exc_type, message, *_ = BAD_INPUTS[name]
    for saved in results:
        exc, unchanged = saved["bad_inputs"][0][name]
        assert type(exc) is exc_type and message in str(exc), exc
        assert unchanged


def test_one_collective_per_pass(ranks):
    """Forward: one all-gather of (count, mean, var) in float64; backward: one all-reduce of
    (sum dy, sum dy (x - mean)), left out when the input needs no gradient, as in torch."""
    world, results = ranks
    for saved in results:
        assert saved["payloads"] == [[(1 + 2 * 4) * 8, 2 * 4 * 8], [(1 + 2 * 4) * 8]]


def test_ranks_stay_in_step_after_bad_inputs(ranks):
    world, results = ranks
    whole = torch.cat([torch.arange(12.0).reshape(3, 4) * (r + 1) for r in range(world)])
    expected = nn.functional.batch_norm(whole, None, None, training=True)
    for rank, saved in enumerate(results):
        close(saved["bad_inputs"][1], expected[3 * rank:3 * rank + 3], torch.float32)


# --------------------------------------------------------------------- without a process group

def test_without_process_group_it_is_modekernels_batchnorm():
    assert not dist.is_initialized()
    ours = layer(modekernels.SyncBatchNorm, 4, momentum=None).double()
    plain = layer(modekernels.BatchNorm2d, 4, momentum=None).double()
    case = Case(None, (4, 5, 6), {1: [3]})
    with no_communication():
        got, expected = train(ours, case, 1, [0]), train(plain, case, 1, [0])
    for key in ("output", "grad_input"):
        assert all(map(torch.equal, got[key], expected[key]))
    for key in ("grads", "buffers"):
        assert all(torch.equal(got[key][k], expected[key][k]) for k in expected[key])
    assert all(map(torch.equal, evaluate(ours, case, 1, 0), evaluate(plain, case, 1, 0)))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "stats-only"])
def test_per_channel_tensors_checked_before_any_collective(affine):
    # A process whose input has another channel count must raise alone, before the all-gather:
    # its message would have another size than the others', which gloo answers by aborting.
    module = modekernels.SyncBatchNorm(4, affine=affine)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    sync = functools.partial(modekernels.distributed._sync_batch_norm, group=None)
    name = "weight" if affine else "running_mean"
    with no_communication(), pytest.raises(RuntimeError, match=f"^{name} should contain 5 elements not 4"):
        sync(torch.randn(3, 5), module.running_mean, module.running_var, module.weight,
             module.bias, True, 0.1, 1e-5, num_batches_tracked=module.num_batches_tracked)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


def test_fx_keeps_the_layer_whole_as_torchs():
    # As torch's SyncBatchNorm, a leaf module of the traced graph, which decides when it runs
    # whether to synchronize (tracing it under a process group used to raise).
    model = nn.Sequential(nn.Linear(3, 4), modekernels.SyncBatchNorm(4))
    traced = torch.fx.symbolic_trace(model)
    assert [(n.op, n.target) for n in traced.graph.nodes if n.op == "call_module"] == [
        ("call_module", "0"), ("call_module", "1")]
    x = torch.randn(6, 3)
    for mode in (True, False):
        model.train(mode), traced.train(mode)
        torch.testing.assert_close(traced(x), model(x))


def test_input_dimension_checked_like_torch():
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        modekernels.SyncBatchNorm(3)(torch.randn(3))


class WithQconfig(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), modekernels.BatchNorm1d(16), nn.SyncBatchNorm(16))
        self.fused = modekernels.BatchNormReLU2d(4)
        self.bn3d = nn.BatchNorm3d(2, affine=False)


def mixed_model():
    model = WithQconfig()
    model.features[1].qconfig = "qconfig"
    model.features[1].weight.requires_grad_(False)
    model.head[1].eval()
    model.head[2].momentum = None
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_()
            m.num_batches_tracked.fill_(3)
    return model


BATCHNORMS = ["features.1", "head.1", "head.2", "bn3d"]


def test_convert_sync_batchnorm_preserves_state_modes_and_attributes():
    model = mixed_model()
    state = model.state_dict(keep_vars=True)
    flags = modekernels.modes(model).training
    with pytest.warns(UserWarning, match="BatchNormReLU2d is left unsynchronized"):
        converted = modekernels.SyncBatchNorm.convert_sync_batchnorm(model, "group")
    modules = dict(converted.named_modules())
    assert all(type(modules[name]) is modekernels.SyncBatchNorm for name in BATCHNORMS)
    assert type(modules["fused"]) is modekernels.BatchNormReLU2d
    assert all(modules[name].process_group == "group" for name in BATCHNORMS)
    assert converted.state_dict(keep_vars=True).keys() == state.keys()
    assert all(v is state[k] for k, v in converted.state_dict(keep_vars=True).items())  # shared
    assert modekernels.modes(converted).training == flags
    assert modules["features.1"].qconfig == "qconfig"
    assert not modules["features.1"].weight.requires_grad
    assert modules["head.2"].momentum is None

    root = nn.BatchNorm1d(3)
    assert type(modekernels.SyncBatchNorm.convert_sync_batchnorm(root)) is modekernels.SyncBatchNorm


def test_convert_sync_in_place_and_revert():
    model = mixed_model()
    model.head[2].process_group = "its own"
    params = dict(model.named_parameters())
    state = model.state_dict()
    flags = modekernels.modes(model).training
    with pytest.warns(UserWarning, match="left these BatchNorm layers unsynchronized.*: fused$"):
        assert modekernels.convert(model, sync=True, process_group="group") is model
    modules = dict(model.named_modules())
    assert all(type(modules[name]) is modekernels.SyncBatchNorm for name in BATCHNORMS)
    assert [modules[name].process_group for name in BATCHNORMS] == [
        "group", "group", "its own", "group"]
    assert all(p is params[name] for name, p in model.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert modekernels.modes(model).training == flags

    modekernels.revert(model)
    assert all(type(modules[name]) is nn.SyncBatchNorm for name in BATCHNORMS)
    with pytest.raises(ValueError, match="process_group is only used with sync=True"):
        modekernels.convert(model, process_group="group")
    modekernels.convert(model)
    assert all(type(modules[name]) is modekernels.SyncBatchNorm for name in BATCHNORMS)


class ShiftedBatchNorm(nn.BatchNorm2d):
    def forward(self, input):
        return super().forward(input) + 1


def test_convert_sync_subclasses_pickle_and_revert():
    model = nn.Sequential(ShiftedBatchNorm(3))
    modekernels.convert(model, sync=True, subclasses=True)
    converted = model[0]
    assert isinstance(converted, ShiftedBatchNorm)
    assert isinstance(converted, modekernels.SyncBatchNorm)
    assert converted.process_group is None
    x = torch.randn(4, 3, 2, 2)
    close(converted(x), nn.functional.batch_norm(x, None, None, training=True) + 1, torch.float32)

    pickled = io.BytesIO()
    torch.save(model, pickled)
    loaded = torch.load(io.BytesIO(pickled.getvalue()), weights_only=False)
    assert type(loaded[0]) is type(converted)
    modekernels.revert(model)
    assert type(model[0]) is ShiftedBatchNorm


class ScaledSyncBatchNorm(nn.SyncBatchNorm):
    def forward(self, input):
        return super().forward(input) * 2


@pytest.mark.parametrize("sync", [False, True])
def test_convert_leaves_subclasses_of_torchs_syncbatchnorm_alone(sync):
    # Joined with ours, which is no subclass of torch's SyncBatchNorm (DistributedDataParallel
    # refuses those on the CPU), the subclass would reach torch's forward first.
    model = nn.Sequential(ScaledSyncBatchNorm(3), nn.SyncBatchNorm(3))
    modekernels.convert(model, sync=sync, subclasses=True)
    assert type(model[0]) is ScaledSyncBatchNorm and type(model[1]) is modekernels.SyncBatchNorm


def test_convert_sync_warns_of_subclasses_left_alone():
    model = nn.Sequential(ShiftedBatchNorm(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"unsynchronized .*: 0$"):
        modekernels.convert(model, sync=True)
    assert type(model[0]) is ShiftedBatchNorm and type(model[1]) is modekernels.SyncBatchNorm
