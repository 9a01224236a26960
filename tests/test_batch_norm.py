import copy
import functools
import io
import itertools
import re

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch._subclasses.fake_tensor import FakeTensorMode

import modekernels
import modekernels.functional as MF

from helpers import BN_TOL, DEVICES, FLOAT_DTYPES, batchnorm, cuda, dtype_id

mkops = torch.ops.modekernels

# (torch class, our class, input shape, memory formats that apply)
CASES = {
    "1d-NC": (torch.nn.BatchNorm1d, modekernels.BatchNorm1d, (16, 7), ["contiguous"]),
    # Rows of 4 KB or more: the CPU's channels-last passes take four rows at a time, with rows
    # left over in each thread's range.
    "1d-NC-wide": (torch.nn.BatchNorm1d, modekernels.BatchNorm1d, (50, 2048), ["contiguous"]),
    "1d-NCL": (torch.nn.BatchNorm1d, modekernels.BatchNorm1d, (4, 5, 13), ["contiguous", "strided"]),
    # Batch of 6: the CPU reductions read a channel's rows four at a time, with two rows left over.
    "2d": (torch.nn.BatchNorm2d, modekernels.BatchNorm2d, (6, 6, 7, 9), ["contiguous", "channels_last", "strided"]),
    "2d-C1": (torch.nn.BatchNorm2d, modekernels.BatchNorm2d, (3, 1, 5, 5), ["contiguous", "channels_last"]),
    # Rows of 3x3: the CPU walks channels-first memory with short rows as columns of channels-last;
    # of 5x5, only in its elementwise pass.
    "2d-short": (torch.nn.BatchNorm2d, modekernels.BatchNorm2d, (6, 5, 3, 3), ["contiguous", "strided"]),
    "2d-5x5": (torch.nn.BatchNorm2d, modekernels.BatchNorm2d, (4, 5, 5, 5), ["contiguous"]),
    # A channel count whose values the CPU's channels-last passes hold across rows.
    "2d-C64": (torch.nn.BatchNorm2d, modekernels.BatchNorm2d, (5, 64, 3, 7), ["channels_last"]),
    "3d": (torch.nn.BatchNorm3d, modekernels.BatchNorm3d, (2, 3, 4, 5, 6), ["contiguous", "channels_last", "strided"]),
}

VARIANTS = {
    "default": {},
    "no-affine": dict(affine=False),
    "no-bias": dict(bias=False),
    "momentum-None": dict(momentum=None),
    "momentum-0.3-eps-1e-3": dict(momentum=0.3, eps=1e-3),
    "untracked": dict(track_running_stats=False),
}

def layout(x, fmt):
    if fmt == "contiguous":
        return x.contiguous()
    if fmt == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if fmt == "strided":
        return torch.stack([x, x], dim=-1)[..., 1]
    raise ValueError(fmt)


def twin_modules(case, variant, device, param_dtype=torch.float32):
    theirs_cls, ours_cls, shape, _ = CASES[case]
    theirs = batchnorm(theirs_cls, shape[1], **VARIANTS[variant]).to(device=device, dtype=param_dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
        if theirs.running_mean is not None:
            theirs.running_mean.uniform_(-1, 1)
            theirs.running_var.uniform_(0.5, 2)
    ours = batchnorm(ours_cls, shape[1], **VARIANTS[variant]).to(device=device, dtype=param_dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_same_state(theirs, ours, tol):
    for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, **tol, msg=name)


def params_dtype_for(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cases_with_formats():
    return [pytest.param(c, f, id=f"{c}-{f}") for c, spec in CASES.items() for f in spec[3]]


# torch's CUDA BatchNorm runs cuDNN where it can and its own kernels otherwise: ours is compared
# with both ("cuda-native": cuDNN switched off).
BACKENDS = [*DEVICES, pytest.param("cuda-native", marks=cuda)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case,fmt", cases_with_formats())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_torch_over_steps_in_both_modes(backend, dtype, case, fmt, variant):
    with torch.backends.cudnn.flags(enabled=backend != "cuda-native"):
        matches_torch_over_steps(backend.removesuffix("-native"), dtype, case, fmt, variant)


def matches_torch_over_steps(device, dtype, case, fmt, variant):
    theirs, ours = twin_modules(case, variant, device, params_dtype_for(dtype))
    tol = BN_TOL[dtype]
    shape = CASES[case][2]
    for step in range(3):
        for module in (theirs, ours):
            module.train(step < 2)
        base = (torch.randn(shape, device=device) * 2 + 3).to(dtype)
        x_t = layout(base, fmt).requires_grad_()
        x_o = layout(base, fmt).requires_grad_()
        y_t, y_o = theirs(x_t), ours(x_o)
        torch.testing.assert_close(y_o, y_t, **tol)
        if fmt == "channels_last":
            cl = torch.channels_last if y_o.dim() == 4 else torch.channels_last_3d
            assert y_o.is_contiguous(memory_format=cl)
        grad = torch.randn_like(y_t)
        y_t.backward(grad)
        y_o.backward(grad)
        torch.testing.assert_close(x_o.grad, x_t.grad, **tol)
        for (name, p_t), (_, p_o) in zip(theirs.named_parameters(), ours.named_parameters()):
            torch.testing.assert_close(p_o.grad, p_t.grad, **tol, msg=name)
            p_t.grad = p_o.grad = None
        assert_same_state(theirs, ours, tol)


def every_dense_layout(shape):
    """x of `shape` in each order of its dimensions in memory, size-1 dimensions included, whose
    strides make the memory format ambiguous (pytorch/pytorch#63224)."""
    for order in itertools.permutations(range(len(shape))):
        yield torch.randn([shape[d] for d in order]).permute([order.index(d) for d in range(len(shape))])


@pytest.mark.parametrize("shape", [(2, 3, 4, 1), (1, 1, 4, 5), (2, 3, 1, 1), (1, 3, 4, 5, 1),
                                   (2, 3, 2, 1, 1)], ids=str)
def test_output_and_gradient_strides_are_torchs_in_every_dense_layout(shape):
    name = f"BatchNorm{len(shape) - 2}d"
    theirs, ours = getattr(torch.nn, name)(shape[1]), getattr(modekernels, name)(shape[1])
    mean, var = torch.zeros(shape[1]), torch.ones(shape[1])
    for x, training in itertools.product(every_dense_layout(shape), (True, False)):
        y_like = theirs.train(training)(x)
        for grad_layout in (y_like, x, y_like.contiguous()):
            grad = torch.randn_like(grad_layout)
            strides = []
            for module in (theirs, ours.train(training)):
                leaf = x.detach().requires_grad_()
                y = module(leaf)
                strides.append((y.stride(), torch.autograd.grad(y, leaf, grad)[0].stride()))
            assert strides[1] == strides[0], (x.stride(), grad.stride(), training)
            # The fake kernels (torch.compile's view of the ops) give the real ones' strides.
            backward_args = (grad, x, mean, var, None, 1e-5, training, [True, False, False])
            with FakeTensorMode(allow_non_fake_inputs=True):
                fake = (mkops.batch_norm_eval(x, mean, var, None, None, 1e-5).stride(),
                        mkops.batch_norm_backward(*backward_args)[0].stride())
            assert fake == (strides[1][0], strides[1][1]), (x.stride(), grad.stride(), training)


@pytest.mark.parametrize("shape", [(2, 3, 4, 1), (1, 3, 4, 5, 1), (2, 3, 2, 1, 1), (2, 9, 1, 2, 1)],
                         ids=str)
def test_gradients_do_not_depend_on_the_layout(shape):
    # torch's CPU backward (2.11, 2.14) gets some of these wrong, the weight's and bias's
    # gradients too: an input channels-last with a size-1 dimension, e.g. (2, 3, 4, 1) with
    # strides (12, 1, 3, 1), and a contiguous gradient. The reference is torch's on contiguous
    # float64 tensors.
    name = f"BatchNorm{len(shape) - 2}d"
    for x, training in itertools.product(every_dense_layout(shape), (True, False)):
        x = x.double()
        grad = torch.randn(shape, dtype=torch.float64)
        reference = x.contiguous().requires_grad_()
        theirs = getattr(torch.nn, name)(shape[1]).double().train(training)
        want = torch.autograd.grad(theirs(reference), (reference, theirs.weight, theirs.bias), grad)
        for grad_layout in (x, grad):
            ours = getattr(modekernels, name)(shape[1]).double().train(training)
            leaf = x.detach().requires_grad_()
            got = torch.autograd.grad(ours(leaf), (leaf, ours.weight, ours.bias),
                                      torch.empty_like(grad_layout).copy_(grad))
            torch.testing.assert_close(got, want, msg=lambda m: f"{m}\n{x.stride()}, {training}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "2d"])
def test_statistics_stay_accurate_with_a_large_mean(device, layout):
    # Each channel: mean 1e4 + c, std 1 + c / 8. The float32 sums of x or x^2 would lose the
    # variance; the reference is float64.
    shape = (4096, 8) if layout == "2d" else (64, 8, 32, 32)
    spread = torch.arange(8, device=device, dtype=torch.float64).reshape(8, *[1] * (len(shape) - 2))
    x = torch.randn(shape, device=device, dtype=torch.float64) * (1 + spread / 8) + 1e4 + spread
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    cls = (modekernels.BatchNorm1d, torch.nn.BatchNorm1d) if layout == "2d" else (
        modekernels.BatchNorm2d, torch.nn.BatchNorm2d)
    ours, reference = cls[0](8).to(device), cls[1](8).to(device).double()
    ours(x.float())
    reference(x)
    torch.testing.assert_close(ours.running_var, reference.running_var.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.running_mean, reference.running_mean.float(), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "2d"])
def test_statistics_stay_accurate_over_long_rows_and_few_channels(device, layout):
    # 2^21 float32 values a channel, in rows of 2^20 (channels-first) or two channels a row: float
    # sums that long would be 1e-4 off; the reference is float64 on the same values.
    shape = (2**21, 2) if layout == "2d" else (2, 2, 1024, 1024)
    x = torch.randn(shape, device=device) * 3 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    cls = (modekernels.BatchNorm1d, torch.nn.BatchNorm1d) if layout == "2d" else (
        modekernels.BatchNorm2d, torch.nn.BatchNorm2d)
    ours, reference = cls[0](2, momentum=1.0).to(device), cls[1](2, momentum=1.0).to(device).double()
    ours(x)
    reference(x.double())
    torch.testing.assert_close(ours.running_var, reference.running_var.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.running_mean, reference.running_mean.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_batch_behaves_like_torch(device):
    theirs, ours = twin_modules("2d", "default", device)
    x = torch.randn(0, 6, 7, 9, device=device, requires_grad=True)
    y_t, y_o = theirs(x), ours(x)
    assert y_o.shape == y_t.shape
    y_o.sum().backward()
    assert x.grad.shape == x.shape
    assert_same_state(theirs, ours, BN_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_layer_of_zero_channels_returns_an_empty_output(device, training):
    # torch's own layer raises an IndexError from inside its CPU kernel here (README).
    ours = modekernels.BatchNorm2d(0).to(device).train(training)
    x = torch.randn(2, 0, 3, 3, device=device, requires_grad=True)
    y = ours(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert ours.num_batches_tracked.item() == int(training)


def test_momentum_none_is_cumulative_average_without_float_on_the_counter(monkeypatch):
    theirs, ours = twin_modules("2d", "momentum-None", "cpu")
    calls = []
    original = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: calls.append(t) or original(t))
    for _ in range(4):
        ours(torch.randn(4, 6, 7, 9))
    assert calls == []
    monkeypatch.undo()
    torch.manual_seed(0)
    xs = [torch.randn(4, 6, 7, 9) for _ in range(4)]
    theirs.reset_running_stats()
    ours.reset_running_stats()
    for x in xs:
        theirs(x)
        ours(x)
    assert_same_state(theirs, ours, BN_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_momentum_none_takes_a_counter_of_any_integer_dtype(device):
    # torch's layer adds 1 to the counter and divides by it, whatever its dtype; our kernels read
    # it as int64, so another dtype is converted for them rather than refused.
    theirs, ours = twin_modules("2d", "momentum-None", device)
    for m in (theirs, ours):
        m.num_batches_tracked = torch.tensor(0, dtype=torch.int32, device=device)
    for _ in range(3):
        x = torch.randn(4, 6, 7, 9, device=device)
        theirs(x)
        ours(x)
    assert ours.num_batches_tracked.dtype == torch.int32
    assert_same_state(theirs, ours, BN_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(64, 24, 1), (64, 24, 1, 1), (16, 24, 1, 1, 1)], ids=str)
def test_one_element_per_sample_and_channel_runs_as_the_2d_input(device, shape):
    # (N, C, 1...) holds its channels innermost like (N, C): the kernels walk both alike (same
    # bits), where read channel by channel every row would be one element long.
    x = torch.randn(shape, device=device, requires_grad=True)
    x2 = x.detach().flatten(1).requires_grad_()
    grad = torch.randn(shape, device=device)
    outs = []
    for inp, g in ((x, grad), (x2, grad.flatten(1))):
        rm, rv = torch.zeros(24, device=device), torch.ones(24, device=device)
        y = MF.batch_norm_relu(inp, rm, rv, training=True)
        y.backward(g)
        outs.append([y.flatten(1), rm, rv, inp.grad.flatten(1)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    reference = torch.relu(torch.nn.functional.batch_norm(x.detach(), None, None, training=True))
    torch.testing.assert_close(outs[0][0], reference.flatten(1), **BN_TOL[torch.float32])


def test_functional_matches_torch():
    x = torch.randn(8, 4, 5, 5)
    rm, rv = torch.zeros(4), torch.ones(4)
    rm2, rv2 = rm.clone(), rv.clone()
    w, b = torch.rand(4), torch.rand(4)
    for training in (True, False):
        y_t = torch.nn.functional.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-3)
        y_o = MF.batch_norm(x, rm2, rv2, w, b, training, 0.2, 1e-3)
        torch.testing.assert_close(y_o, y_t)
        torch.testing.assert_close(rm2, rm)
        torch.testing.assert_close(rv2, rv)


def test_module_is_a_torch_batchnorm_and_checkpoints_cross_load():
    for name, (theirs_cls, ours_cls, shape, _) in CASES.items():
        theirs, ours = (batchnorm(cls, shape[1], momentum=None, bias=False) for cls in (theirs_cls, ours_cls))
        assert isinstance(ours, theirs_cls)
        assert repr(ours) == repr(theirs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        theirs(torch.randn(shape))
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        assert_same_state(theirs, ours, BN_TOL[torch.float32])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), modekernels.BatchNorm2d(4))
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(synced[1], torch.nn.SyncBatchNorm)
    torch.testing.assert_close(synced[1].running_var, model[1].running_var)


# ------------------------------------------------------------------------------- errors

def state_of(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


ERRORS = {
    "3d-input-to-2d": (torch.nn.BatchNorm2d, (4, 6, 7), ValueError, r"expected 4D input \(got 3D input\)"),
    "wrong-channels": (torch.nn.BatchNorm2d, (4, 5, 7, 7), RuntimeError, "should contain 5 elements not 6"),
    "empty-batch-wrong-channels": (torch.nn.BatchNorm2d, (0, 5, 7, 7), RuntimeError, "should contain 5 elements not 6"),
    "one-value-per-channel": (torch.nn.BatchNorm1d, (1, 6), ValueError,
                              re.escape("Expected more than 1 value per channel when training, got input size torch.Size([1, 6])")),
    "integer-input": (torch.nn.BatchNorm2d, (4, 6, 3, 3), TypeError, "float32, float64, float16 or bfloat16"),
}


@pytest.mark.parametrize("error", list(ERRORS))
def test_errors_are_clear_and_change_nothing(error):
    torch_cls, shape, exc, match = ERRORS[error]
    ours_cls = {torch.nn.BatchNorm1d: modekernels.BatchNorm1d, torch.nn.BatchNorm2d: modekernels.BatchNorm2d}[torch_cls]
    ours = ours_cls(6)
    ours(torch.randn((4, 6) + (() if torch_cls is torch.nn.BatchNorm1d else (3, 3))))
    before = state_of(ours)
    x = torch.ones(shape, dtype=torch.int64) if error == "integer-input" else torch.randn(shape)
    with pytest.raises(exc, match=match):
        ours(x)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("missing", ["running_mean", "running_var", "both"])
@pytest.mark.parametrize("batch", [0, 2])
def test_eval_without_running_stats_is_an_error_unless_the_batch_is_empty(missing, batch):
    # torch's batch_norm returns an empty input (times weight, plus bias) before it looks at
    # the running statistics; any other eval call needs both.
    x = torch.randn(batch, 3, 4)
    stats = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    for name in stats:
        if missing in (name, "both"):
            stats[name] = None
    results = []
    for fn in (torch.nn.functional.batch_norm, modekernels.functional.batch_norm):
        weight = torch.ones(3, requires_grad=True)
        try:
            y = fn(x, stats["running_mean"], stats["running_var"], weight, torch.zeros(3))
        except RuntimeError as e:
            results.append(str(e))
            continue
        results.append((y.shape, y.stride(), torch.autograd.grad(y.sum(), weight)[0]))
    if batch:
        first = "running_var" if missing == "running_var" else "running_mean"
        assert results[0] == results[1] == f"{first} must be defined in evaluation mode"
    else:
        assert results[1][:2] == results[0][:2] == (x.shape, x.stride())
        torch.testing.assert_close(results[1][2], results[0][2])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False], ids=["tracking", "not-tracking"])
@pytest.mark.parametrize("stats", ["kept", "removed"])
def test_attributes_set_after_construction_behave_as_torch(training, momentum, track, stats):
    # Scripts set these on built layers (freezing, converting checkpoints). With statistics
    # removed but tracking on, torch's layer still counts training calls.
    results = []
    for cls in (torch.nn.BatchNorm1d, modekernels.BatchNorm1d):
        torch.manual_seed(0)
        m = cls(3).train(training)
        m.track_running_stats, m.momentum = track, momentum
        if stats == "removed":
            m.running_mean = m.running_var = None
        x = torch.randn(5, 3)
        results.append((m(x), m(2 * x), state_of(m)))
    torch.testing.assert_close(results[1], results[0])


def test_a_graph_from_eval_mode_backpropagates_after_a_training_step_as_torch():
    # torch's layer updates its running statistics without bumping their version counters, so a
    # graph that saved them in eval mode still runs its backward (a consistency loss between the
    # modes of one model); ours must not refuse it either.
    grads = []
    for cls in (torch.nn.BatchNorm1d, modekernels.BatchNorm1d):
        torch.manual_seed(0)
        m = cls(3).eval()
        x = torch.randn(4, 3, requires_grad=True)
        in_eval = m(x)
        m.train()
        (in_eval.sum() + m(torch.randn(4, 3)).sum()).backward()
        grads.append((x.grad, m.weight.grad))
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("training", [None, 1, np.bool_(True)], ids=repr)
def test_training_that_is_not_a_bool_is_torch_type_error_and_changes_nothing(training):
    x = torch.randn(4, 3)
    stats = [torch.zeros(3), torch.ones(3)]
    with pytest.raises(TypeError) as theirs:
        torch.nn.functional.batch_norm(x, *stats, training=training)
    for fn in (MF.batch_norm, lambda *a, **k: MF.batch_norm_add_relu(x, x, *a[1:], **k)):
        with pytest.raises(TypeError, match=re.escape(str(theirs.value))):
            fn(x, *stats, training=training)
    assert torch.equal(stats[0], torch.zeros(3)) and torch.equal(stats[1], torch.ones(3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_momentum_none_without_a_counter_is_torch_type_error_in_both_modes(training):
    # The cumulative average is our functional's extension for callers that pass the counter;
    # without it, None is refused as torch's parser refuses it, before anything runs.
    x = torch.randn(4, 3)
    stats = [torch.zeros(3), torch.ones(3)]
    with pytest.raises(TypeError) as theirs:
        torch.nn.functional.batch_norm(x, *stats, training=training, momentum=None)
    for fn in (MF.batch_norm, MF.batch_norm_relu):
        with pytest.raises(TypeError, match=f"^{re.escape(str(theirs.value))}$"):
            fn(x, *stats, training=training, momentum=None)
    assert torch.equal(stats[0], torch.zeros(3)) and torch.equal(stats[1], torch.ones(3))


@pytest.mark.parametrize("momentum", ["0.1", [0.1], torch.tensor([0.1]),
                                      torch.tensor(0.1, requires_grad=True), re.compile("0.1")],
                         ids=repr)
def test_momentum_or_eps_that_is_not_a_float_is_torch_type_error_and_changes_nothing(momentum):
    # Refused before any statistics are computed, by BatchNorm, the fused op and SyncBatchNorm's
    # path (whose group is not reached).
    x = torch.randn(4, 3)
    stats, counter = [torch.zeros(3), torch.ones(3)], torch.tensor(0)
    with pytest.raises(TypeError) as theirs:
        torch.nn.functional.batch_norm(x, *stats, training=True, momentum=momentum)
    sync = functools.partial(modekernels.distributed._sync_batch_norm, group=None)
    for fn in (MF.batch_norm, lambda *a, **k: MF.batch_norm_add_relu(x, x, *a[1:], **k),
               lambda *a, **k: sync(*a, None, None, True, k["momentum"], k.get("eps", 1e-5),
                                    num_batches_tracked=counter)):
        with pytest.raises(TypeError, match=re.escape(str(theirs.value))):
            fn(x, *stats, training=True, momentum=momentum, num_batches_tracked=counter)
        # torch's functional compares eps with 0 in Python before its parser sees it
        with pytest.raises(TypeError, match=r"^batch_norm\(\): argument 'eps' \(position 8\) must "
                                            r"be float, not (str|list|Tensor|re\.Pattern)$"):
            fn(x, *stats, training=True, momentum=0.1, eps=momentum, num_batches_tracked=counter)
    assert torch.equal(stats[0], torch.zeros(3)) and torch.equal(stats[1], torch.ones(3))
    assert counter.item() == 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["input", "weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("value", [[1.0, 2.0, 3.0], np.ones(3, dtype=np.float32), 1.0],
                         ids=["list", "ndarray", "float"])
def test_tensor_argument_that_is_not_a_tensor_is_torch_type_error_and_changes_nothing(training, name,
                                                                                      value):
    # torch's argument parser names it (torch's functional, in training, trips over a non-tensor
    # input first with an AttributeError; ours gives the parser's error in both modes). The fused
    # ops and SyncBatchNorm's path (training; its group is not reached) check alike.
    x = torch.randn(4, 3)
    args = dict(input=x, running_mean=torch.zeros(3), running_var=torch.ones(3),
                weight=torch.ones(3), bias=torch.zeros(3))
    running_mean, running_var = args["running_mean"], args["running_var"]
    args[name] = value
    with pytest.raises(TypeError) as theirs:
        torch.nn.functional.batch_norm(**args, training=False)
    counter = torch.tensor(0)
    sync = functools.partial(modekernels.distributed._sync_batch_norm, group=None, momentum=0.1,
                             eps=1e-5)
    calls = [MF.batch_norm, MF.batch_norm_relu,
             lambda input, *a, **k: MF.batch_norm_add_relu(input, x, *a, **k)]
    calls += [sync] if training else []
    for fn in calls:
        with pytest.raises(TypeError, match=re.escape(str(theirs.value))):
            fn(args["input"], args["running_mean"], args["running_var"], args["weight"], args["bias"],
               training=training, num_batches_tracked=counter)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))
    assert counter.item() == 0
    with pytest.raises(TypeError, match=r"^batch_norm_add_relu\(\): argument 'residual' \(position 2\) "
                                        r"must be Tensor, not list$"):
        MF.batch_norm_add_relu(x, [1.0], torch.zeros(3), torch.ones(3), training=training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("given", ["mean", "var", "neither"])
def test_missing_running_statistics_are_torch_errors(training, given):
    x = torch.randn(4, 3)
    stats = (torch.zeros(3) if given == "mean" else None, torch.ones(3) if given == "var" else None)
    if training and given == "neither":  # batch statistics, nothing to update
        torch.testing.assert_close(MF.batch_norm(x, *stats, training=True),
                                   torch.nn.functional.batch_norm(x, *stats, training=True))
        return
    with pytest.raises(Exception) as theirs:
        torch.nn.functional.batch_norm(x, *stats, training=training)
    with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
        MF.batch_norm(x, *stats, training=training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_statistics_requiring_grad_are_torch_errors_and_change_nothing(training, name):
    # torch's autograd refuses them in both modes; under no_grad both take them.
    x = torch.randn(4, 3)
    layers = []
    for cls in (torch.nn.BatchNorm1d, modekernels.BatchNorm1d):
        m = cls(3).train(training)
        getattr(m, name).requires_grad_()
        layers.append(m)
    theirs, ours = layers
    with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{name}'"):
        theirs(x)
    before = state_of(ours)
    with pytest.raises(RuntimeError, match=re.escape(f"The function 'batch_norm' is not differentiable "
                                                     f"with respect to argument '{name}'. This input "
                                                     f"cannot have requires_grad True.")):
        ours(x)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    theirs.num_batches_tracked.zero_()  # torch counts the call before its autograd refuses it
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(state_of(ours), state_of(theirs))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", ["input", "weight", "none", "no_grad"])
@pytest.mark.parametrize("cls", [modekernels.BatchNorm2d, modekernels.BatchNormReLU2d])
def test_running_statistics_from_inference_mode_are_torch_errors_where_autograd_records(training, grad,
                                                                                      cls):
    # torch's autograd saves the running statistics in both modes, so it refuses inference tensors
    # whenever it records the call (input, weight or bias requiring grad, grad mode on), before its
    # kernel updates them; elsewhere both update them (training) or read them (eval).
    x = torch.randn(4, 3, 5, 5, requires_grad=grad == "input")
    mean, var = torch.rand(3), torch.rand(3) + 0.5
    layers = []
    for layer in (torch.nn.BatchNorm2d(3), cls(3)):
        layer.train(training).requires_grad_(grad == "weight")
        with torch.inference_mode():
            layer.running_mean, layer.running_var = mean.clone(), var.clone()
        layers.append(layer)
    theirs, ours = layers
    with torch.set_grad_enabled(grad != "no_grad"):
        if grad in ("input", "weight"):
            with pytest.raises(RuntimeError) as their_error:
                theirs(x)
            assert "Inference tensors cannot be saved for backward" in str(their_error.value)
            before = state_of(ours)
            with pytest.raises(RuntimeError, match=re.escape(str(their_error.value))):
                ours(x)
            for k, v in ours.state_dict().items():  # torch counts the call before it refuses it
                assert torch.equal(v, before[k]), k
        else:
            pre = theirs(x)
            fused = cls is modekernels.BatchNormReLU2d
            torch.testing.assert_close(ours(x), torch.relu(pre) if fused else pre)
            torch.testing.assert_close(state_of(ours), state_of(theirs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", ["plain", "add-relu"])
def test_per_channel_tensors_may_be_views(device, training, fused):
    # Weight, bias and running statistics as strided views (every other element of a larger
    # tensor), and an expanded one: read as torch reads them, running statistics updated through
    # the views into their base tensors.
    x = torch.randn(4, 3, 5, 5, device=device)
    r = torch.randn_like(x)
    params = [torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)]
    stats = [torch.randn(6, device=device), torch.rand(6, device=device) + 0.5]
    pair = ((torch.nn.functional.batch_norm, MF.batch_norm) if fused == "plain" else
            (lambda *a: torch.relu(torch.nn.functional.batch_norm(*a) + r),
             lambda *a: MF.batch_norm_add_relu(a[0], r, *a[1:])))
    results = []
    for fn in pair:
        w, b = (t.clone().requires_grad_() for t in params)
        rm, rv = (t.clone() for t in stats)
        y = fn(x, rm[::2], rv[::2], w[::2], b[1::2], training)
        y.pow(2).sum().backward()
        expanded = fn(x, None, None, torch.tensor(1.5, device=device).expand(3), None, True)
        results.append((y, expanded, w.grad, b.grad, rm, rv))
    torch.testing.assert_close(results[1], results[0], **BN_TOL[torch.float32])


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_expanded_running_statistics_raise_in_training_before_anything_changes(which):
    # One element for several channels cannot take their updates: torch's error for a write into
    # such a tensor, before the other statistic or the counter changes. Eval reads them.
    module = modekernels.BatchNorm1d(3)
    setattr(module, which, torch.ones(1).expand(3))
    before = [t.clone() for t in module.buffers()]
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        module(torch.randn(8, 3))
    assert all(torch.equal(a, b) for a, b in zip(module.buffers(), before))
    module.eval()(torch.randn(8, 3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("eps", [-1.0, 0.0, float("nan")], ids=str)
def test_eps_is_checked_as_torch_checks_it(training, eps):
    # As torch 2.14 checks it: eps <= 0 raises in training, eps < 0 in eval, and a NaN eps passes
    # and gives NaN outputs. (torch 2.11 raised for eps <= 0 in eval too, worded "batch_norm eps
    # must be positive, but got ...", so the expectations are written out here.)
    theirs, ours = twin_modules("2d", "default", "cpu")
    for m in (theirs, ours):
        m.eps = eps
        m.train(training)
    x = torch.randn(4, 6, 7, 9)
    if eps < 0 or (training and eps == 0):
        wanted = "positive during training" if training else "non-negative"
        before = state_of(ours)
        with pytest.raises(ValueError, match=re.escape(f"batch_norm eps must be {wanted}, but got {eps}")):
            ours(x)
        assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
        return
    if training:  # a NaN eps, which every torch takes
        expected = theirs(x)
    else:
        per_channel = [t.view(1, -1, 1, 1) for t in (ours.running_mean, ours.running_var, ours.weight, ours.bias)]
        mean, var, weight, bias = per_channel
        expected = (x - mean) / torch.sqrt(var + eps) * weight + bias
    torch.testing.assert_close(ours(x), expected, equal_nan=True, **BN_TOL[torch.float32])
    assert_same_state(theirs, ours, {**BN_TOL[torch.float32], "equal_nan": True})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [-0.5, 0.0, 1.0, 1.5, float("inf"), float("nan")], ids=str)
def test_any_momentum_updates_the_running_statistics_as_torch(device, momentum):
    # Every float is a momentum to torch. The kernels once took a negative or NaN one for
    # momentum=None's cumulative average (silently, with the module's counter).
    theirs, ours = twin_modules("2d", "default", device)
    theirs.momentum = ours.momentum = momentum
    for _ in range(2):
        x = torch.randn(4, 6, 7, 9, device=device)
        torch.testing.assert_close(ours(x), theirs(x), **BN_TOL[torch.float32])
    assert_same_state(theirs, ours, {**BN_TOL[torch.float32], "equal_nan": True})


@pytest.mark.parametrize("counted", [False, True], ids=["momentum", "cumulative"])
def test_cpu_update_rounds_once_from_double_as_torchs(counted):
    # torch's CPU kernel updates float32 statistics with its double momentum: one rounding. A
    # float32 update (ours until 2026-12-06) was up to a few ulp off where the terms cancel.
    C, count = 4096, 8
    mean, var = torch.randn(C) * 1e4, torch.rand(C) * 10
    running_mean, running_var = torch.randn(C) * 5e3, torch.rand(C)
    factor = 1 / 3 if counted else 0.3
    expected_mean = (factor * mean.double() + (1 - factor) * running_mean.double()).float()
    expected_var = (factor * var.double() * count / (count - 1) + (1 - factor) * running_var.double()).float()
    mkops.batch_norm_update_stats_(running_mean, running_var, mean, var, count, None if counted else factor,
                                   torch.tensor(2) if counted else None)
    assert torch.equal(running_mean, expected_mean) and torch.equal(running_var, expected_var)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["weight", "running_mean", "running_var"])
def test_a_per_channel_tensor_of_two_dimensions_is_named_and_changes_nothing(training, name):
    tensors = dict(running_mean=torch.zeros(6), running_var=torch.ones(6), weight=torch.ones(6))
    tensors[name] = tensors[name].view(2, 3)
    before = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises(RuntimeError, match=rf"expected {name} to be 1-D, but got shape \[2, 3\]"):
        MF.batch_norm(torch.randn(4, 6), training=training, **tensors)
    assert all(torch.equal(v, before[k]) for k, v in tensors.items())


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_raw_ops_name_a_required_tensor_given_as_none(device):
    x = torch.randn(4, 3, device=device)
    stats = torch.zeros(3, device=device), torch.ones(3, device=device)
    calls = {"running_mean": lambda: mkops.batch_norm_eval(x, None, stats[1], None, None, 1e-5),
             "mean": lambda: mkops.batch_norm_update_stats_(*stats, None, stats[1], 4, 0.1, None),
             "grad_output": lambda: mkops.batch_norm_grad_sums(None, x, stats[0]),
             "input": lambda: mkops.batch_norm_train(None, stats[0], None, 1e-5)}
    for name, call in calls.items():
        if device == "meta" and name not in ("input", "mean"):
            continue  # the fake kernels check the tensor the others are compared with
        with pytest.raises(TypeError, match=f"expected {name} to be a Tensor, but got None"):
            call()


def test_mismatched_param_dtype_is_an_error():
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(TypeError, match="expected weight to be Float"):
        mkops.batch_norm_train(x, torch.ones(3, dtype=torch.float64), None, 1e-5)
    with pytest.raises(TypeError, match="expected running_mean to be Double"):
        mkops.batch_norm_eval(x.double(), torch.zeros(3), torch.ones(3, dtype=torch.float64), None, None, 1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32), (torch.float32, torch.float16),
                                    (torch.bfloat16, torch.float16), (torch.float16, torch.float64)],
                         ids=lambda d: f"{d[0]}-stats-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("cls", [modekernels.BatchNorm1d, modekernels.BatchNormReLU1d])
def test_running_stats_of_another_dtype_are_an_error_and_change_nothing(training, dtypes, cls):
    # torch's CPU layer refuses them in both modes ("mixed dtype (CPU)"); ours names the one
    # that is wrong, with the same TypeError in both modes (in training, before the update op,
    # which would write statistics of any floating dtype). affine=False: no weight to trip first.
    x_dtype, stats_dtype = dtypes
    x = torch.randn(4, 3, dtype=x_dtype)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        torch.nn.BatchNorm1d(3, affine=False).to(stats_dtype).train(training)(x)
    module = cls(3, affine=False).to(stats_dtype).train(training)
    before = state_of(module)
    wanted = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half or float32",
              torch.bfloat16: "BFloat16 or float32"}[x_dtype]
    got = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half"}[stats_dtype]
    with pytest.raises(TypeError, match=f"^modekernels batch_norm: expected running_mean to be "
                                        f"{wanted} like input, but got {got}$"):
        module(x)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ["bn", "bn-relu", "bn-add-relu-meta-residual"])
def test_meta_input_beside_cpu_tensors_is_an_error_and_changes_nothing(training, case):
    # Meta (and fake) tensors reach the fake kernels, which check devices as the kernels do.
    cls = {"bn": modekernels.BatchNorm2d, "bn-relu": modekernels.BatchNormReLU2d,
           "bn-add-relu-meta-residual": modekernels.BatchNormAddReLU2d}[case]
    module = cls(3).train(training)
    before = state_of(module)
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match="on (meta|cpu) like input, but got (cpu|meta)"):
        if case.startswith("bn-add-relu"):
            module(x, torch.empty_like(x, device="meta"))
        else:
            module(x.to("meta"))
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    meta = cls(3, device="meta").train(training)  # all on meta: shapes only, as torch's
    y = meta(x.to("meta"), x.to("meta")) if case.startswith("bn-add-relu") else meta(x.to("meta"))
    assert y.device.type == "meta" and y.shape == x.shape


@cuda
def test_device_mismatch_is_an_error():
    with pytest.raises(RuntimeError, match="weight on cuda"):
        mkops.batch_norm_train(torch.randn(4, 3, 5, 5, device="cuda"), torch.ones(3), None, 1e-5)


# ---------------------------------------------------------------------- torch integration

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_gradcheck_and_gradgradcheck_float64(training, affine):
    C = 3
    x = torch.randn(4, C, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(C, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.rand(C, dtype=torch.float64, requires_grad=True) if affine else None
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return MF.batch_norm(x, None if training else rm, None if training else rv, w, b, training)

    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_fwd_over_rev=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case,fmt", [("2d", "contiguous"), ("2d", "channels_last"), ("1d-NC", "contiguous")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_matches_torch(device, dtype, case, fmt, training):
    # A gradient penalty: the gradient of a loss on the input gradient, taken with create_graph.
    theirs, ours = twin_modules(case, "default", device, params_dtype_for(dtype))
    base = (torch.randn(CASES[case][2], device=device) * 2 + 3).to(dtype)
    weights = torch.randn(CASES[case][2], device=device).to(dtype)  # a loss with a non-zero grad
    results = []
    for module in (theirs, ours):
        module.train(training)
        x = layout(base, fmt).requires_grad_()
        (grad_x,) = torch.autograd.grad((module(x) * weights).pow(2).sum(), x, create_graph=True)
        penalty = grad_x.float().pow(2).sum()
        results.append(torch.autograd.grad(penalty, [x, *module.parameters()]))
    for name, ours_grad, theirs_grad in zip(["input", "weight", "bias"], *reversed(results)):
        scale = theirs_grad.abs().max().item()
        torch.testing.assert_close(ours_grad / scale, theirs_grad / scale, **BN_TOL[dtype], msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_through_the_module_matches_torch(device, training):
    # Tangents (torch.autograd.forward_ad) of the output, and the running statistics as usual.
    theirs, ours = twin_modules("2d", "default", device)
    base = torch.randn(CASES["2d"][2], device=device) * 2 + 3
    tangent = torch.randn_like(base)
    results = []
    for module in (theirs, ours):
        module.train(training)
        with fwAD.dual_level():
            results.append(tuple(fwAD.unpack_dual(module(fwAD.make_dual(base, tangent)))))
    torch.testing.assert_close(results[1], results[0], **BN_TOL[torch.float32])
    assert_same_state(theirs, ours, BN_TOL[torch.float32])
    if not training:  # torch.func's forward-mode transforms take the same path (in training,
        # torch's module updates captured buffers, which they refuse)
        jacobians = [torch.func.jacfwd(lambda t: m(t)[:1, :2])(base[:2]) for m in (theirs, ours)]
        torch.testing.assert_close(jacobians[1], jacobians[0], **BN_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inference_mode_matches_torch(device, training):
    # Under torch.inference_mode autograd is off entirely; a training step still updates the
    # running statistics, as torch's module does.
    theirs, ours = twin_modules("2d", "default", device)
    x = torch.randn(CASES["2d"][2], device=device)
    outputs = []
    for module in (theirs, ours):
        module.train(training)
        with torch.inference_mode():
            outputs.append(module(x))
    assert outputs[1].is_inference()
    torch.testing.assert_close(outputs[1], outputs[0], **BN_TOL[torch.float32])
    assert_same_state(theirs, ours, BN_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_raw_ops_carry_a_tangent(device):
    # Forward-mode AD through the ops themselves (torch.ops.modekernels), against torch's.
    x, tangent = torch.randn(4, 3, 5, device=device), torch.randn(4, 3, 5, device=device)
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    stats = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        calls = [(torch.ops.modekernels.batch_norm_train(dual, w, b, 1e-5)[0],
                  torch.nn.functional.batch_norm(dual, None, None, w, b, True)),
                 (torch.ops.modekernels.batch_norm_eval(dual, *stats, w, b, 1e-5),
                  torch.nn.functional.batch_norm(dual, *stats, w, b))]
        for ours, theirs in calls:
            torch.testing.assert_close(fwAD.unpack_dual(ours), fwAD.unpack_dual(theirs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
def test_hessian_vector_products_in_training_are_torchs(device, relu):
    # Forward-over-reverse, as Hessian-vector products take it: a tangent through the gradient of
    # a training-mode loss, by torch.func (jvp of grad) and by forward_ad around autograd.grad.
    # Tangents on input, weight and bias, so the batch statistics' dependence on the input counts.
    def loss(fn, x, w, b):
        y = fn(x, None, None, w, b, training=True)
        return (torch.relu(y) if fn is torch.nn.functional.batch_norm and relu else y).pow(3).sum()

    ours = MF.batch_norm_relu if relu else MF.batch_norm
    primals = (torch.randn(4, 3, 5, 5, device=device, dtype=torch.float64) * 2 + 1,
               torch.rand(3, device=device, dtype=torch.float64) + 0.5,
               torch.randn(3, device=device, dtype=torch.float64))
    tangents = tuple(torch.randn_like(t) for t in primals)
    results = []
    for fn in (torch.nn.functional.batch_norm, ours):
        grads = torch.func.grad(lambda *p: loss(fn, *p), argnums=(0, 1, 2))
        by_func = torch.func.jvp(grads, primals, tangents)[1]
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p.clone().requires_grad_(), t) for p, t in zip(primals, tangents)]
            by_forward_ad = [fwAD.unpack_dual(g).tangent
                             for g in torch.autograd.grad(loss(fn, *duals), duals, create_graph=True)]
        results.append((*by_func, *by_forward_ad))
    assert all(r.abs().max() > 0 for r in results[0])
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape,fmt", [((4, 3, 5), "contiguous"), ((4, 3, 5000), "contiguous"),
                                       ((64, 3), "contiguous"), ((8, 3, 4, 4), "channels_last")])
def test_nan_and_inf_inputs_propagate_like_torch(device, value, shape, fmt):
    # One non-finite input makes its channel's variance NaN (inf - inf), and with it the output
    # and running_var, as in torch; an infinite one leaves the mean (and running_mean) infinite.
    # The other channels are untouched. On the CPU also where the value opens its channel (the
    # shift of the CPU's shifted sums) and with more threads than channels (partial moments
    # merged).
    for at, threads in [(7, None)] + ([(0, None), (7, 4), (0, 4)] if device == "cpu" else []):
        base = torch.randn(shape, device=device)
        base.view(-1)[at] = float(value)
        x = layout(base, fmt)
        results = []
        previous = torch.get_num_threads()
        torch.set_num_threads(threads or previous)
        try:
            for fn in (torch.nn.functional.batch_norm, MF.batch_norm):
                stats = (torch.zeros(3, device=device), torch.ones(3, device=device))
                output = fn(x, *stats, training=True)
                results.append([t.isnan() for t in (output, *stats)] + [t.isinf() for t in (output, stats[0])])
        finally:
            torch.set_num_threads(previous)
        for ours, theirs in zip(*reversed(results)):
            assert torch.equal(ours, theirs), (at, threads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", [32, 64, 128, 256, 48])
def test_elementwise_passes_give_the_same_bits_in_both_layouts(device, dtype, C):
    # Given the same statistics (and, in training, the same gradient sums), each element's result
    # is one formula of its own operands, whatever the memory format: bit for bit. On the CPU the
    # channels-last passes hold the coefficients of 32, 64 or 128 channels across rows (and of 256
    # in the forward's passes) and read them per element for other counts (48).
    x = torch.randn(5, C, 3, 7, device=device).to(dtype)
    dy, r = torch.randn_like(x), torch.randn_like(x)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    w, b, mean, sum_dy, sum_dy_xmu = torch.randn(5, C, device=device, dtype=opmath)
    var = torch.rand(C, device=device, dtype=opmath) + 0.5

    def passes(x, dy, r):
        y = mkops.batch_norm_eval(x, mean, var, w, b, 1e-5, r, True)
        return [mkops.batch_norm_eval(x, mean, var, w, b, 1e-5), y,
                mkops.batch_norm_eval(x, mean, var, w, b, 1e-5, None, True),
                mkops.batch_norm_backward(dy, x, mean, var, w, 1e-5, False, [True, False, False])[0],
                *mkops.batch_norm_backward(dy, x, mean, var, w, 1e-5, True, [True, False, False], sum_dy,
                                           sum_dy_xmu, 105, y, True)[::3],
                mkops.batch_norm_backward(dy, x, mean, var, w, 1e-5, True, [True, False, False], sum_dy,
                                          sum_dy_xmu, 105, relu=True, bias=b)[0]]

    first = passes(x, dy, r)
    last = passes(*(t.contiguous(memory_format=torch.channels_last) for t in (x, dy, r)))
    for nchw, nhwc in zip(first, last):
        assert nhwc.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(nchw, nhwc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_same_call_gives_the_same_bits_in_deterministic_mode(device, fmt):
    # No atomics and reductions in a fixed order (for a given thread count on the CPU): torch's
    # deterministic mode has nothing to refuse, and a repeated call repeats every bit.
    x = layout(torch.randn(8, 64, 14, 14, device=device) * 3 + 1, fmt)
    grad = torch.randn_like(x)

    def step():
        x_ = x.clone().requires_grad_()
        outputs = [MF.batch_norm_relu(x_, None, None, training=True),
                   MF.dropout(x_, 0.3, generator=torch.Generator(device).manual_seed(0))]
        torch.autograd.backward(outputs, [grad, grad])
        return [*outputs, x_.grad]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = step(), step()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(device, channels_last):
    x = torch.randn(4, 3, 5, 5, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(3, device=device, requires_grad=True)
    b = torch.rand(3, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    torch.library.opcheck(mkops.batch_norm_train.default, (x, w, b, 1e-5))
    torch.library.opcheck(mkops.batch_norm_eval.default, (x, rm, rv, w, b, 1e-5))
    for training in (True, False):  # differentiable itself (double backward)
        torch.library.opcheck(mkops.batch_norm_backward.default,
                              (torch.randn_like(x, requires_grad=True), x, rm, rv, w, 1e-5, training,
                               [True, True, True]))
    mean, var = torch.randn(3, device=device), torch.rand(3, device=device)
    torch.library.opcheck(mkops.batch_norm_update_stats_.default,
                          (rm, rv, mean, var, 100, None, torch.tensor(3, device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_conv_bn_both_modes(device):
    torch._dynamo.reset()
    torch.manual_seed(0)

    def make(bn):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bn(8), torch.nn.ReLU()).to(device)

    ours, theirs = make(modekernels.BatchNorm2d), make(torch.nn.BatchNorm2d)
    theirs.load_state_dict(ours.state_dict())
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.randn(4, 3, 8, 8, device=device)
    for mode in ("train", "eval", "train"):
        for m in (ours, theirs):
            getattr(m, mode)()
        y_c, y_t = compiled(x), theirs(x)
        torch.testing.assert_close(y_c, y_t, atol=1e-4, rtol=1e-4)
        y_c.sum().backward()
        y_t.sum().backward()
        torch.testing.assert_close(ours[0].weight.grad, theirs[0].weight.grad, atol=1e-3, rtol=1e-3)
        ours.zero_grad()
        theirs.zero_grad()
        assert_same_state(theirs, ours, BN_TOL[torch.float32])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_export_and_jit_trace_match_eager(training):
    # The exported program, also saved and loaded (torch.export.save/load, the .pt2 file), updates
    # the running statistics as eager does, and dropout draws the same mask from the same seed.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), modekernels.BatchNormReLU2d(8),
                                modekernels.Dropout(0.3), torch.nn.Flatten(2),
                                modekernels.BatchNorm1d(8)).train(training)
    x = torch.randn(4, 3, 6, 6)
    program = torch.export.export(copy.deepcopy(model), (x,))
    saved = io.BytesIO()
    torch.export.save(program, saved)
    saved.seek(0)
    loaded = torch.export.load(saved).module()
    results = []
    for m in (model, program.module(), loaded):
        torch.manual_seed(1)
        results.append((m(x), dict(m.named_buffers())))
    torch.testing.assert_close(results[1], results[0])
    torch.testing.assert_close(results[2], results[0])
    if not training:
        torch.testing.assert_close(torch.jit.trace(model, x)(x), model(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_building_blocks_compose_over_a_split_batch(device, channels_last):
    # What a distributed BatchNorm does: local statistics merged into global ones, local gradient
    # sums added up, and each shard's input gradient from the global sums and count.
    x = torch.randn(10, 4, 5, 5, device=device, dtype=torch.float64) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    w = torch.rand(4, device=device, dtype=torch.float64)
    shards = [x[:3], x[3:]]
    counts = [s.numel() // 4 for s in shards]
    stats = [mkops.batch_norm_stats(s) for s in shards]
    total = sum(counts)
    mean = sum(n * m for n, (m, _) in zip(counts, stats)) / total
    var = sum(n * (v + (m - mean) ** 2) for n, (m, v) in zip(counts, stats)) / total
    full_mean, full_var = mkops.batch_norm_stats(x)
    torch.testing.assert_close(mean, full_mean)
    torch.testing.assert_close(var, full_var)
    sums = [mkops.batch_norm_grad_sums(g, s, mean) for g, s in zip([dy[:3], dy[3:]], shards)]
    sum_dy = sum(a for a, _ in sums)
    sum_dy_xmu = sum(b for _, b in sums)
    full = mkops.batch_norm_backward(dy, x, mean, var, w, 1e-5, True, [True, True, True])
    parts = [mkops.batch_norm_backward(g, s, mean, var, w, 1e-5, True, [True, False, False],
                                       sum_dy, sum_dy_xmu, total)[0]
             for g, s in zip([dy[:3], dy[3:]], shards)]
    torch.testing.assert_close(torch.cat(parts), full[0])
    torch.testing.assert_close(sum_dy, full[2])
    shard_dy = dy[:3].clone().requires_grad_()
    given = mkops.batch_norm_backward(shard_dy, shards[0], mean, var, w, 1e-5, True,
                                      [True, False, False], sum_dy, sum_dy_xmu, total)[0]
    with pytest.raises(NotImplementedError, match="no double backward with given"):
        torch.autograd.grad(given.sum(), shard_dy)
    torch.library.opcheck(mkops.batch_norm_stats.default, (x,))
    torch.library.opcheck(mkops.batch_norm_grad_sums.default, (dy, x, mean))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("fused", ["plain", "relu", "add-relu"])
def test_cpu_resident_and_separate_passes_agree(dtype, fused):
    # With at least one channel per thread and small channels, the CPU runs reduction and
    # elementwise pass channel by channel (one pass over memory); with more threads than channels
    # it runs them as separate passes. Both must give the same forward and backward. 80 rows of
    # 63 elements per channel: the lane sums are added into double within a channel, not only at
    # its end, and the resident passes take the channels in groups.
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(80, 5, 7, 9, generator=gen) * 2 + 1).to(dtype)
    residual = torch.randn(x.shape, generator=gen).to(dtype) if fused == "add-relu" else None
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    param = params_dtype_for(dtype)
    w, b = (torch.rand(5, generator=gen) + 0.5).to(param), torch.rand(5, generator=gen).to(param)
    relu = fused != "plain"

    def run(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out, mean, var = mkops.batch_norm_train(x, w, b, 1e-5, residual, relu)
            grads = mkops.batch_norm_backward(dy, x, mean, var, w, 1e-5, True, [True, True, True],
                                              relu_output=out if relu else None,
                                              residual_grad=residual is not None)
        finally:
            torch.set_num_threads(previous)
        return out, mean, var, *grads

    resident, separate = run(1), run(8)  # 5 channels: >= 1 thread each, then < 8 threads
    names = ["out", "mean", "var", "grad_input", "grad_weight", "grad_bias", "grad_residual"]
    for name, a, b_ in zip(names, resident, separate):
        torch.testing.assert_close(a, b_, **BN_TOL[dtype], msg=name)
    if residual is not None:  # the gated dy, exactly
        assert torch.equal(resident[-1], torch.where(resident[0] > 0, dy, 0))


@pytest.mark.parametrize("number", [np.float64, np.float32, torch.tensor], ids=["np64", "np32", "tensor"])
def test_torch_compile_takes_numpy_and_tensor_momentum_and_eps(number):
    # torch's parser reads them as floats; our ops get them as floats too, which under
    # torch.compile would otherwise reach the ops as tensors (graph breaks allowed, as torch's).
    torch._dynamo.reset()
    x = torch.randn(4, 3, 5, 5)
    eager, compiled = (modekernels.BatchNorm2d(3, momentum=number(0.3), eps=number(1e-3))
                       for _ in range(2))
    run = torch.compile(compiled, backend="eager")
    for mode in (True, False):
        eager.train(mode), compiled.train(mode)
        torch.testing.assert_close(run(x), eager(x))
    torch.testing.assert_close(compiled.running_var, eager.running_var)


# ------------------------------------------------------------------------------- torch.vmap

def vmapped_ensemble(modules, x, buffer_dims=0):
    """torch.func's model ensembling: the modules' parameters and buffers stacked, one vmapped
    call over them and x; returns the outputs and the (updated) stacked buffers."""
    params, buffers = torch.func.stack_module_state(modules)
    if buffer_dims is None:  # one counter for all, as a shared module has
        buffers["num_batches_tracked"] = modules[0].num_batches_tracked.clone()
        buffer_dims = {name: None if name == "num_batches_tracked" else 0 for name in buffers}
    skeleton = copy.deepcopy(modules[0]).to("meta")
    out = torch.vmap(lambda p, b, t: torch.func.functional_call(skeleton, (p, b), (t,)),
                     in_dims=(0, buffer_dims, 0))(params, buffers, x)
    return out, buffers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["default", "no-affine", "momentum-None", "untracked"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_vmap_over_an_ensemble_equals_torch_model_by_model(device, training, variant, fmt):
    # vmap means map: each of our vmapped models against its torch twin called alone (torch's own
    # vmap cannot run momentum=None here: it calls float() on the vmapped counter).
    pairs = [twin_modules("2d", variant, device) for _ in range(3)]
    base = torch.randn(3, *CASES["2d"][2], device=device) * 2 + 3
    x = base if fmt == "contiguous" else base.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    for theirs, ours in pairs:
        theirs.train(training)
        ours.train(training)
    y_o, buffers_o = vmapped_ensemble([ours for _, ours in pairs], x)
    y_t = torch.stack([theirs(x[i]) for i, (theirs, _) in enumerate(pairs)])
    buffers_t = torch.func.stack_module_state([theirs for theirs, _ in pairs])[1]
    torch.testing.assert_close(y_o, y_t, **BN_TOL[torch.float32])
    torch.testing.assert_close(buffers_o, buffers_t, **BN_TOL[torch.float32])


def test_vmap_with_one_counter_counts_the_call_once_like_torch():
    # momentum=None with stacked running statistics and one shared counter: every sample's
    # average uses the same count, and the counter advances once.
    pairs = [twin_modules("2d", "momentum-None", "cpu") for _ in range(3)]
    x = torch.randn(3, *CASES["2d"][2])
    (y_t, buffers_t), (y_o, buffers_o) = (vmapped_ensemble(list(m), x, buffer_dims=None) for m in zip(*pairs))
    torch.testing.assert_close(y_o, y_t)
    torch.testing.assert_close(buffers_o, buffers_t)
    assert buffers_o["num_batches_tracked"].item() == 1


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_over_inputs_of_one_module_matches_torch(device):
    x = torch.randn(4, 6, 3, 5, 5, device=device)
    r = torch.randn_like(x)
    theirs = torch.nn.BatchNorm2d(3, track_running_stats=False).to(device)
    ours = modekernels.BatchNormAddReLU2d(3, track_running_stats=False).to(device)
    y_t = torch.vmap(theirs)(x)
    torch.testing.assert_close(torch.vmap(ours)(x, r), torch.relu(y_t + r))
    # Autograd outside vmap: gradients of the input and the shared parameters.
    grads = []
    for module, f in ((theirs, lambda t: torch.relu(theirs(t) + r[0])), (ours, lambda t: ours(t, r[0]))):
        x_ = x.clone().requires_grad_()
        y = torch.vmap(f)(x_)
        grads.append(torch.autograd.grad(y.pow(2).sum(), [x_, *module.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], **BN_TOL[torch.float32])
    # The residual not vmapped over: one for every sample.
    torch.testing.assert_close(torch.vmap(ours, in_dims=(0, None))(x, r[0]), torch.relu(y_t + r[0]))
    theirs, ours = (cls(3).to(device).eval() for cls in (torch.nn.BatchNorm2d, modekernels.BatchNorm2d))
    torch.testing.assert_close(torch.vmap(ours)(x), torch.vmap(theirs)(x))


def test_vmap_of_a_tracking_module_in_training_is_torch_error_and_changes_nothing():
    ours = modekernels.BatchNorm2d(3)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(RuntimeError, match="running_mean or running_var, which will be updated"):
        torch.vmap(ours)(torch.randn(2, 4, 3, 5, 5))
    for name, value in ours.state_dict().items():
        assert torch.equal(value, before[name]), name
