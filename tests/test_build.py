"""setup.py's refusal of a torch older than the one the suite passes with."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_setup(torch_version):
    """`setup.py --version` in a subprocess whose torch reports torch_version (None: as it is)."""
    code = ("import runpy, sys, torch; from torch.torch_version import TorchVersion; "
            "v = sys.argv[1]; torch.__version__ = TorchVersion(v) if v else torch.__version__; "
            "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, torch_version or ""], cwd=ROOT,
                          capture_output=True, text=True)


def min_torch():
    with open(os.path.join(ROOT, "setup.py")) as f:
        return re.search(r'^MIN_TORCH = "([0-9.]+)"$', f.read(), re.M).group(1)


def test_pyproject_requires_the_torch_setup_py_does():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert f'"torch>={min_torch()}"' in f.read()


@pytest.mark.parametrize("version", ["2.5.1", "2.7.1+cu126", "2.8.0a0+gitabc"])
def test_setup_refuses_an_older_torch(version):
    done = run_setup(version)
    assert done.returncode != 0
    assert f"modekernels needs torch {min_torch()} or later; this environment has torch {version}" in done.stderr


@pytest.mark.parametrize("version", ["2.8.0", "2.10.1", None])
def test_setup_takes_the_oldest_torch_and_later(version):
    done = run_setup(version)
    assert done.returncode == 0 and "needs torch" not in done.stderr, done.stderr
