"""The fused BatchNorm variants against the unfused torch composition they replace."""
import pytest
import torch

import modekernels
import modekernels.functional as MF

from helpers import DEVICES, FLOAT_DTYPES, dtype_id, make_layout

mkops = torch.ops.modekernels

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=8e-2, rtol=5e-2),
}

VARIANTS = {
    "bn-relu": (modekernels.BatchNormReLU2d, lambda bn, x, r: torch.relu(bn(x))),
    "bn-add-relu": (modekernels.BatchNormAddReLU2d, lambda bn, x, r: torch.relu(bn(x) + r)),
}


def call(module, x, r):
    return module(x, r) if isinstance(module, modekernels.BatchNormAddReLU2d) else module(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_equals_torch_composition_in_both_modes(device, dtype, layout, variant):
    ours_cls, composition = VARIANTS[variant]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    theirs = torch.nn.BatchNorm2d(6).to(device, param_dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours = ours_cls(6).to(device, param_dtype)
    ours.load_state_dict(theirs.state_dict())
    tol = TOL[dtype]
    for training in (True, True, False):
        theirs.train(training)
        ours.train(training)
        base = torch.randn(4, 6, 5, 7, device=device).to(dtype)
        res = torch.randn(4, 6, 5, 7, device=device).to(dtype)  # contiguous, whatever x's layout
        x_t, x_o = (make_layout(base, layout).requires_grad_() for _ in range(2))
        r_t, r_o = (res.clone().requires_grad_() for _ in range(2))
        y_t, y_o = composition(theirs, x_t, r_t), call(ours, x_o, r_o)
        torch.testing.assert_close(y_o, y_t, **tol)
        grad = torch.randn_like(y_t)
        y_t.backward(grad)
        y_o.backward(grad)
        # In float16/bfloat16, torch rounds bn(x) (and bn(x) + r) before the ReLU and we round once
        # after it, so an output within rounding of 0 may fall on the other side of the kink:
        # there the elementwise gradients legitimately differ.
        same_side = (y_t > 0) == (y_o > 0)
        assert (~same_side).float().mean() < 0.01
        torch.testing.assert_close(x_o.grad[same_side], x_t.grad[same_side], **tol)
        if variant == "bn-add-relu":
            torch.testing.assert_close(r_o.grad[same_side], r_t.grad[same_side], **tol)
        # Each flipped element moves the per-channel sums by at most |grad| (times |xhat| < 4 here).
        flips = (~same_side).sum().item() * 4 * grad.abs().max().item()
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad,
                                       atol=tol["atol"] + flips, rtol=tol["rtol"])
            getattr(ours, name).grad = getattr(theirs, name).grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), **tol)


def test_fused_module_is_a_batchnorm_with_its_state_dict():
    ours, theirs = modekernels.BatchNormReLU2d(8), torch.nn.BatchNorm2d(8)
    assert isinstance(ours, torch.nn.BatchNorm2d) and isinstance(ours, modekernels.BatchNorm2d)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_backward_saves_input_and_output_not_the_pre_activation():
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    r = torch.randn_like(x)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = modekernels.BatchNormAddReLU2d(16)(x, r)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 2
    assert any(t is x for t in big) and any(t.data_ptr() == y.data_ptr() for t in big)


def test_relu_keeps_nan_like_torch():
    x = torch.randn(4, 3, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    ours = MF.batch_norm_relu(x, torch.zeros(3), torch.ones(3), training=False)
    theirs = torch.relu(torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3)))
    assert torch.equal(ours.isnan(), theirs.isnan())


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
    torch.library.opcheck(mkops.batch_norm_backward.default,
                          (torch.randn_like(x), x.detach(), rm, rv, w.detach(), 1e-5, True,
                           [True, True, True], None, None, None, y))


def test_residual_of_another_shape_is_an_error():
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match="expected residual like input"):
        MF.batch_norm_add_relu(x, torch.randn(4, 3, 5, 4), None, None, training=True)


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
