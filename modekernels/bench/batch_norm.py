"""BatchNorm suite: modekernels.BatchNorm1d/2d/3d vs torch's vs torch.compile of torch's.

Times the training forward, the eval forward (under no_grad) and the training forward+backward.
Low-precision inputs run with float32 parameters and running statistics, as under autocast.
"""
import copy
import functools
import itertools

import torch

import modekernels

from . import harness
from .harness import COMPILE, Bench, Case

VARIANTS = ("modekernels", "torch", COMPILE)
MODES = (("train", "fwd"), ("eval", "fwd"), ("train", "fwd+bwd"))
LAYOUTS = ("contiguous", "channels_last")
# 2d at two sizes, at 3x3 (rows that the CPU walks as channels-last columns), 1d (N, C).
QUICK = ((8, 64, 56, 56), (8, 256, 56, 56), (128, 256, 3, 3), (256, 4096))
SHAPES = {"tiny": ((4, 8, 6, 6), (16, 8)), "quick": QUICK,
          "full": QUICK + ((4, 64, 16, 28, 28),  # 3d
                           (64, 256, 56, 56), (64, 512, 28, 28), (64, 2048, 7, 7))}  # ResNet-50

# The least traffic, in full-size tensors: the forward reads x and writes y; the backward reads
# the incoming gradient and x and writes the input's gradient. A training forward reads x twice in
# practice (statistics, then normalisation) and a backward reads both inputs twice (reductions,
# then the elementwise pass); the minimum counts each once, and leaves out the C-length parameter
# and statistics vectors.
TENSOR_PASSES = {"fwd": 2, "fwd+bwd": 5}

CLASSES = {  # input dims -> (ours, torch's)
    2: (modekernels.BatchNorm1d, torch.nn.BatchNorm1d),
    3: (modekernels.BatchNorm1d, torch.nn.BatchNorm1d),
    4: (modekernels.BatchNorm2d, torch.nn.BatchNorm2d),
    5: (modekernels.BatchNorm3d, torch.nn.BatchNorm3d),
}


def cases(size, dtypes, layouts=LAYOUTS):
    grid = itertools.product(SHAPES[size], dtypes, layouts, MODES, VARIANTS)
    return [Case("batch_norm", shape, dtype, layout, mode, direction, variant)
            for shape, dtype, layout, (mode, direction), variant in grid
            if layout == "contiguous" or len(shape) in (4, 5)]


def to_layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t.contiguous()


@functools.lru_cache(maxsize=1)
def inputs(shape, dtype, device):
    """(x, incoming gradient, torch layer holding the initial state): the same for every variant."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
    grad = torch.randn(shape, generator=gen).to(device, dtype)
    layer = CLASSES[len(shape)][1](shape[1])
    with torch.no_grad():
        for t, low, high in ((layer.weight, 0.5, 1.5), (layer.bias, -1, 1),
                             (layer.running_mean, -1, 1), (layer.running_var, 0.5, 2)):
            t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)
    return x, grad, layer.to(device, harness.param_dtype(dtype))


def make_layer(variant, shape, dtype, device, mode):
    """(the module, what to call): a fresh layer of the variant with the initial state of `inputs`."""
    ours, theirs = CLASSES[len(shape)]
    module = (ours if variant == "modekernels" else theirs)(shape[1])
    module.load_state_dict(inputs(shape, dtype, device)[2].state_dict())
    module.to(device, harness.param_dtype(dtype)).train(mode == "train")
    return module, harness.compiled(module) if variant == COMPILE else module


def step(call, module, x, grad, mode, direction):
    """The timed call: forward, eval forward under no_grad, or forward+backward to all inputs."""
    if direction == "fwd+bwd":
        x = x.detach().requires_grad_()
        return lambda: torch.autograd.grad(call(x), (x, module.weight, module.bias), grad)
    if mode == "eval":
        return torch.no_grad()(lambda: call(x))
    return lambda: call(x)


def observe(step_fn, module, mode, direction):
    """One step's results in float64: output or gradients, then running statistics in training."""
    out = step_fn()
    names = ("grad_input", "grad_weight", "grad_bias") if direction == "fwd+bwd" else ("output",)
    results = dict(zip(names, out if direction == "fwd+bwd" else (out,)))
    if mode == "train":
        results.update(running_mean=module.running_mean, running_var=module.running_var)
    return {k: v.detach().to(torch.float64, copy=True) for k, v in results.items()}


@functools.lru_cache(maxsize=1)
def expected(shape, dtype, device, mode, direction):
    """The step computed in float64 by torch's layer from the same state and inputs."""
    x, grad, initial = inputs(shape, dtype, device)
    ref = copy.deepcopy(initial).double().train(mode == "train")
    return observe(step(ref, ref, x.double(), grad.double(), mode, direction), ref, mode, direction)


def prepare(case, device):
    x, grad, _ = inputs(case.shape, case.dtype, device)
    x, grad = to_layout(x, case.layout), to_layout(grad, case.layout)
    module, call = make_layer(case.variant, case.shape, case.dtype, device, case.mode)
    fn = step(call, module, x, grad, case.mode, case.direction)

    def verify():
        want = expected(case.shape, case.dtype, device, case.mode, case.direction)
        got = observe(fn, module, case.mode, case.direction)
        for name, value in want.items():
            harness.assert_close(got[name], value, case.dtype, name)

    nbytes = TENSOR_PASSES[case.direction] * x.nbytes
    if case.direction == "fwd":
        return Bench(fn, verify, nbytes, output_bytes=x.nbytes)
    return Bench(fn, verify, nbytes, forward=lambda: call(x.detach().requires_grad_()))
