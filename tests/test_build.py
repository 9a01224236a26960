"""The build: setup.py's refusal of a torch older than the one the suite passes with, and a source
distribution that builds and tests on its own."""
import os
import re
import subprocess
import sys
import tarfile

import pytest
from torch.utils import cpp_extension

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


def tree_files(folder, suffixes):
    """Paths, relative to ROOT, of the files under folder ending in one of suffixes."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        found |= {os.path.relpath(os.path.join(dirpath, f), ROOT)
                  for f in filenames if f.endswith(suffixes)}
    return found


@pytest.mark.parametrize("cuda", [True, False], ids=["cuda-build", "cpu-only-build"])
def test_sdist_carries_what_the_build_and_the_tests_read(tmp_path, cuda):
    # Made where the CUDA sources are compiled or not (no toolkit at CUDA_HOME): the archive
    # carries them either way, for the machine that builds it.
    if cuda and cpp_extension.CUDA_HOME is None:
        pytest.skip("needs a CUDA toolkit (CUDA_HOME) to list the CUDA sources")
    env = {k: v for k, v in os.environ.items() if k != "MODEKERNELS_FORCE_CUDA"}
    env.update({"MODEKERNELS_FORCE_CUDA": "1"} if cuda else {"CUDA_HOME": str(tmp_path / "no-cuda")})
    command = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
               "--dist-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = (tree_files("csrc", (".cpp", ".cu", ".h", ".cuh")) | tree_files("tests", (".py",))
              | {"setup.py", "pyproject.toml", "README.md"})
    missing = sorted(wanted - shipped)
    assert not missing, f"not in the sdist (MANIFEST.in): {missing}"
    assert "modekernels/_build_info.py" not in shipped  # each build writes its own
