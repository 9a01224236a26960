"""The fused BatchNorm variants against the unfused torch composition they replace."""
import copy
import itertools

import pytest
import torch
from torch._dynamo.utils import counters

import modekernels
import modekernels.functional as MF
from modekernels import reference

from helpers import BN_TOL, DEVICES, FLOAT_DTYPES, LAYOUTS, dtype_id, make_layout

mkops = torch.ops.modekernels


VARIANTS = {
    "bn-relu": (modekernels.BatchNormReLU2d, lambda bn, x, r: bn(x)),
    "bn-add-relu": (modekernels.BatchNormAddReLU2d, lambda bn, x, r: bn(x) + r),
}


def call(module, x, r):
    return module(x, r) if isinstance(module, modekernels.BatchNormAddReLU2d) else module(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "channels_last-wide",
                                    "channels_last-64", "contiguous-short", "contiguous-5x5"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_equals_torch_composition_in_both_modes(device, dtype, layout, variant):
    ours_cls, pre_activation = VARIANTS[variant]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    # Wide: rows of 4 KB or more, which the CPU's channels-last passes take four at a time. 64:
    # a channel count whose values the CPU's channels-last passes hold across rows. Short: rows of
    # 3x3, which the CPU walks as columns of channels-last memory; 5x5, in its elementwise passes.
    shape = {"channels_last-wide": (10, 2048, 1, 5), "channels_last-64": (6, 64, 5, 7),
             "contiguous-short": (6, 6, 3, 3), "contiguous-5x5": (4, 6, 5, 5)}.get(layout, (4, 6, 5, 7))
    layout = layout.split("-")[0]
    theirs = torch.nn.BatchNorm2d(shape[1]).to(device, param_dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours = ours_cls(shape[1]).to(device, param_dtype)
    ours.load_state_dict(theirs.state_dict())
    tol = BN_TOL[dtype]
    for training in (True, True, False):
        theirs.train(training)
        ours.train(training)
        base = torch.randn(shape, device=device).to(dtype)
        res = torch.randn(shape, device=device).to(dtype)  # contiguous, whatever x's layout
        x_t, x_o = (make_layout(base, layout).requires_grad_() for _ in range(2))
        r_t, r_o = (res.clone().requires_grad_() for _ in range(2))
        pre = pre_activation(theirs, x_t, r_t)
        y_o = call(ours, x_o, r_o)
        torch.testing.assert_close(y_o, torch.relu(pre), **tol)
        # torch's ReLU backward with our output's gate: in float16/bfloat16 torch rounds bn(x) + r
        # before the ReLU and we round once after it, so an output within rounding of 0 may sit
        # on the other side of the kink; with one gate, the rest must agree to tolerance.
        grad = torch.randn_like(y_o)
        pre.backward(torch.where(y_o <= 0, 0, grad))
        y_o.backward(grad)
        torch.testing.assert_close(x_o.grad, x_t.grad, **tol)
        if variant == "bn-add-relu":
            torch.testing.assert_close(r_o.grad, r_t.grad, **tol)
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, **tol)
            getattr(ours, name).grad = getattr(theirs, name).grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), **tol)


def test_fused_module_is_a_batchnorm_with_its_state_dict():
    ours, theirs = modekernels.BatchNormReLU2d(8), torch.nn.BatchNorm2d(8)
    assert isinstance(ours, torch.nn.BatchNorm2d) and isinstance(ours, modekernels.BatchNorm2d)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backward_saves_no_pre_activation(variant):
    # BN+ReLU keeps only its input (the gate is recomputed); BN+add+ReLU its input and output.
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    r = torch.randn_like(x)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = call(VARIANTS[variant][0](16), x, r)
    big = [t for t in saved if t.numel() == x.numel()]
    assert any(t is x for t in big)
    if variant == "bn-relu":
        assert len(big) == 1
    else:
        assert len(big) == 2 and any(t.data_ptr() == y.data_ptr() for t in big)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "2d", "short", "5x5"])
@pytest.mark.parametrize("threads", [1, 8])
def test_recomputed_relu_gate_is_exactly_the_saved_one(device, dtype, layout, threads):
    # BN+ReLU's backward recomputes where the forward's ReLU passed. It must agree with the saved
    # output everywhere, also where the value rounds to 0 in float16/bfloat16: channels with tiny
    # weights put many values near 0 and below the smallest subnormal, and channels with weight 0
    # have their bias as every value: the largest that rounds to 0 in float16 (2^-25) and in
    # bfloat16 (2^-134), and the next float above each.
    gen = torch.Generator().manual_seed(0)
    C = 10
    # Rows read four at a time, two left over; short: rows of 2x2, walked as columns on the CPU
    # (5x5: by the elementwise passes only).
    shape = {"2d": (64, C), "short": (6, C, 2, 2), "5x5": (6, C, 5, 5)}.get(layout, (6, C, 5, 7))
    x = torch.randn(shape, generator=gen).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    param = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    bounds = [2.0**-25, 2.0**-25 * (1 + 2.0**-23), 2.0**-134, 2.0**-134 + 2.0**-149]
    w = torch.tensor([1.0, 1e-6, 1e-8, 3e-7, 2.0, 1e-30] + [0.0] * 4, dtype=param, device=device)
    b = torch.tensor([0.0, 1e-7, -1e-8, 0.0, -0.5, 1e-40] + bounds, dtype=param, device=device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # 1: the CPU's cache-resident passes; 8: the separate ones
    try:
        for training in (True, False):
            if training:
                out, mean, var = mkops.batch_norm_train(x, w, b, 1e-5, None, True)
            else:
                mean, var = torch.zeros(C, dtype=param, device=device), torch.ones(C, dtype=param, device=device)
                out = mkops.batch_norm_eval(x, mean, var, w, b, 1e-5, None, True)
            mask = [True, True, True]
            saved = mkops.batch_norm_backward(dy, x, mean, var, w, 1e-5, training, mask,
                                              relu_output=out)
            recomputed = mkops.batch_norm_backward(dy, x, mean, var, w, 1e-5, training, mask,
                                                   relu=True, bias=b)
            for a, b_ in zip(saved[:3], recomputed[:3]):
                assert torch.equal(a, b_)
    finally:
        torch.set_num_threads(previous)
    assert ((out == 0) & (x != 0)).any()  # values that the ReLU (or rounding) closed
    tiny = out[:, 6:].reshape(out.shape[0], 4, -1)[:, :, 0]  # one value per boundary channel
    if dtype in (torch.float16, torch.bfloat16):  # the first of a pair rounds to 0, the second not
        pair = slice(0, 2) if dtype == torch.float16 else slice(2, 4)
        assert (tiny[:, pair] > 0).tolist() == [[False, True]] * out.shape[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_recomputed_relu_gate_agrees_for_every_half_precision_input(device, dtype, layout):
    # Every one of the 65536 bit patterns (NaNs, infinities, subnormals, both zeros) in every
    # channel, under eval-mode coefficients chosen freely: plain, negative, tiny, zero weights over
    # biases at the rounding boundaries, and scales that overflow to inf. The recomputed gate must
    # open exactly where the forward's stored output is > 0.
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).reshape(16, 1, 64, 64)
    mean = [0.0, 0.5, 0.0, 0.0, 0.0, 1e4, -3.0, 0.0]
    var = [1.0, 4.0, 1.0, 1.0, 1.0, 1e-3, 1e-8, 0.0]
    w = [1.0, -1.0, 3e-5, 0.0, 0.0, 1e3, 1e-30, 1.0]
    b = [0.0, 0.25, 0.0, 2.0**-25, 2.0**-134, -7.0, 1e-40, -1e-3]
    C = len(w)
    x = values.expand(16, C, 64, 64).contiguous().to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    mean, var, w, b = (torch.tensor(t, device=device) for t in (mean, var, w, b))
    out = mkops.batch_norm_eval(x, mean, var, w, b, 1e-5, None, True)
    mask = [True, True, True]
    saved = mkops.batch_norm_backward(dy, x, mean, var, w, 1e-5, False, mask, relu_output=out)
    recomputed = mkops.batch_norm_backward(dy, x, mean, var, w, 1e-5, False, mask, relu=True, bias=b)
    for a, b_ in zip(saved[:3], recomputed[:3]):  # grad_weight sums 0 * NaN: NaN, as in torch
        torch.testing.assert_close(a, b_, rtol=0, atol=0, equal_nan=True)
    open_ = out > 0
    assert open_.any() and not open_.all() and out.isnan().any() and out.isinf().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_gradient_alone_is_the_gated_grad(device, training):
    # Only the residual needs a gradient: no grad_input pass, the gate is applied on its own, as
    # torch's ReLU backward applies it (threshold_backward: zero where the output is <= 0, so a
    # NaN output lets the gradient through).
    bn = modekernels.BatchNormAddReLU2d(3).to(device).train(training)
    x = torch.randn(4, 3, 5, 5, device=device)
    r = torch.randn_like(x)
    r.view(-1)[::17] = float("nan")
    r.requires_grad_()
    y = bn(x, r)
    g = torch.randn_like(y)
    y.backward(g)
    assert y.isnan().any() and (y <= 0).any()
    assert torch.equal(r.grad, torch.ops.aten.threshold_backward(g, y, 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (2, 40, 7, 7), (3, 64, 9, 9), (2, 256, 4, 4),
                                   (2, 1100, 2, 3), (6, 5, 3, 3), (3, 5, 40, 40), (9, 7)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_saved_gate_backward_is_the_plain_backward_of_the_gated_grad(device, dtype, shape, layout):
    # BN+add+ReLU's backward gates dy once (in the gradient-sums pass, or on its own where that
    # does not run: eval without parameter gradients, given sums) and runs the plain backward on
    # it. The residual's gradient must be torch's ReLU backward bit for bit (NaN outputs let dy
    # through, -0 in dy is kept; NaNs are compared as NaNs: torch's bfloat16 kernel rewrites their
    # bits), and the rest exactly the plain backward of it. Shapes:
    # each CPU path (channels-first separate and cache-resident passes, short rows walked as
    # columns, channels-last with registered channels, rows swept four at a time, float16
    # channels left over from a SIMD part; 2-D).
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("2-D input")
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, r, dy = (torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
                for _ in range(3))
    flat = dy.permute(0, *range(2, dy.dim()), 1) if layout == "channels_last" else dy
    flat.reshape(-1)[::7] = float("nan")  # a view: dense in either layout
    flat.reshape(-1)[3::7] = -0.0
    param = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = (torch.rand(shape[1], generator=gen) + 0.5).to(device, param)
    b = torch.randn(shape[1], generator=gen).to(device, param)
    y, mean, var = mkops.batch_norm_train(x, w, b, 1e-5, r, True)
    y[:, ::3] = float("nan")
    gated = torch.ops.aten.threshold_backward(dy, y, 0)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    masks = ([True] * 3, [False, True, True], [True, False, False])
    for training, mask, given in itertools.product((True, False), masks, (False, True)):
        count = x.numel() // shape[1]
        sums = (*mkops.batch_norm_grad_sums(gated, x, mean), count) if given else (None,) * 3
        ours = mkops.batch_norm_backward(dy, x, mean, var, w, 1e-5, training, mask, *sums, y, True)
        plain = mkops.batch_norm_backward(gated, x, mean, var, w, 1e-5, training, mask, *sums)
        assert torch.equal(ours[3].isnan(), gated.isnan())
        assert torch.equal(ours[3].nan_to_num().view(bits), gated.nan_to_num().view(bits))
        for a, b_ in zip(ours[:3], plain[:3]):
            torch.testing.assert_close(a, b_, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_and_gradgradcheck_float64(training, variant):
    # Gradients of every input, and their own gradients (the double backward holds the ReLU's
    # gate constant, with the gate recomputed from the input for BN+ReLU).
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    stats = (None, None) if training else (rm, rv)

    def f(x, r, w, b):
        if variant == "bn-relu":
            return MF.batch_norm_relu(x, *stats, w, b, training)
        return MF.batch_norm_add_relu(x, r, *stats, w, b, training)

    assert torch.autograd.gradcheck(f, (x, r, w, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x, r, w, b), check_fwd_over_rev=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_penalty_reaches_the_inputs_as_through_torchs_relu(training, variant):
    # A penalty on the input's gradient, differentiated for the input (and residual) with
    # allow_unused=False: torch's ReLU backward gives its output's gradient as zeros, so in eval,
    # where the gradient does not depend on the input otherwise, the input still gets zeros.
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64)
    r = torch.randn_like(x)
    results = []
    for ours in (False, True):
        bn = (VARIANTS[variant][0] if ours else torch.nn.BatchNorm2d)(3).double().train(training)
        xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = call(bn, xr, rr) if ours else torch.relu(VARIANTS[variant][1](bn, xr, rr))
        wrt = (xr, rr) if variant == "bn-add-relu" else (xr,)
        grads = torch.autograd.grad(y, wrt, torch.ones_like(y), create_graph=True)
        penalty = sum((g ** 2).sum() for g in grads)
        results.append(torch.autograd.grad(penalty, wrt + (bn.weight,)))
    torch.testing.assert_close(results[1], results[0])


def test_relu_keeps_nan_like_torch():
    x = torch.randn(4, 3, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    ours = MF.batch_norm_relu(x, torch.zeros(3), torch.ones(3), training=False)
    theirs = torch.relu(torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3)))
    assert torch.equal(ours.isnan(), theirs.isnan())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["bn"] + list(VARIANTS))
def test_double_backward_needs_and_gives_what_torchs_layers_do(training, variant):
    # For every set of (input, residual, weight, bias) that requires grad: the gradients, with
    # create_graph, record a graph where torch's do (not for bias's alone), and their own
    # gradients are torch's, zeros where torch's are zeros, None where torch's are None.
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    r = torch.randn_like(x)
    g = torch.randn_like(x)
    ours_cls = {"bn": modekernels.BatchNorm1d, "bn-relu": modekernels.BatchNormReLU1d,
                "bn-add-relu": modekernels.BatchNormAddReLU1d}[variant]
    for needs in itertools.product([False, True], repeat=4):
        if not any(needs) or (needs[1] and variant != "bn-add-relu"):
            continue
        results = []
        for bn in (torch.nn.BatchNorm1d(3), ours_cls(3)):
            bn = bn.double().train(training)
            xr, rr = x.clone().requires_grad_(needs[0]), r.clone().requires_grad_(needs[1])
            bn.weight.requires_grad_(needs[2])
            bn.bias.requires_grad_(needs[3])
            if isinstance(bn, modekernels.BatchNorm1d):
                y = bn(xr, rr) if variant == "bn-add-relu" else bn(xr)
            else:
                y = bn(xr) + (rr if variant == "bn-add-relu" else 0)
                y = y if variant == "bn" else torch.relu(y)
            wrt = [t for t, n in zip((xr, rr, bn.weight, bn.bias), needs) if n]
            firsts = torch.autograd.grad(y, wrt, g, create_graph=True)
            recorded = [f.requires_grad for f in firsts]
            penalty = sum((f ** 2).sum() for f, rec in zip(firsts, recorded) if rec)
            seconds = torch.autograd.grad(penalty, wrt, allow_unused=True) if any(recorded) else None
            results.append((recorded, seconds))
        (rec_t, sec_t), (rec_o, sec_o) = results
        assert rec_o == rec_t, needs
        if sec_t is not None:
            assert [s is None for s in sec_o] == [s is None for s in sec_t], needs
            torch.testing.assert_close([s for s in sec_o if s is not None],
                                       [s for s in sec_t if s is not None])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,layout", [((4, 3, 5, 6), "contiguous"), ((4, 3, 5, 6), "channels_last"),
                                          ((2, 64, 3, 5), "channels_last"), ((2, 3, 40), "contiguous")])
@pytest.mark.parametrize("case", ["bn-relu-eval", "bn-add-relu-eval", "bn-add-relu-train"])
def test_relu_backward_lets_the_gradient_through_a_nan_output_like_torch(device, dtype, shape, layout,
                                                                         case):
    # torch's ReLU backward zeroes the gradient where the output is <= 0 (threshold_backward), so
    # where the output is NaN the gradient passes. NaNs in eval, or in the residual in training
    # (in the input they would make the whole channel NaN), at positions in vectors and tails.
    # Against torch's composition in float64, which rounds no intermediate to dtype.
    variant, mode = case.rsplit("-", 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    r = torch.randn(shape, generator=gen)
    flat = (r if mode == "train" else x).view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:5]] = float("nan")
    if variant == "bn-add-relu" and mode == "eval":
        r.view(-1)[torch.randperm(r.numel(), generator=gen)[:5]] = float("nan")
    dims = {3: "1d", 4: "2d"}[len(shape)]
    ours_cls = getattr(modekernels, VARIANTS[variant][0].__name__.replace("2d", dims))
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    theirs = getattr(torch.nn, f"BatchNorm{dims}")(shape[1]).to(device, torch.float64)
    ours = ours_cls(shape[1]).to(device, param_dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5, generator=gen)
        theirs.bias.uniform_(-0.5, 0.5, generator=gen)
        theirs.running_mean.uniform_(-0.5, 0.5, generator=gen)
        theirs.running_var.uniform_(0.5, 1.5, generator=gen)
    ours.load_state_dict(theirs.state_dict())
    theirs.train(mode == "train")
    ours.train(mode == "train")
    x, r = (t.to(device, dtype) for t in (x, r))
    x, r = (make_layout(t, layout) if t.dim() == 4 else t for t in (x, r))
    x_t, r_t = (t.to(torch.float64, copy=True).requires_grad_() for t in (x, r))
    x_o, r_o = (t.clone().requires_grad_() for t in (x, r))
    y_t = torch.relu(VARIANTS[variant][1](theirs, x_t, r_t))
    y_o = ours(x_o, r_o) if variant == "bn-add-relu" else ours(x_o)
    grad = torch.randn(shape, generator=gen).to(device, dtype)
    y_t.backward(grad.double())
    y_o.backward(grad)
    assert y_o.isnan().any()
    tol = dict(BN_TOL[dtype], equal_nan=True)
    torch.testing.assert_close(x_o.grad.double(), x_t.grad, **tol)
    if variant == "bn-add-relu":
        torch.testing.assert_close(r_o.grad.double(), r_t.grad, **tol)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad.double(), getattr(theirs, name).grad, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fused(device):
    x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    r = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    w = torch.rand(3, device=device, requires_grad=True)
    b = torch.rand(3, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    torch.library.opcheck(mkops.batch_norm_train.default, (x, w, b, 1e-5, r, True))
    torch.library.opcheck(mkops.batch_norm_eval.default, (x, rm, rv, w, b, 1e-5, r, True))
    y = mkops.batch_norm_train(x.detach(), w.detach(), b.detach(), 1e-5, None, True)[0]
    for residual_grad in (False, True):
        torch.library.opcheck(mkops.batch_norm_backward.default,
                              (torch.randn_like(x, requires_grad=True), x, rm, rv, w, 1e-5, True,
                               [True, True, True], None, None, None, y, residual_grad))
    torch.library.opcheck(mkops.batch_norm_backward.default,
                          (torch.randn_like(x, requires_grad=True), x, rm, rv, w, 1e-5, True,
                           [True, True, True], None, None, None, None, False, True, b))


def test_residual_of_another_shape_is_an_error():
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match="expected residual like input"):
        MF.batch_norm_add_relu(x, torch.randn(4, 3, 5, 4), None, None, training=True)


@pytest.mark.parametrize("training", [True, False])
def test_residual_none_is_a_type_error_and_changes_nothing(training):
    # torch's relu(bn(x) + None) raises TypeError; a missing residual must not mean "no residual".
    bn = modekernels.BatchNormAddReLU2d(3).train(training)
    state = copy.deepcopy(bn.state_dict())
    with pytest.raises(TypeError, match=r"argument 'residual' \(position 2\) must be Tensor, not NoneType"):
        bn(torch.randn(4, 3, 5, 5), None)
    for name, value in bn.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_resnet_block_tail(device):
    torch._dynamo.reset()

    class Tail(torch.nn.Module):
        def __init__(self, bn):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.bn = bn

        def forward(self, x):
            return self.bn(self.conv(x), x)

    block = Tail(modekernels.BatchNormAddReLU2d(4)).to(device)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 4, 6, 6, device=device)
    for mode in ("train", "eval"):
        getattr(block, mode)()
        torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_autograd_matches_eager(device):
    # Compiled autograd (torch._dynamo.config.compiled_autograd) takes the backward graph, our
    # ops' C++ autograd nodes included, into torch.compile too.
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), modekernels.BatchNormReLU2d(8), modekernels.Dropout(0.3),
        modekernels.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).to(device)
    x = torch.randn(4, 3, 8, 8, device=device)

    def step():
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(1)
    eager = step()
    torch.manual_seed(1)
    counters.clear()
    with torch._dynamo.config.patch(compiled_autograd=True):
        compiled = torch.compile(step, backend="aot_eager")()
    assert counters["compiled_autograd"]["captures"] == 1
    for ours, reference in zip(compiled, eager):
        torch.testing.assert_close(ours, reference)


FUNC_TAILS = {
    "bn": (modekernels.BatchNorm2d, lambda y, r: y),
    "bn-relu": (modekernels.BatchNormReLU2d, lambda y, r: torch.relu(y)),
    "bn-add-relu": (modekernels.BatchNormAddReLU2d, lambda y, r: torch.relu(y + r)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(FUNC_TAILS))
def test_torch_func_reverse_transforms_match_torch(training, variant):
    # torch.func.grad, jacrev (vmapped vjp) and, in eval, hessian through our layers, which under these
    # transforms give their outputs as torch operations (functorch refuses C++ autograd
    # Functions), against torch's BatchNorm and ReLU; the running statistics update as torch's.
    ours_cls, tail = FUNC_TAILS[variant]
    theirs = torch.nn.BatchNorm2d(3).double().train(training)
    with torch.no_grad():
        for t in (theirs.weight, theirs.running_var):
            t.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
        theirs.running_mean.uniform_(-1, 1)
    ours = ours_cls(3).double().train(training)
    ours.load_state_dict(theirs.state_dict())
    x, r, weights = (torch.randn(4, 3, 2, 3, dtype=torch.float64) for _ in range(3))
    params = {name: p.detach() for name, p in theirs.named_parameters()}

    # The buffers are arguments of the transformed functions: a running update mutates them,
    # which functorch refuses for a captured tensor (torch's module included).
    def forward(module, p, buffers, x, r):
        state = (p, buffers)
        if module is theirs:
            return tail(torch.func.functional_call(theirs, state, (x,)), r)
        return torch.func.functional_call(ours, state, (x, r) if variant == "bn-add-relu" else (x,))

    def loss(module, p, buffers, x, r):
        return (forward(module, p, buffers, x, r) * weights).sum()

    results = []
    for module in (theirs, ours):
        buffers = dict(module.named_buffers())
        grads = torch.func.grad(loss, argnums=(1, 3, 4))(module, params, buffers, x, r)
        jacobian = torch.func.jacrev(lambda x, b: forward(module, params, b, x, r)[:2, :1])(x, buffers)
        hessian = (torch.func.hessian(lambda x, b: loss(module, params, b, x, r))(x, buffers)
                   if not training else None)
        results.append((grads, jacobian, hessian))
    torch.testing.assert_close(results[1], results[0])
    assert len(ours.state_dict()) == len(theirs.state_dict()) == 5
    for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()):
        torch.testing.assert_close(b, a)


_OPS = torch.ops.modekernels
_X, _C3, _C5 = torch.randn(4, 3, 2, 2), torch.ones(3), torch.ones(5)
_X1, _XC1, _C31 = _X[:1].clone(), _X[:, :1].clone(), torch.ones(3, 1)
WRONG_SHAPES = {  # name -> (call on real or fake tensors, the message both must raise)
    "bn-weight": (lambda t: _OPS.batch_norm_train(t(_X), t(_C5), None, 1e-5),
                  "^weight should contain 3 elements not 5$"),
    "bn-bias-2d": (lambda t: _OPS.batch_norm_train(t(_X), None, t(_C31), 1e-5),
                   "expected bias to be 1-D"),
    "bn-running-var": (lambda t: _OPS.batch_norm_eval(t(_X), t(_C3), t(_C5), None, None, 1e-5),
                       "^running_var should contain 3 elements not 5$"),
    "bn-residual": (lambda t: _OPS.batch_norm_train(t(_X), None, None, 1e-5, t(_X1), True),
                    "expected residual like input"),
    "dropout-residual": (lambda t: _OPS.dropout_add(t(_X), t(_XC1), 0.5),
                         "expected residual like input"),
    "bias-shape": (lambda t: _OPS.bias_dropout_add(t(_X), t(_C3), t(_X), 0.5),
                   r"expected bias of shape \(2,\)"),
}


@pytest.mark.parametrize("case", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
def test_fake_kernels_check_shapes_as_the_kernels(case):
    # Under torch.compile a wrong shape then fails when the graph is traced, with the kernels'
    # message, instead of as an invalid gradient when autograd's graph is built.
    call, message = case
    with pytest.raises(RuntimeError, match=message):
        call(lambda t: t)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        with pytest.raises(RuntimeError, match=message):
            call(mode.from_tensor)


# ------------------------------------------------------------------- dropout + residual paths

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["dropout-add", "bias-dropout-add"])
@pytest.mark.parametrize("H", [5, 33, 300])  # bias rows shorter and longer than the CPU's spans
def test_dropout_add_equals_residual_plus_dropout(device, dtype, with_bias, H):
    from modekernels import _ops, reference
    x = (torch.rand(3, 7, H, device=device) + 0.5).to(dtype).requires_grad_()
    r = torch.randn(3, 7, H, device=device).to(dtype).requires_grad_()
    b = torch.randn(H, device=device).to(dtype).requires_grad_()
    if with_bias:
        y, state = _ops.bias_dropout_add(x, b, r, 0.3)
        dropped = reference.dropout((x + b).detach(), 0.3, state)
    else:
        y, state = _ops.dropout_add(x, r, 0.3)
        dropped = reference.dropout(x.detach(), 0.3, state)
    torch.testing.assert_close(y, r.detach() + dropped, **BN_TOL[dtype])
    g = torch.randn_like(y)
    y.backward(g)
    mask_grad = reference.dropout(g, 0.3, state)
    torch.testing.assert_close(x.grad, mask_grad, atol=0, rtol=0)
    torch.testing.assert_close(r.grad, g, atol=0, rtol=0)
    if with_bias:
        opmath = reference.opmath_dtype(dtype)
        torch.testing.assert_close(b.grad, mask_grad.to(opmath).sum((0, 1)).to(dtype), **BN_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["dropout-add", "bias-dropout-add"])
def test_dropout_add_gradients_follow_the_forward_mask_in_every_layout(device, layout, residual_layout,
                                                                        with_bias):
    # bias_dropout_add lays its mask over its input's contiguous order, whatever the layout; its
    # backward laid it over the output's strides until 2026-12-06 (wrong gradients for transposed
    # or channels-last inputs). The output takes the layout of torch's sum, the residual's.
    x = make_layout(torch.rand(2, 3, 5, 7, device=device, dtype=torch.float64) + 0.5, layout)
    x.requires_grad_()
    r = make_layout(torch.zeros(2, 3, 5, 7, device=device, dtype=torch.float64), residual_layout)
    r.requires_grad_()
    b = torch.rand(7, device=device, dtype=torch.float64, requires_grad=True)
    for training in (False, True):
        ours = (MF.bias_dropout_add(x, b, r, 0.5, training) if with_bias
                else MF.dropout_add(x, r, 0.5, training))
        theirs = r + torch.nn.functional.dropout(x + b if with_bias else x, 0.5, training)
        assert ours.stride() == theirs.stride()
    y = MF.bias_dropout_add(x, b, r, 0.5) if with_bias else MF.dropout_add(x, r, 0.5)
    kept = y.detach() != 0  # x (+ b) > 0: a zero is a dropped element
    g = torch.randn_like(y)
    y.backward(g)
    masked = torch.where(kept, 2 * g, 0)
    assert torch.equal(x.grad, masked) and torch.equal(r.grad, g)
    if with_bias:
        torch.testing.assert_close(b.grad, masked.sum((0, 1, 2)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_bias_dropout_add_of_an_empty_last_dimension_has_an_empty_bias_gradient(device):
    x, r = (torch.randn(4, 0, device=device, requires_grad=True) for _ in range(2))
    b = torch.randn(0, device=device, requires_grad=True)
    MF.bias_dropout_add(x, b, r, 0.5).sum().backward()
    assert x.grad.shape == (4, 0) and b.grad.shape == (0,) and r.grad.shape == (4, 0)


def _rng_state(device):
    return torch.cuda.get_rng_state(device) if device == "cuda" else torch.get_rng_state()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["dropout-add", "bias-dropout-add"])
def test_dropout_add_eval_and_p0_are_the_plain_sum_without_a_draw(device, dtype, with_bias):
    x, r = (torch.randn(4, 5, 8, device=device).to(dtype).requires_grad_() for _ in range(2))
    b = torch.randn(8, device=device).to(dtype).requires_grad_()
    # The sum in opmath, rounded once: what the single pass computes.
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    terms = (x, b, r) if with_bias else (x, r)
    expected = sum(t.detach().to(opmath) for t in terms).to(dtype)
    module = modekernels.BiasDropoutAdd(0.5) if with_bias else modekernels.DropoutAdd(0.5)
    args = (x, b, r) if with_bias else (x, r)
    fn = MF.bias_dropout_add if with_bias else MF.dropout_add
    for call in (lambda: module.eval()(*args), lambda: fn(*args, p=0.0),
                 lambda: fn(*args, p=0.5, training=False)):
        before = _rng_state(device)
        y = call()
        assert torch.equal(_rng_state(device), before)
        torch.testing.assert_close(y, expected, atol=0, rtol=0)
        g = torch.randn_like(y)
        y.backward(g)
        for t in (x, r):  # the identity, as for torch's add
            torch.testing.assert_close(t.grad, g, atol=0, rtol=0)
            t.grad = None
        if with_bias:
            torch.testing.assert_close(b.grad, g.to(opmath).sum((0, 1)).to(dtype), **BN_TOL[dtype])
            b.grad = None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_half_precision_values_convert_and_round_as_torch(device, dtype):
    # Every 16-bit pattern (subnormals, infinities, NaNs) widened to float, added to another in
    # float and rounded back to nearest even: our own conversions (common/convert.h) against
    # torch's. Sums cover ties, overflow to infinity and results in the subnormal range.
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).to(device)
    for r in (torch.zeros_like(x), x.roll(1), x.flip(0), x.roll(2**14) * 0.5):
        expected = (x.float() + r.float()).to(dtype)
        torch.testing.assert_close(MF.dropout_add(x, r, 0.5, training=False), expected,
                                   atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_at_p0_keep_everything_and_record_no_draw(device):
    from modekernels import _ops
    x, r = torch.randn(2, 3, 16, device=device), torch.randn(2, 3, 16, device=device)
    b = torch.randn(16, device=device)
    before = _rng_state(device)
    for y, state, expected in [(*_ops.dropout(x, 0.0), x), (*_ops.feature_dropout(x, 0.0), x),
                               (*_ops.dropout_add(x, r, 0.0), r + x),
                               (*_ops.bias_dropout_add(x, b, r, 0.0), (x + b) + r)]:
        torch.testing.assert_close(y, expected, atol=0, rtol=0)
        assert state.tolist() == [0, 0]
    assert torch.equal(_rng_state(device), before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dropout_add_checks_alike_in_both_modes(training):
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="expected residual like input"):
        MF.dropout_add(x, torch.randn(8), 0.5, training)  # no broadcasting, in either mode
    with pytest.raises(RuntimeError, match="expected residual like input"):
        MF.bias_dropout_add(x, torch.randn(8), x.double(), 0.5, training)  # no type promotion
    with pytest.raises(ValueError, match="between 0 and 1"):
        MF.dropout_add(x, x, 1.5, training)
    with pytest.raises(RuntimeError, match="expected residual on cpu like input, but got meta"):
        MF.dropout_add(x, torch.empty_like(x, device="meta"), 0.5, training)  # to the fake kernel


# -------------------------------------------------------------------- channel-wise dropout

FEATURE = {
    "1d": (modekernels.Dropout1d, torch.nn.Dropout1d, (4, 6, 9)),
    "1d-unbatched": (modekernels.Dropout1d, torch.nn.Dropout1d, (6, 9)),
    "2d": (modekernels.Dropout2d, torch.nn.Dropout2d, (4, 6, 5, 7)),
    "3d": (modekernels.Dropout3d, torch.nn.Dropout3d, (2, 6, 3, 4, 5)),
    "3d-unbatched": (modekernels.Dropout3d, torch.nn.Dropout3d, (6, 3, 4, 5)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(FEATURE))
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_channelwise_dropout_masks_whole_channels(device, dtype, case, channels_last):
    ours_cls, theirs_cls, shape = FEATURE[case]
    x = (torch.rand(shape, device=device) + 0.5).to(dtype)
    if channels_last:
        if x.dim() not in (4, 5):
            pytest.skip("channels-last needs a 4-D or 5-D tensor")
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    module = ours_cls(0.5)
    assert isinstance(module, theirs_cls) and repr(module) == repr(theirs_cls(0.5))
    x.requires_grad_()
    y = module(x)
    assert y.shape == x.shape
    batched = x if x.dim() == len(FEATURE[case][2]) and not case.endswith("unbatched") else x.unsqueeze(0)
    kept = (y != 0).reshape(batched.shape[0], batched.shape[1], -1)
    assert torch.equal(kept.all(-1), kept.any(-1))  # each channel kept or dropped whole
    scaled = (x.detach().to(torch.float64) * 2).to(dtype)
    assert torch.equal(y[y != 0], scaled[y != 0])
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(y != 0, (g.double() * 2).to(dtype), 0).to(dtype))
    module.eval()
    if case.endswith("unbatched"):  # torch's unsqueeze/squeeze: a view with the same values
        assert torch.equal(module(x), x)
    else:
        assert module(x) is x


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("spatial", [(1, 1), (1, 3)], ids=str)
def test_channelwise_masks_follow_the_reference_stream(threads, channels_last, spatial):
    # Unit (n, c) takes word n * C + c of the dropout stream, as element n * C + c of plain
    # dropout would: over many units (1030, not a multiple of 4, several blocks of multipliers)
    # and any split of them across threads.
    seed, offset = 2**63 + 12345, 2**40 + 8
    state = torch.tensor([seed, offset], dtype=torch.uint64).view(torch.int64)
    ones = torch.ones(10, 103, *spatial, dtype=torch.float64)
    if channels_last:
        ones = ones.contiguous(memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mult = mkops.feature_dropout_backward(ones, state, 0.3)
    finally:
        torch.set_num_threads(previous)
    keep = reference.dropout_keep_mask(10 * 103, seed, offset, 0.3).view(10, 103, 1, 1)
    assert torch.equal(mult, (keep.double() * (1 / (1 - 0.3))).expand_as(ones))


def test_channelwise_keep_rate_and_reproducibility():
    x = torch.ones(64, 256, 2, 2)
    torch.manual_seed(3)
    y = MF.dropout2d(x, 0.25)
    rate = (y[:, :, 0, 0] != 0).float().mean().item()
    assert abs(rate - 0.75) < 5 * (0.25 * 0.75 / (64 * 256)) ** 0.5
    torch.manual_seed(3)
    assert torch.equal(MF.dropout2d(x, 0.25), y)


def test_channelwise_inplace_and_saved_state():
    base = torch.rand(4, 6, 5, 5) + 0.5
    w = torch.ones((), requires_grad=True)
    x = base * w
    torch.manual_seed(1)
    y = MF.dropout2d(x, 0.5, inplace=True)
    assert y is x
    y.sum().backward()
    torch.testing.assert_close(w.grad, (base * (y.detach() != 0) * 2).sum())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        MF.dropout2d(torch.rand(4, 6, 5, 5, requires_grad=True), 0.5)
    assert sum(t.numel() * t.element_size() for t in saved) == 16


def test_channelwise_dimension_errors_and_warnings_like_torch():
    with pytest.raises(RuntimeError, match="dropout1d: Expected 2D or 3D input, but received a 4D input"):
        MF.dropout1d(torch.randn(2, 3, 4, 5))
    with pytest.warns(UserWarning, match="dropout2d: Received a 3D input to dropout2d"):
        MF.dropout2d(torch.randn(2, 3, 4))
    with pytest.warns(UserWarning, match="dropout3d: Received a 3-D input to dropout3d"):
        MF.dropout3d(torch.randn(2, 3, 4))


LAYOUT_VIEWS = {  # a (4, 6, 5, 7) tensor in other memory layouts
    "channels-last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "spatial-transposed": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
    "permuted": lambda t: t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
    "channel-first-in-memory": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
    "sliced": lambda t: torch.cat([t, t], -1)[..., ::2],
    "sliced-channels-last":
        lambda t: torch.cat([t, t], 1).contiguous(memory_format=torch.channels_last)[:, ::2],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUT_VIEWS))
def test_dropout_outputs_and_gradients_keep_the_layout_torch_gives(device, layout):
    # torch's channel-wise dropout multiplies by a broadcast mask, so its output and gradient
    # take the input's layout (a dense copy of its dimension order where it is not dense);
    # ours too, with the masks of the contiguous input. bias_dropout_add, whose bias runs along
    # the innermost dimension, likewise against torch's sequence. Fake kernels agree (opcheck).
    base = torch.rand(4, 6, 5, 7, device=device) + 0.5
    x = LAYOUT_VIEWS[layout](base)
    g = LAYOUT_VIEWS[layout](torch.randn_like(base))
    results = []
    for fn in (torch.nn.functional.dropout2d, MF.dropout2d, lambda t, p: MF.dropout2d(t.contiguous(), p)):
        xr = x.detach().requires_grad_()
        torch.manual_seed(0)
        y = fn(xr, 0.5)
        y.backward(g)
        results.append((y, xr.grad))
    (y_t, _), (y_o, gx_o), (y_c, gx_c) = results
    assert y_o.stride() == y_t.stride()
    assert torch.equal(y_o, y_c) and torch.equal(gx_o, gx_c)
    state = torch.tensor([5, 8], device=device)
    # (a leaf's .grad takes the leaf's strides whatever the backward returns: the op itself)
    assert mkops.feature_dropout_backward(g, state, 0.5).stride() == (g * y_t.detach()).stride()
    b = torch.randn(7, device=device)
    theirs = x + torch.nn.functional.dropout(x + b, 0.5)
    assert MF.bias_dropout_add(x, b, x, 0.5).stride() == theirs.stride()
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(mkops.feature_dropout.default, (x, 0.3, None), test_utils=checks)
    torch.library.opcheck(mkops.feature_dropout_backward.default, (g, state, 0.3), test_utils=checks)
    torch.library.opcheck(mkops.bias_dropout_add.default, (x, b, x, 0.3, None), test_utils=checks)


EXPANDED_RESIDUALS = {"rows": lambda: torch.randn(3, 1).expand(3, 5),
                      "columns": lambda: torch.randn(1, 5).expand(3, 5),
                      "scalar": lambda: torch.randn(()).expand(3, 5)}


@pytest.mark.parametrize("residual", EXPANDED_RESIDUALS.values(), ids=EXPANDED_RESIDUALS.keys())
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_fused_dropouts_with_an_expanded_residual_take_torchs_layout(residual, transposed):
    # torch's sum follows the residual, and the dropout's output where the residual's strides
    # tie (stride 0): the kernels and the fake kernels work it out as its TensorIterator does.
    x = torch.randn(5, 3).t() if transposed else torch.randn(3, 5)
    r, b = residual(), torch.randn(5)
    cases = [(r + torch.nn.functional.dropout(x, 0.3), mkops.dropout_add.default, (x, r, 0.3)),
             (r + torch.nn.functional.dropout(x + b, 0.3), mkops.bias_dropout_add.default, (x, b, r, 0.3))]
    for theirs, op, args in cases:
        assert op(*args)[0].stride() == theirs.stride()
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fused_dropout(device):
    x = torch.rand(4, 6, 5, 5, device=device, requires_grad=True)
    r = torch.randn(4, 6, 5, 5, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(mkops.dropout_add.default, (x, r, 0.3, None), test_utils=checks)
    torch.library.opcheck(mkops.bias_dropout_add.default, (x, b, r, 0.3, None), test_utils=checks)
    torch.library.opcheck(mkops.feature_dropout.default, (x, 0.3, None), test_utils=checks)
    torch.library.opcheck(mkops.feature_dropout_.default, (x.detach().clone(), 0.3, None), test_utils=checks)
    state = torch.tensor([5, 8], device=device)
    torch.library.opcheck(mkops.feature_dropout_backward.default, (x, state, 0.3))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_transformer_residual_path(device):
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16, bias=False)
            self.bias = torch.nn.Parameter(torch.zeros(16))
            self.path = modekernels.BiasDropoutAdd(0.1)
            self.channels = modekernels.Dropout1d(0.2)

        def forward(self, x):
            return self.channels(self.path(self.proj(x), self.bias, x))

    block = Block().to(device)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(4, 8, 16, device=device)
    for mode in ("train", "eval"):
        getattr(block, mode)()
        torch.manual_seed(0)
        expected = block(x)
        torch.manual_seed(0)
        torch.testing.assert_close(compiled(x), expected)


# ------------------------------------------------------------------------- convert(fuse=True)

def test_convert_fuse_folds_bn_relu_in_sequential_and_revert_restores_it():
    torch.manual_seed(0)
    shared = torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout2d(0.1),  # BN not followed by ReLU
        torch.nn.Sequential(shared, torch.nn.ReLU()), shared,                          # shared BN
    )
    x = torch.randn(2, 3, 10, 10)
    model.eval()
    expected = model(x)
    keys = list(model.state_dict())
    modekernels.convert(model, fuse=True)
    assert type(model[1]) is modekernels.BatchNormReLU2d and type(model[2]) is modekernels.FusedReLU
    assert type(model[4]) is modekernels.BatchNorm2d and type(model[5]) is modekernels.Dropout2d
    assert type(shared) is modekernels.BatchNorm2d and type(model[6][1]) is torch.nn.ReLU
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), expected)
    modekernels.revert(model)
    assert type(model[1]) is torch.nn.BatchNorm2d
    assert type(model[2]) is torch.nn.ReLU and model[2].inplace
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("hooked", ["bn", "relu"])
@pytest.mark.parametrize("hook", ["forward_pre", "forward", "full_backward", "full_backward_pre"])
def test_convert_fuse_leaves_hooked_layers_unfused_so_hooks_see_what_they_saw(hooked, hook):
    # A hook on the BatchNorm would see the ReLU's output once fused, one on the ReLU would
    # never run again.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    seen = []
    layer = model[1] if hooked == "bn" else model[2]
    getattr(layer, f"register_{hook}_hook")(lambda module, *args: seen.append(args[-1]))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)

    def run():
        seen.clear()
        model(x).sum().backward()
        return list(seen)

    expected = run()
    modekernels.convert(model, fuse=True)
    assert [type(m) for m in model] == [torch.nn.Conv2d, modekernels.BatchNorm2d, torch.nn.ReLU]
    torch.testing.assert_close(run(), expected)
