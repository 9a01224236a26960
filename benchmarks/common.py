"""Shared benchmark harness: environment record, timers, copy roofline, case runner, CSV/JSON output.

Nothing here parses a command line or touches CUDA at import time. A benchmark builds its list of
`Case`s and a `prepare(case) -> Bench` function, then calls `run` and `report`.
"""
import csv
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
from typing import Callable

import torch
import torch.utils.benchmark

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
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------- timing

def _time_cpu(fn, min_run_time):
    fn()  # warm-up: lazy initialisation, compilation; blocked_autorange's first call warms further
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                        num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _time_cuda(fn, min_run_time, warmup=3, min_blocks=5):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    # Blocks of `reps` back-to-back calls, about a tenth of min_run_time each; the median block wins.
    reps = max(1, int(min_run_time / 10 / max(start.elapsed_time(end) / 1e3, 1e-6)))
    per_call, total = [], 0.0
    while total < min_run_time or len(per_call) < min_blocks:
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        per_call.append(seconds / reps)
        total += seconds
    return statistics.median(per_call)


def time_fn(fn, device, min_run_time=0.2):
    """Median seconds of one fn() call, after warm-up.

    CPU: torch.utils.benchmark's blocked_autorange at torch.get_num_threads() threads.
    CUDA: CUDA events around blocks of calls on the current stream.
    """
    if torch.device(device).type == "cuda":
        return _time_cuda(fn, min_run_time)
    return _time_cpu(fn, min_run_time)


_copies = {}


def copy_roofline(nbytes, device, min_run_time=0.2):
    """(copy_s, clone_s): a plain copy moving nbytes in all (reading nbytes/2, writing nbytes/2).

    copy_s copies into a preallocated buffer; clone_s makes a fresh `src.clone()`, so
    clone_s - copy_s is what allocating and first touching the destination costs. Measured once
    per size and device in each run, next to the cases that use it.
    """
    key = (nbytes, str(device))
    if key not in _copies:
        src = torch.ones(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        _copies[key] = (time_fn(lambda: dst.copy_(src), device, min_run_time),
                        time_fn(src.clone, device, min_run_time))
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

def parse_shape(text):
    """'8x256x56x56' -> (8, 256, 56, 56)."""
    return tuple(int(n) for n in text.split("x"))


def parse_dtype(name):
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def shape_str(shape):
    return "x".join(map(str, shape))


def dtype_str(dtype):
    return str(dtype).removeprefix("torch.")


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


_CASE_FIELDS = [f.name for f in dataclasses.fields(Case)]


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


def run(cases, prepare, device, min_run_time=0.2):
    """Verify, then time, every case; returns one result row (a dict) per case that ran."""
    rows = []
    for case in cases:
        try:
            bench = prepare(case)
            _verify(case, bench)
        except Skip as exc:
            print(f"skip {case.label()}: {exc}")
            continue
        seconds = time_fn(bench.fn, device, min_run_time)
        copy_s, clone_s = copy_roofline(bench.nbytes, device, min_run_time)
        alloc_pct = None
        if bench.output_bytes:  # a copy writing output_bytes, into a fresh vs a preallocated tensor
            out_copy_s, out_clone_s = copy_roofline(2 * bench.output_bytes, device, min_run_time)
            alloc_pct = 100.0 * max(out_clone_s - out_copy_s, 0.0) / seconds
        rows.append({
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
        })
        print(f"  {case.label()}: {rows[-1]['time_ms']:.3f} ms", flush=True)
    _add_speedups(rows)
    return rows


def _add_speedups(rows):
    def key(row):
        return tuple(row[k] for k in _CASE_FIELDS if k != "variant")

    baseline = {key(r): r["time_ms"] for r in rows if r["variant"] == BASELINE}
    for r in rows:
        if key(r) in baseline:
            r["speedup"] = baseline[key(r)] / r["time_ms"]


# ---------------------------------------------------------------------------------- output

_COLUMNS = [  # (row key, header, format) after the case fields
    ("time_ms", "ms", "{:.3f}"),
    ("gb_s", "GB/s", "{:.1f}"),
    ("pct_copy", "% copy", "{:.0f}"),
    ("alloc_pct", "alloc %", "{:.0f}"),
    ("speedup", "vs torch", "{:.2f}x"),
    ("saved_bytes", "saved B", "{:,}"),
]


def format_table(rows):
    """The rows as text: case fields that vary get a column, constant ones go in a header line."""
    if not rows:
        return "(no results)"
    constant = [k for k in _CASE_FIELDS if len({r[k] for r in rows}) == 1]
    varying = [k for k in _CASE_FIELDS if k not in constant]
    headers = varying + [h for _, h, _ in _COLUMNS]
    body = [[str(r[k]) for k in varying]
            + ["-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in _COLUMNS] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(headers, *body)]

    def line(cells):  # case fields to the left, numbers to the right
        return "  ".join(c.ljust(w) if i < len(varying) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([", ".join(f"{k}={rows[0][k]}" for k in constant), line(headers), *map(line, body)])


def write_results(rows, env, out_dir, name):
    """Writes OUT_DIR/NAME.csv (the environment repeated in columns) and NAME.json; returns paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env_cols = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in env.items()}
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*(rows[0] if rows else {}), *env_cols])
        writer.writeheader()
        writer.writerows({**r, **env_cols} for r in rows)
    json_path.write_text(json.dumps({"environment": env, "results": rows}, indent=1) + "\n")
    return csv_path, json_path


def report(rows, env, out_dir, name):
    """Prints the environment and the table, then writes the CSV and JSON files."""
    print(f"\n{name}: {env['device_name']} ({env['device']}, {env['threads']} threads), "
          f"torch {env['torch']}, CUDA {env['cuda']}, {env['date']}")
    print(format_table(rows))
    for path in write_results(rows, env, out_dir, name):
        print(f"wrote {path}")
