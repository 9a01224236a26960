"""The main job: `python -m modekernels.bench` verifies every op against torch and benchmarks it.

harness.py holds the timers, copy roofline and case runner; dropout.py, batch_norm.py and
fused.py the op suites; verify.py the verification section; e2e.py the whole-model section;
report.py the tables, files and charts; cli.py the command line.
"""
