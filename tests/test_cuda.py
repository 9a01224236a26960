"""CUDA-only checks of the issue "GPU proof" that the other files do not make: BatchNorm and
channel-wise dropout over (and just under) 2^31 elements, and torch.compile's
mode="reduce-overhead" (CUDA graphs) in training. They skip without a GPU. (Dropout's 64-bit and
graph-replay tests are in test_dropout.py; BatchNorm against cuDNN and against torch's own
kernels in test_batch_norm.py.)"""
import copy
import math

import pytest
import torch

import modekernels

from helpers import cuda

pytestmark = cuda


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_batch_norm_64bit_indexing(fmt):
    # 2^31 + 2^17 float16 elements. All are 0 but the last 2^16 in memory, a ramp of period 7, so
    # an index that wraps at 2^31 reads a 0 (or the wrong ramp value) and shows in the statistics,
    # the outputs at the end of memory and the gradients.
    N, C, H, W = 2, 2, 2**14, 2**15 + 2
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.empty(N, C, H, W, device="cuda", dtype=torch.float16, memory_format=memory_format).zero_()
    flat = x.permute(0, 2, 3, 1) if fmt == "channels_last" else x  # memory order
    flat = flat.view(-1)
    tail = 2**16
    flat[-tail:] = ((torch.arange(tail, device="cuda") % 7 - 3) * 16).half()

    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
    del xf
    bn = modekernels.BatchNorm2d(C).cuda()
    eps = bn.eps
    xg = x.detach().requires_grad_()
    y = bn(xg)
    y.backward(x)  # dy = x: every gradient is known in closed form

    def normalized(values, channels):
        """The memory tail normalized with the reference statistics, in float64."""
        return (values.double() - mean.double()[channels]) / torch.sqrt(var.double()[channels] + eps)

    def tail_of(t):
        t = t.permute(0, 2, 3, 1) if fmt == "channels_last" else t
        return t.reshape(-1)[-tail:]

    channels = tail_of(torch.arange(C, device="cuda").view(1, C, 1, 1).expand(N, C, H, W))
    values = tail_of(x)
    count = N * H * W
    batch_mean, batch_var = torch.ops.modekernels.batch_norm_stats(x)
    torch.testing.assert_close(batch_mean, mean, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(batch_var, var, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var * count / (count - 1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(tail_of(y).float(), normalized(values, channels).float(), rtol=2e-3, atol=2e-3)
    # dx = xhat * eps / (var + eps) with dy = x; dweight = sum(dy xhat) = count var / sigma; dbias = sum(x).
    shrink = eps / (var.double()[channels] + eps)
    torch.testing.assert_close(tail_of(xg.grad).float(), (normalized(values, channels) * shrink).float(),
                               rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(bn.weight.grad.double(), count * var.double() / torch.sqrt(var.double() + eps),
                               rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(bn.bias.grad.double(), mean.double() * count, rtol=1e-3, atol=1e-2)
    del y, xg

    bn.eval()
    out = bn(x)
    rm, rv = bn.running_mean.double()[channels], bn.running_var.double()[channels]
    torch.testing.assert_close(tail_of(out).float(), ((values.double() - rm) / torch.sqrt(rv + eps)).float(),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("shape,fmt", [((2, 2, 2**29 - 1), "contiguous"), ((2, 2, 2**29 + 1), "contiguous"),
                                       ((2, 4, 2**14, 2**14 + 1), "channels_last")])
def test_channelwise_dropout_at_the_32bit_limit(shape, fmt):
    # Just under 2^31 elements (32-bit indexing, where a grid-stride index near the end could
    # wrap) and over it (64-bit), float16: every (n, c) unit takes one multiplier, 0 or 2, to its
    # last element, and the backward regenerates the forward's mask.
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.ones(shape, device="cuda", dtype=torch.float16).contiguous(memory_format=memory_format)
    y, state = torch.ops.modekernels.feature_dropout(x, 0.5)
    units = y.flatten(2)
    lo, hi = units.amin(-1), units.amax(-1)
    del units
    assert torch.equal(lo, hi)
    assert set(lo.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(torch.ops.modekernels.feature_dropout_backward(x, state, 0.5), y)


def test_torch_compile_reduce_overhead_dropout_draws_fresh_masks():
    # mode="reduce-overhead" replays CUDA graphs: every step must still draw a new mask, and the
    # backward must apply the mask of its own step.
    torch._dynamo.reset()
    step = torch.compile(modekernels.Dropout(0.5), mode="reduce-overhead", fullgraph=True)
    x = (torch.rand(4096, device="cuda") + 0.5).requires_grad_()
    masks = []
    for _ in range(4):
        y = step(x)
        y.backward(torch.ones_like(y))
        kept = (y != 0).clone()
        torch.testing.assert_close(y, torch.where(kept, x * 2, 0.0), rtol=0, atol=0)
        torch.testing.assert_close(x.grad, torch.where(kept, 2.0, 0.0), rtol=0, atol=0)
        assert 0.4 < kept.float().mean().item() < 0.6
        masks.append(kept)
        x.grad = None
    assert all(not torch.equal(a, b) for a, b in zip(masks, masks[1:]))


@pytest.mark.parametrize("fused", ["plain", "relu", "add-relu"])
def test_torch_compile_reduce_overhead_batch_norm_matches_eager(fused):
    # The running statistics are module buffers that every training step updates in place; under
    # CUDA graphs they must come out as in eager mode, step after step, and so must the outputs
    # and gradients, in training and then in eval.
    torch._dynamo.reset()
    cls = {"plain": modekernels.BatchNorm2d, "relu": modekernels.BatchNormReLU2d,
           "add-relu": modekernels.BatchNormAddReLU2d}[fused]
    eager = cls(8).cuda()
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.uniform_(-0.5, 0.5)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, mode="reduce-overhead", fullgraph=True)
    for step in range(5):
        training = step < 3
        eager.train(training)
        compiled_module.train(training)
        x = torch.randn(4, 8, 6, 6, device="cuda") * 2 + 1
        residual = [torch.randn_like(x)] if fused == "add-relu" else []
        grad = torch.randn_like(x)
        outs = []
        for module in (eager, compiled):
            xi = x.clone().requires_grad_()
            y = module(xi, *residual)
            y.backward(grad)
            outs.append((y.detach().clone(), xi.grad.clone()))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        for (name, a), (_, b) in zip(eager.state_dict().items(), compiled_module.state_dict().items()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        for p_eager, p_compiled in zip(eager.parameters(), compiled_module.parameters()):
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-5, atol=1e-5)
            p_eager.grad = p_compiled.grad = None
    assert eager.num_batches_tracked.item() == 3 and math.isfinite(eager.running_var.sum().item())
