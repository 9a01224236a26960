"""python -m modekernels.bench (also `modekernels-bench`): verify every op, then benchmark it.

On each device (CPU always, CUDA when present, or the one --device names) it prints the
environment, measures the copy bandwidth, verifies every op against torch's layers (all dtypes,
both modes, forward and backward), times the op suites against torch eager and torch.compile,
times whole models with torch's layers and with ours, and writes CSV, JSON, a Markdown summary
and PNG charts to OUT/<device>/. It exits with status 1 if any verification failed.
"""
import argparse
import json
import math
import pathlib
import shlex
import sys
import tempfile

import torch

from . import batch_norm, dropout, e2e, fused, harness, report, verify

SUITES = {"dropout": dropout, "batch_norm": batch_norm, "fused": fused}
# Bytes a copy moves for the headline roofline figure, timed with cold caches: the memory's.
ROOFLINE_BYTES = {"tiny": 1 << 23, "quick": 1 << 28, "full": 1 << 30}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m modekernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: the CPU, then CUDA when available")
    parser.add_argument("--dtype", nargs="+", type=harness.parse_dtype,
                        help="dtypes to time (default: float32, and bfloat16 on CUDA); "
                             "verification always covers float32, float64, float16, bfloat16")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="the default shape set: about a minute per section on 2 CPU cores")
    size.add_argument("--full", dest="size", action="store_const", const="full",
                      help="adds large and ResNet-50 shapes (the default on CUDA)")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny",
                      help="tiny shapes, for a smoke test of the whole command")
    parser.add_argument("--ops", nargs="+", choices=list(SUITES), default=list(SUITES),
                        help="op suites to time (default: all)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out the torch.compile variant (compiling dominates short runs)")
    parser.add_argument("--no-models", dest="models", action="store_false",
                        help="skip the end-to-end model section")
    parser.add_argument("--distributed", action="store_true",
                        help="add the SyncBatchNorm section: 2 gloo processes on the CPU; on CUDA "
                             "with 2 or more GPUs, nccl and torch's SyncBatchNorm too")
    parser.add_argument("--cache", choices=harness.CACHES,
                        help="what the caches hold before each timed call: warm (the variant's "
                             "own inputs and outputs, after an untimed call of it; the default on "
                             "the CPU) or cold (nothing of them: a buffer twice the last cache's "
                             "size is swept first; the default on CUDA)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, help="seconds per timed case")
    parser.add_argument("--out", default="bench-results", help="output folder (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout instead of tables")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA device here")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.min_run_time is not None and not 0 < args.min_run_time < math.inf:
        parser.error(f"--min-run-time must be a positive number of seconds, got {args.min_run_time}")
    try:  # before anything runs: a folder that cannot be written would lose the whole run
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as exc:
        parser.error(f"--out {args.out}: cannot write there ({exc.strerror or exc})")
    return args


def run_device(device, args, command, size, log):
    env = harness.environment(device)
    log(f"\n== {device.type}: {report.environment_line(env)}")
    min_run_time = args.min_run_time or (0.02 if size == "tiny" else 0.1)
    dtypes = args.dtype or ([torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32])
    cache = args.cache or harness.default_cache(device)
    env["cache"] = harness.cache_description(device, cache)
    log(f"timing with {env['cache']}")

    copy_s, _ = harness.copy_roofline(ROOFLINE_BYTES[size], device, min_run_time, "cold")
    roofline = {"nbytes": ROOFLINE_BYTES[size], "copy_ms": 1e3 * copy_s,
                "gb_s": harness.gb_per_s(ROOFLINE_BYTES[size], copy_s)}
    log(f"copy roofline: {roofline['gb_s']:.1f} GB/s over {roofline['nbytes'] / 1e6:.0f} MB")

    results = {"command": command, "environment": env, "roofline": roofline}
    results["verify"] = verify.verify(device, harness.FLOAT_DTYPES, args.progress)
    failed = sum(not r["passed"] for r in results["verify"])
    log(f"\nverification: {len(results['verify']) - failed} of {len(results['verify'])} passed")
    log(report.text_table(verify.summarize(results["verify"]), "verify_summary"))
    if failed:
        log(report.text_table([r for r in results["verify"] if not r["passed"]], "verify"))

    suite_of = {case: SUITES[name] for name in args.ops for case in SUITES[name].cases(size, dtypes)
                if args.compile or case.variant != harness.COMPILE}
    results["ops"] = harness.run(list(suite_of), lambda case, dev: suite_of[case].prepare(case, dev),
                                 device, min_run_time, args.progress, cache)
    log("\n" + report.text_table(results["ops"], "ops"))
    if args.models:
        results["models"] = e2e.run_models(device, dtypes[0], size, 5 * min_run_time, args.progress,
                                            cache)
        log("\n" + report.text_table(results["models"], "models"))
    if args.distributed and (device.type == "cpu" or torch.cuda.device_count() >= 2):
        from .distributed import run_distributed
        results["distributed"] = run_distributed(quick=size != "full", device=device.type)
        log("\n" + report.text_table(results["distributed"], "distributed"))
    return results, failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "modekernels.bench", *argv])
    malloc = harness.steady_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [args.device] if args.device else ["cpu"] + ["cuda"] * torch.cuda.is_available()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    everything, failed = {}, 0
    for name in devices:
        device = torch.device(name)
        size = args.size or ("full" if device.type == "cuda" else "quick")
        results, device_failed = run_device(device, args, command, size, log)
        device_failed += sum(not r["verified"] for r in results["ops"])
        results["environment"]["malloc"] = malloc
        failed += device_failed
        paths = report.write(results, f"{args.out}/{device.type}")
        log(f"\nwrote {', '.join(map(str, paths))}")
        everything[device.type] = results
    if args.json:
        print(json.dumps(everything, indent=1))
    return 1 if failed else 0
