"""End-to-end section: whole models with torch's layers, then with ours swapped in by `convert`.

Models: torchvision's ResNet-18 (random weights, nothing downloaded) and a transformer-style MLP
block with dropout. For each, one training step (forward, loss, backward, SGD step) and one
inference step (eval mode, inference_mode) are timed with the harness timers, and the peak memory
of one step is measured with torch's MemTracker (a dispatch-mode tracker of every tensor
allocation, CPU and CUDA alike), counting parameters, gradients, activations and temporaries.
"""
import copy

import torch

import modekernels

from .harness import BASELINE, add_speedups, dtype_str, progress_bar, shape_str, time_interleaved

VARIANTS = (BASELINE, "modekernels")


class MLPBlock(torch.nn.Module):
    """x + Dropout(Linear(Dropout(GELU(Linear(LayerNorm(x)))))), the MLP half of a transformer layer."""

    def __init__(self, width, p=0.1):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Dropout(p),
            torch.nn.Linear(4 * width, width), torch.nn.Dropout(p))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def _resnet18():
    try:
        import torchvision
    except Exception:  # absent, or built for another torch (its import raises RuntimeError then)
        return None
    return torchvision.models.resnet18(weights=None, num_classes=100)


# name -> (builder, input shape per size, loss of the output)
MODELS = {
    "resnet18": (_resnet18, {"tiny": (2, 3, 32, 32), "quick": (8, 3, 64, 64),
                             "full": (32, 3, 224, 224)}, "classes"),
    "mlp_block": (lambda: MLPBlock(256), {"tiny": (2, 8, 256), "quick": (8, 128, 256),
                                          "full": (32, 512, 256)}, "mean_square"),
}


def _loss(output, kind):
    if kind == "classes":  # labels fixed by the output's own shape: the same for every variant
        labels = torch.arange(output.shape[0], device=output.device) % output.shape[1]
        return torch.nn.functional.cross_entropy(output.float(), labels)
    return output.float().square().mean()


def _steps(model, x, loss_kind):
    """(train_step, inference_step) closures over `model`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        _loss(model(x), loss_kind).backward()
        optimizer.step()

    def inference_step():
        model.eval()
        with torch.inference_mode():
            return model(x)

    return train_step, inference_step


def peak_bytes(fn, model):
    """Peak bytes of live tensors (all kinds) while fn() runs, or None without MemTracker."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        fn()
    return max(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values())


def run_models(device, dtype, size="quick", min_run_time=0.5, progress=True, cache=None):
    """One row per (model, step, variant); `speedup` is torch's time over the variant's. The
    variants of a (model, step) are timed in turns (time_interleaved, in the cache regime
    `cache`)."""
    rows = []
    grid = [(name, step) for name in MODELS for step in ("train", "inference")]
    bar, log = progress_bar(grid, "models", progress)
    built = {}
    for name, step in bar:
        build, shapes, loss_kind = MODELS[name]
        if name not in built:
            model = build()
            if model is None:
                log(f"skip {name}: no torchvision that imports with this torch")
            built[name] = model
        if built[name] is None:
            continue
        shape = shapes[size]
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        fns = {}
        for variant in VARIANTS:
            model = copy.deepcopy(built[name])
            if variant == "modekernels":
                modekernels.convert(model, fuse=True)
            model.to(device, dtype)
            train_step, inference_step = _steps(model, x, loss_kind)
            fns[variant] = (train_step if step == "train" else inference_step), model
        times = time_interleaved([fn for fn, _ in fns.values()], device, min_run_time, cache=cache)
        for (variant, (fn, model)), seconds in zip(fns.items(), times):
            rows.append({
                "model": name, "step": step, "variant": variant, "shape": shape_str(shape),
                "dtype": dtype_str(dtype), "time_ms": 1e3 * seconds, "speedup": None,
                "peak_bytes": peak_bytes(fn, model),
            })
    add_speedups(rows, ("model", "step"))
    return rows
