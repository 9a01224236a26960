"""Build modekernels against the torch that is already installed.

The CPU extension is always built. CUDA sources are added when torch is a CUDA build and a CUDA
toolkit is found (or MODEKERNELS_FORCE_CUDA=1). See README.md, "Build", for the variables.
"""
import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.develop import develop

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # an isolated build environment has no torch
    raise SystemExit(
        "modekernels compiles against the torch you already have; build it without build "
        "isolation: pip install -e . --no-build-isolation  (or: python setup.py develop)"
    ) from exc

# The oldest torch the test suite passes with (README.md, "Build"), as pyproject.toml requires. An
# older one is refused here, before pip resolves dependencies: pip would otherwise replace it with
# a new torch after the extension was compiled against the old one.
MIN_TORCH = "2.8"
if torch.__version__ < MIN_TORCH:
    raise SystemExit(f"modekernels needs torch {MIN_TORCH} or later; this environment has torch "
                     f"{torch.__version__}")

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def with_cuda():
    if flag("MODEKERNELS_FORCE_CUDA"):
        return True
    home = cpp_extension.CUDA_HOME
    return torch.version.cuda is not None and home is not None and os.path.exists(
        os.path.join(home, "bin", "nvcc"))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "**", pattern), recursive=True))


CUDA = with_cuda()


# at::parallel_for is inlined into our kernels and is serial unless they are compiled with OpenMP
# (the runtime is the libgomp that torch already loads).
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


# No floating-point traps: the compiler may then compute both sides of a select, so that the
# float16 conversions of common/convert.h (and the ReLU gates) vectorize. Results are unchanged:
# this allows no reassociation and no other value-changing rewrite.
NO_TRAPS = ["-fno-trapping-math"]


# No fused multiply-adds: the AVX-512 build of the CPU kernels has them (AVX-512F), the baseline and
# AVX2 builds do not, and all three must round alike (csrc/common/cpu_capability.h).
NO_CONTRACT = ["-ffp-contract=off"]


# The sources are C++20 (requires-clauses, std::bit_cast). torch's cpp_extension defaulted to
# C++17 until 2026 (pytorch/pytorch#176659) and adds no -std of its own where the extension names
# one; the GPU machine this is to be proven on runs torch 2.11.
CXX_STD = ["-std=c++20"]


# No host debug information outside DEBUG builds: Python's own compile flags, which extensions
# inherit, often carry -g, and it made 80 MB of a 99 MB extension. It never changes the code.
RELEASE = ["-O3", "-g0"]


def extension():
    debug = flag("DEBUG")
    cxx = (["-O0", "-g"] if debug else RELEASE) + CXX_STD + OPENMP + NO_TRAPS + NO_CONTRACT
    srcs = sources("*.cpp")
    if not CUDA:
        return cpp_extension.CppExtension(
            "modekernels._C", srcs, include_dirs=[CSRC], extra_compile_args={"cxx": cxx},
            extra_link_args=OPENMP)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    nvcc = ["-O3", "-lineinfo"] + CXX_STD + (["-G"] if debug else [])
    return cpp_extension.CUDAExtension(
        "modekernels._C", srcs + sources("*.cu"), include_dirs=[CSRC], extra_link_args=OPENMP,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc})


class BuildExt(cpp_extension.BuildExtension):
    """Also records what the extension was built against, so that a failed load can say so."""

    def run(self):
        info = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda if CUDA else None,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if CUDA else None,
        }
        # In the source tree for in-place and editable builds; in build_lib too for a wheel, whose
        # build_py copied the package before this command ran.
        packages = [os.path.join(ROOT, "modekernels")]
        if not self.inplace:
            packages.append(os.path.join(self.build_lib, "modekernels"))
        for package in packages:
            os.makedirs(package, exist_ok=True)
            with open(os.path.join(package, "_build_info.py"), "w") as f:
                f.write('"""Written by setup.py at build time."""\n')
                f.write(f"BUILT_WITH = {info!r}\n")
        super().run()


class Develop(develop):
    """`setup.py develop` as an editable pip install that reuses the installed torch.

    setuptools >= 80 turns `develop` into `pip install -e .` with build isolation, which has no torch.
    The other dependencies (numpy, tqdm) are installed as `pip install -e .` installs them; the
    torch already there satisfies its requirement and stays.
    """

    def run(self):
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                               "-e", ROOT])


setup(
    packages=find_packages(include=["modekernels", "modekernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt, "develop": Develop},
)
