"""Benchmark harness: environment record, timers, copy roofline, case runner, text table.

Nothing here parses a command line or touches CUDA at import time. An op suite (dropout.py,
batch_norm.py, fused.py) builds its list of `Case`s and a `prepare(case, device) -> Bench`
function; `run` verifies and times them.
"""
import argparse
import ctypes
import dataclasses
import datetime
import functools
import glob
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

import modekernels

BASELINE = "torch"  # the variant every speed-up is measured against
COMPILE = "torch.compile"  # the variant whose failures are skipped instead of raised

# Tolerances when comparing with torch or a float64 reference, per dtype.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual, expected, dtype, name="result"):
    """|actual - expected| <= atol * scale + rtol * |expected| elementwise, with TOL[dtype].

    scale is expected's largest magnitude (at least 1): the rounding error of a reduction (a
    batch-norm weight gradient sums N*H*W terms) grows with its result. Written with plain
    tensor ops, as torch.testing.assert_close is slow on tensors of 50M elements.
    """
    tol = TOL[dtype]
    actual = actual.detach().to(expected.dtype)
    magnitude = expected.abs()
    scale = max(1.0, magnitude.max().item()) if expected.numel() else 1.0
    diff = (actual - expected).abs()
    bad = ~(diff <= magnitude.mul_(tol["rtol"]).add_(tol["atol"] * scale))  # NaN counts as bad
    if bad.any():
        raise AssertionError(f"{name}: {bad.sum().item()} of {bad.numel()} elements differ, the most by "
                             f"{diff.max().item():.3g} (atol {tol['atol']} x {scale:.3g}, "
                             f"rtol {tol['rtol']}, {dtype_str(dtype)})")


# ----------------------------------------------------------------------------- environment

def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    """What the numbers were measured on: recorded with every result."""
    device = torch.device(device)
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "built_with": modekernels.built_with(),
        # Which build of the CPU kernels ran (csrc/common/cpu_capability.h), and torch's.
        "cpu_kernels": modekernels._C.cpu_capability,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------- timing

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h


def steady_malloc():
    """Fixes glibc malloc's thresholds so that CPU timings do not depend on its history.

    By default glibc raises its mmap threshold as large blocks are freed and gives freed memory
    back to the system, so whether a fresh output of 25 MB costs page faults (several ms on the
    CPU) depends on what the process allocated before: the same op measured 12 or 25 ms in one
    run. Fixed at 32 MB (glibc's largest) and never trimming, every allocation below 32 MB
    reuses freed memory, for every variant alike; larger ones always map fresh pages, which the
    `alloc %` column reports. Returns a description for the environment record, or None where
    the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        return None
    return "glibc: mmap threshold 32 MB, no trimming" if ok else None


CACHES = ("warm", "cold")


def default_cache(device):
    """The cache regime a device is timed in unless told otherwise: cold on CUDA, where an H100's
    50 MB L2 holds less than a layer's tensors, so inside a model they come from HBM; warm on the
    CPU, whose last-level cache (tens to hundreds of MB) holds a layer's tensors, as after the
    layer that wrote them."""
    return "cold" if torch.device(device).type == "cuda" else "warm"


_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}  # sysfs cache sizes: "2048K"


def last_level_cache_bytes():
    """Size of the CPU's largest cache (Linux sysfs), or 256 MB where it cannot be read."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = _SIZE_UNITS.get(text[-1])
        sizes.append(int(text[:-1]) * unit if unit else int(text))
    return max(sizes, default=256 << 20)


def flush_bytes(device):
    """Bytes the cold regime sweeps before each timed call: twice the last cache's size."""
    device = torch.device(device)
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).L2_cache_size
    return 2 * last_level_cache_bytes()


def cache_description(device, cache):
    if cache == "warm":
        return (f"warm: each timed call follows {WARM_SECONDS * 1e3:.0f} ms of untimed calls of "
                "the same variant")
    return f"cold: {flush_bytes(device) / 2**20:.0f} MB swept before each timed call"


# How long the warm regime runs a variant, untimed, before each timed call. On the Intel Xeon VM
# (2026-12-05) BatchNormReLU2d float16 forward+backward took 2.3 ms back to back, 4.1-5.1 ms as
# the first call after 60 ms with a core idle (as while torch.compile's variant of the same case
# ran), 3.2-3.9 ms after one untimed call, 2.6-2.9 ms after 20 ms of them and 2.5-2.6 ms after 50.
WARM_SECONDS = 0.05


def _warm(fn):
    t0 = time.perf_counter()
    fn()
    while time.perf_counter() - t0 < WARM_SECONDS:
        fn()


def _primer(device, cache):
    """What runs, untimed, before each timed call of fn to put the machine in the regime: warm,
    fn itself for WARM_SECONDS (at least once), so that the caches hold its data and the cores
    are busy; cold, a sweep over a buffer twice the last cache's size (written on CUDA; read on
    the CPU, so that no dirty lines are left for the timed call to write back)."""
    if cache == "warm":
        return _warm
    flush = _flush_buffer(str(device))
    if flush.is_cuda:
        return lambda fn: flush.zero_()
    return lambda fn: flush.max()


@functools.lru_cache(maxsize=None)
def _flush_buffer(device):
    return torch.zeros(flush_bytes(device), dtype=torch.uint8, device=device)


def time_interleaved(fns, device, min_run_time=0.2, min_calls=10, cache=None):
    """Median seconds of one call of each of fns, the fns called in turns: one call of each, then
    again, until each has had min_calls timed calls and the turns have taken min_run_time per fn.

    Variants of a case (ours, torch eager, torch.compile) are timed in the same stretch of time,
    so that a machine whose speed drifts (a shared VM whose neighbours take memory bandwidth, a
    GPU changing clocks) moves them alike and their ratio holds: timed one after the other on the
    development VM, the same two BatchNorm+ReLU variants measured 1.9x in one run and 3.7x in the
    next. Each fn is first called once on the CPU, three times on CUDA (lazy initialisation,
    compilation).
    Before each timed call the caches are put in the same state for every fn (`cache`, default
    `default_cache(device)`): "warm" runs fn untimed for WARM_SECONDS, "cold" sweeps a buffer
    twice the last cache's size. Without that, a call would find whatever the previous fn in the
    turn left in the caches and the cores, so one variant's time would depend on which others
    share its case (on a CPU with a large last-level cache, ours measured 2.2 ms alone, 2.9 ms in
    turns with torch's sequence and 4.3 ms with torch.compile's as well).
    CPU: time.perf_counter around each call, at torch's thread count. CUDA: CUDA events around
    each call on the current stream.
    """
    cuda = torch.device(device).type == "cuda"
    prime = _primer(device, cache or default_cache(device))
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def seconds(fn):
        prime(fn)
        if not cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    for fn in fns:
        for _ in range(3 if cuda else 1):
            fn()
    per_call = [[] for _ in fns]
    t0 = time.perf_counter()
    while len(per_call[0]) < min_calls or time.perf_counter() - t0 < min_run_time * len(fns):
        for fn, times in zip(fns, per_call):
            times.append(seconds(fn))
    return [statistics.median(times) for times in per_call]


def time_fn(fn, device, min_run_time=0.2, cache=None):
    """Median seconds of one fn() call, after warm-up (time_interleaved of fn alone)."""
    return time_interleaved([fn], device, min_run_time, cache=cache)[0]


_copies = {}


def copy_roofline(nbytes, device, min_run_time=0.2, cache=None):
    """(copy_s, clone_s): a plain copy moving nbytes in all (reading nbytes/2, writing nbytes/2),
    timed in the cache regime `cache` (time_interleaved).

    copy_s copies into a preallocated buffer; clone_s makes a fresh `src.clone()`, so
    clone_s - copy_s is what allocating and first touching the destination costs. Measured once
    per size, device and regime in each run, next to the cases that use it.
    """
    key = (nbytes, str(device), cache or default_cache(device))
    if key not in _copies:
        src = torch.ones(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        _copies[key] = (time_fn(lambda: dst.copy_(src), device, min_run_time, key[2]),
                        time_fn(src.clone, device, min_run_time, key[2]))
    return _copies[key]


def gb_per_s(nbytes, seconds):
    return nbytes / seconds / 1e9


def pct_of_copy(seconds, copy_seconds):
    """Bandwidth achieved as a percentage of a copy's bandwidth over the same bytes."""
    return 100.0 * copy_seconds / seconds


def saved_bytes(forward):
    """Bytes of the distinct tensors autograd saves for backward while forward() runs."""
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.nbytes)] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


# ----------------------------------------------------------------------------- cases, runner

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def parse_dtype(name):
    """A --dtype argument: one of the dtypes the ops take."""
    dtype = getattr(torch, name, None)
    if dtype not in FLOAT_DTYPES:
        raise argparse.ArgumentTypeError(
            f"{name!r} is not one of {', '.join(map(dtype_str, FLOAT_DTYPES))}")
    return dtype


def shape_str(shape):
    return "x".join(map(str, shape))


def dtype_str(dtype):
    return str(dtype).removeprefix("torch.")


def param_dtype(dtype):
    """BatchNorm parameters' dtype for inputs of `dtype`: float32 for float16 and bfloat16, as in
    mixed-precision training, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    layout: str = "contiguous"
    mode: str = "train"  # train | eval
    direction: str = "fwd"  # fwd | fwd+bwd
    variant: str = BASELINE  # modekernels | torch | torch.compile

    def fields(self):
        d = dataclasses.asdict(self)
        return {**d, "shape": shape_str(self.shape), "dtype": dtype_str(self.dtype)}

    def label(self):
        return " ".join(self.fields().values())


CASE_FIELDS = [f.name for f in dataclasses.fields(Case)]


@dataclasses.dataclass
class Bench:
    """What prepare(case) returns."""
    fn: Callable[[], object]  # the timed call
    verify: Callable[[], None]  # raises AssertionError if the case computes something wrong
    nbytes: int  # bytes that must move at the least: effective GB/s and the copy roofline use it
    forward: Callable[[], object] | None = None  # forward alone, to count the bytes saved for backward
    output_bytes: int | None = None  # a fresh output whose allocation's share of the time is reported


class Skip(Exception):
    """A case that cannot run here; the runner prints why and goes on."""


def compiled(module):
    """torch.compile(module), compiled on its first call.

    Dynamo's caches are reset first: otherwise the earlier cases' compilations of the same
    forward count towards its recompile limit, past which it silently runs eager.
    """
    torch._dynamo.reset()
    return torch.compile(module)


def _verify(case, bench):
    try:
        bench.verify()
    except AssertionError:
        raise
    except Exception as exc:
        if case.variant != COMPILE:
            raise
        # torch.compile errors surface on the first call, forward or backward.
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise Skip(f"torch.compile failed: {type(exc).__name__}: {reason}") from exc


def progress_bar(items, desc, enabled=True):
    """tqdm over items when tqdm is installed and enabled, else items; returns (iterable, log).
    The log goes to stderr, with the bar: stdout holds the tables, or the JSON of --json."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items, functools.partial(print, file=sys.stderr)
    bar = tqdm(items, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
    return bar, functools.partial(tqdm.write, file=sys.stderr)


def run(cases, prepare, device, min_run_time=0.2, progress=True, cache=None):
    """Verify, then time, every case; returns one result row (a dict) per case that ran.

    The variants of a case are prepared and verified first, then timed in turns
    (time_interleaved, in the cache regime `cache`), so that their ratios are measured over the
    same stretch of time. A case that computes something wrong is not timed: its row has
    `verified` false and the `error`, and the run goes on.
    """
    groups = {}
    for case in cases:
        groups.setdefault(dataclasses.replace(case, variant=BASELINE), []).append(case)
    rows = []
    bar, log = progress_bar(list(groups.values()), "timing", progress)
    for group in bar:
        ready = []
        for case in group:
            try:
                bench = prepare(case, device)
                _verify(case, bench)
            except Skip as exc:
                log(f"skip {case.label()}: {exc}")
                continue
            except AssertionError as exc:
                log(f"FAIL {case.label()}: {exc}")
                rows.append({**case.fields(), "verified": False, "error": str(exc)})
                continue
            ready.append((case, bench))
        times = time_interleaved([bench.fn for _, bench in ready], device, min_run_time,
                                 cache=cache) if ready else []
        rows += [_row(case, bench, seconds, device, min_run_time, cache)
                 for (case, bench), seconds in zip(ready, times)]
    add_speedups(rows)
    return rows


def _row(case, bench, seconds, device, min_run_time, cache):
    copy_s, clone_s = copy_roofline(bench.nbytes, device, min_run_time, cache)
    alloc_pct = None
    if bench.output_bytes:  # a copy writing output_bytes, into a fresh vs a preallocated tensor
        out_copy_s, out_clone_s = copy_roofline(2 * bench.output_bytes, device, min_run_time, cache)
        alloc_pct = 100.0 * max(out_clone_s - out_copy_s, 0.0) / seconds
    return {
        **case.fields(),
        "time_ms": 1e3 * seconds,
        "gb_s": gb_per_s(bench.nbytes, seconds),
        "pct_copy": pct_of_copy(seconds, copy_s),
        "alloc_pct": alloc_pct,
        "speedup": None,
        "saved_bytes": saved_bytes(bench.forward) if bench.forward else None,
        "nbytes": bench.nbytes,
        "copy_ms": 1e3 * copy_s,
        "clone_ms": 1e3 * clone_s,
        "verified": True,
    }


def add_speedups(rows, fields=CASE_FIELDS):
    """Sets row["speedup"] = the BASELINE variant's time_ms / the row's, matching on `fields`."""
    def key(row):
        return tuple(row[k] for k in fields if k != "variant")

    timed = [r for r in rows if r.get("time_ms")]
    baseline = {key(r): r["time_ms"] for r in timed if r["variant"] == BASELINE}
    for r in timed:
        if key(r) in baseline:
            r["speedup"] = baseline[key(r)] / r["time_ms"]
