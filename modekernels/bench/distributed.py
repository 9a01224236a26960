"""Distributed section: one SyncBatchNorm training step across processes, and its baselines.

`run_distributed` spawns `world_size` processes (gloo on the CPU; nccl with one GPU each on
CUDA) and times, in every process at once, forward + backward of a 2-D BatchNorm layer on that
process's batch of the given per-process shape:

- modekernels_sync: modekernels.SyncBatchNorm (one all-gather in forward, one all-reduce in
  backward);
- modekernels_plain: modekernels.BatchNorm2d, each process on its own batch: the layer without
  communication;
- torch_sync: torch.nn.SyncBatchNorm, on CUDA only (torch's refuses CPU tensors).

Each variant's step is verified once against torch.nn.functional.batch_norm on the batch it
normalizes over (all processes' for the synchronized variants). Collectives are calls every
process must make together, so every process runs the same fixed number of steps: a few to warm
up, then `repeats` timed one by one; rank 0's median is reported. `bytes_exchanged` is what one
process hands the collectives in one step (the sizes of the tensors it passes to them, recorded
while the verified step runs).
"""
import contextlib
import datetime
import json
import os
import pathlib
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import modekernels

from .harness import assert_close, dtype_str, shape_str

LAYERS = {
    "modekernels_sync": modekernels.SyncBatchNorm,
    "modekernels_plain": modekernels.BatchNorm2d,
    "torch_sync": torch.nn.SyncBatchNorm,
}
SYNCHRONIZED = {"modekernels_sync", "torch_sync"}
SHAPES = {"quick": [(8, 64, 28, 28)],
          "full": [(8, 64, 28, 28), (32, 64, 56, 56), (16, 256, 14, 14)]}
WARMUP, REPEATS = 3, {"quick": 20, "full": 50}
DTYPE = torch.float32
# torch.distributed collective -> index of the argument holding what this process contributes.
_PAYLOAD_ARG = {"all_reduce": 0, "all_gather": 1, "all_gather_into_tensor": 1,
                "all_gather_single": 1}


def run_distributed(quick=True, device="cpu", world_size=2):
    """One row (a dict) per (shape, variant): see the module docstring; times in milliseconds.

    device="cuda" needs `world_size` GPUs and NCCL, and adds the torch_sync variant.
    """
    if device == "cuda" and not (dist.is_nccl_available()
                                 and torch.cuda.device_count() >= world_size):
        raise RuntimeError(f"the CUDA distributed benchmark needs NCCL and {world_size} GPUs")
    size = "quick" if quick else "full"
    variants = [v for v in LAYERS if device == "cuda" or v != "torch_sync"]
    with tempfile.TemporaryDirectory() as tmp:
        out_file = pathlib.Path(tmp) / "rows.json"
        spawn(_worker, world_size, device, SHAPES[size], variants, REPEATS[size], str(out_file))
        return json.loads(out_file.read_text())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size, *args, timeout=300):
    """Runs fn(rank, world_size, port, *args) in world_size new processes and waits for them.

    A process that raises makes this raise with its traceback (the others are terminated); if
    they have not all finished within `timeout` seconds, they are killed and TimeoutError raised,
    so that a collective one process never reached cannot hang the caller.
    """
    context = mp.start_processes(fn, args=(world_size, free_port(), *args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} processes did not finish within {timeout} s")


@contextlib.contextmanager
def process_group(rank, world_size, port, backend="gloo", timeout_s=60):
    """torch.distributed over TCP on this machine for the `with` block, with a timeout on every
    collective. A block that ends normally ends with a barrier, so that no process tears its
    connections down while another still uses them: without it, one run of the distributed tests
    in about 15 on two busy cores lost rank 0 to SIGABRT in teardown ("terminate called without
    an active exception"), after every rank had saved its results."""
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker(rank, world_size, port, device, shapes, variants, repeats, out_file):
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    with process_group(rank, world_size, port, "nccl" if device == "cuda" else "gloo"):
        rows = [_time_variant(variant, shape, device, repeats)
                for shape in shapes for variant in variants]
        if rank == 0:
            pathlib.Path(out_file).write_text(json.dumps(rows))


def _time_variant(variant, shape, device, repeats):
    layer = LAYERS[variant](shape[1]).to(device, DTYPE)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(shape, generator=gen, dtype=DTYPE).to(device).requires_grad_()
    grad = torch.randn(shape, generator=gen, dtype=DTYPE).to(device)

    def step():
        layer(x).backward(grad)

    with payloads() as sent:
        output = layer(x)
        output.backward(grad)
    _verify(output, x.detach(), variant in SYNCHRONIZED, variant)
    return {
        "section": "distributed", "op": "sync_batch_norm", "variant": variant,
        "world_size": dist.get_world_size(), "shape": shape_str(shape), "dtype": dtype_str(DTYPE),
        "median_ms": 1e3 * _median_seconds(step, device, repeats),
        "bytes_exchanged": sum(sent),
    }


def _verify(output, x, synchronized, variant):
    """output is batch_norm(x) over this process's batch, or over all of theirs together."""
    rows = slice(0, len(x))
    if synchronized:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        rows = slice(dist.get_rank() * len(x), (dist.get_rank() + 1) * len(x))
        x = torch.cat(parts)
    expected = torch.nn.functional.batch_norm(x.double(), None, None, training=True)[rows]
    assert_close(output, expected, DTYPE, variant)


@contextlib.contextmanager
def payloads():
    """A list that fills with the bytes handed to each torch.distributed collective in the block."""
    sent = []

    def recording(name, collective):
        def call(*args, **kwargs):
            sent.append(args[_PAYLOAD_ARG[name]].nbytes)
            return collective(*args, **kwargs)
        return call

    originals = {name: getattr(dist, name) for name in _PAYLOAD_ARG if hasattr(dist, name)}
    try:
        for name, collective in originals.items():
            setattr(dist, name, recording(name, collective))
        yield sent
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)


def _median_seconds(step, device, repeats):
    """Median of `repeats` single-step times after WARMUP steps; every process runs as many."""
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(WARMUP):
        step()
    synchronize()
    dist.barrier()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    from modekernels.bench import report

    print(report.text_table(run_distributed(), "distributed"))
