"""The main-job command end to end on tiny shapes: files written, verification passed.

Timings are recorded but never asserted on.
"""
import csv
import json

import pytest
import torch

from modekernels.bench import cli, harness, verify

from helpers import torchvision


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "WARM_SECONDS", 1e-3)  # the files, not the timings, are tested
        status = cli.main(["--device", "cpu", "--tiny", "--no-compile", "--no-progress",
                           "--ops", "dropout", "batch_norm", "fused", "--out", str(out)])
    return out / "cpu", status


def test_command_writes_every_file(report_dir):
    out, status = report_dir
    assert status == 0
    for name in ("verify.csv", "ops.csv", "models.csv", "results.json", "summary.md",
                 "throughput-dropout-cpu.png", "speedup-batch_norm-cpu.png"):
        assert (out / name).stat().st_size > 0, name


def test_verification_section_covers_every_op_and_passed(report_dir):
    out, _ = report_dir
    results = json.loads((out / "results.json").read_text())
    rows = results["verify"]
    assert {r["op"] for r in rows} == {c.op for c in verify.CHECKS}
    assert {r["dtype"] for r in rows} == {"float32", "float64", "float16", "bfloat16"}
    assert {(r["mode"], r["direction"]) for r in rows} == {
        (m, d) for m in ("train", "eval") for d in ("fwd", "bwd")}
    assert all(r["passed"] for r in rows)
    assert "Verification: %d of %d passed" % (len(rows), len(rows)) in (out / "summary.md").read_text()


def test_results_hold_environment_roofline_and_ratios(report_dir):
    out, _ = report_dir
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["device"] == "cpu"
    assert results["environment"]["cache"].startswith("warm: each timed call follows 1 ms")
    assert f"- Timing: {results['environment']['cache']}" in (out / "summary.md").read_text()
    assert results["roofline"]["gb_s"] > 0
    ops = results["ops"]
    assert {r["variant"] for r in ops} == {"modekernels", "torch"}
    assert all(r["speedup"] > 0 and r["pct_copy"] > 0 for r in ops)
    models = {(r["model"], r["variant"]) for r in results["models"]}
    assert ("mlp_block", "torch") in models
    assert (("resnet18", "modekernels") in models) == (torchvision is not None)
    with open(out / "ops.csv") as f:
        assert len(list(csv.DictReader(f))) == len(ops)


def test_a_wrong_kernel_fails_its_row(monkeypatch):
    op, uses_residual, uses_bias = verify._DROPOUT["dropout"]
    monkeypatch.setitem(verify._DROPOUT, "dropout",
                        (lambda *args: op(*args) * 1.01, uses_residual, uses_bias))
    monkeypatch.setattr(verify, "CHECKS", [verify.Check("dropout", (4, 8, 6, 5))])
    rows = verify.verify("cpu", [torch.float32], progress=False)
    assert [r["passed"] for r in rows if r["mode"] == "train"] == [False, False]


def test_a_case_that_fails_at_the_timed_size_is_reported_and_the_run_goes_on(monkeypatch, tmp_path,
                                                                             capsys):
    # A kernel that goes wrong only at the timed size: the case is not timed, the others are,
    # the report is written with the failure, stdout stays JSON, and the status is 1.
    from modekernels import functional
    right = functional.batch_norm
    monkeypatch.setattr(functional, "batch_norm", lambda *a, **k: right(*a, **k) * 1.01)
    monkeypatch.setattr(verify, "verify", lambda *a, **k: [])
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "models.csv").write_text("from an earlier run\n")
    status = cli.main(["--tiny", "--no-compile", "--no-models", "--ops", "batch_norm", "--json",
                       "--no-progress", "--out", str(tmp_path)])
    assert status == 1
    ops = json.loads(capsys.readouterr().out)["cpu"]["ops"]
    failed = [r for r in ops if not r["verified"]]
    assert failed and all(r["variant"] == "modekernels" and "elements differ" in r["error"]
                          for r in failed)
    assert all(r["time_ms"] > 0 for r in ops if r["verified"])
    assert "not timed" in (tmp_path / "cpu" / "summary.md").read_text()
    assert not (tmp_path / "cpu" / "models.csv").exists()  # this run's files alone


@pytest.mark.parametrize("cache", harness.CACHES)
def test_variants_are_timed_in_turns_in_one_cache_regime(monkeypatch, cache):
    # A fake clock that each fn advances by its own step: the fns must be called in turns (after
    # one warm-up call each), each timed call preceded by its regime's untimed step (warm: the fn
    # itself for WARM_SECONDS; cold: a sweep of the flush buffer), until min_calls turns and
    # min_run_time per fn, and each must get the median of its own timed calls.
    now, calls = [0.0], []

    def advancing(name, step):
        def fn():
            calls.append(name)
            now[0] += step
        return fn

    class Sweep:
        is_cuda = False

        def max(self):
            advancing("sweep", 50e-3)()

    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(harness, "_flush_buffer", lambda device: Sweep())
    monkeypatch.setattr(harness, "WARM_SECONDS", 5e-3)
    times = harness.time_interleaved([advancing("a", 1e-3), advancing("b", 3e-3)], "cpu",
                                     min_run_time=0.05, min_calls=4, cache=cache)
    assert times == pytest.approx([1e-3, 3e-3])
    assert calls[:2] == ["a", "b"]
    # warm: a for 5 ms (5 calls of 1 ms), then timed; b for 5 ms (2 calls of 3 ms), then timed.
    turn = {"warm": ["a"] * 6 + ["b"] * 3, "cold": ["sweep", "a", "sweep", "b"]}[cache]
    turns = len(calls[2:]) // len(turn)
    assert calls[2:] == turn * turns
    assert turns == {"warm": 7, "cold": 4}[cache]  # 0.1 s in turns of 15 ms; 4 turns of 104 ms


def test_the_cold_regime_sweeps_twice_the_last_level_cache(monkeypatch, tmp_path):
    sizes = {"index0": "48K", "index2": "2048K", "index3": "491520K"}
    for index, size in sizes.items():
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    monkeypatch.setattr(harness.glob, "glob",
                        lambda pattern: [str(tmp_path / index / "size") for index in sizes])
    assert harness.last_level_cache_bytes() == 491520 << 10
    assert harness.flush_bytes("cpu") == 2 * (491520 << 10)
    assert harness.cache_description("cpu", "cold") == "cold: 960 MB swept before each timed call"
    monkeypatch.setattr(harness.glob, "glob", lambda pattern: [])
    assert harness.last_level_cache_bytes() == 256 << 20


@pytest.mark.parametrize("argv,message", [
    (["--dtype", "int8"], "'int8' is not one of float32, float64, float16, bfloat16"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--device", "cuda"], "torch finds no CUDA device"),
    (["--cache", "hot"], "invalid choice: 'hot'"),
    (["--min-run-time", "inf"], "--min-run-time must be a positive number of seconds"),
    (["--min-run-time", "0"], "--min-run-time must be a positive number of seconds"),
    (["--out", "/proc/modekernels-bench"], "--out /proc/modekernels-bench: cannot write there"),
], ids=["dtype", "threads", "device", "cache", "min-run-time-inf", "min-run-time-0", "out"])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    if argv[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
