"""The three builds of the CPU kernels (csrc/common/cpu_capability.h): the widest build the CPU
and torch allow runs here (AVX-512 or AVX2), and must give the same bits as each narrower build,
which a subprocess runs with torch's switch ATEN_CPU_CAPABILITY ("avx2", "default"). No build
contracts multiply-adds, and all sum in the same order, so every output must be identical, not
merely close. float16 and bfloat16 inputs also run through every elementwise kernel with all
65536 of their bit patterns (NaNs with payloads, infinities, subnormals, values that overflow), as
the AVX2 build converts float16 with F16C and bfloat16 with its own AVX2 rounding, the AVX-512
build bfloat16 with AVX512-BF16's conversion and subnormals and NaNs apart (csrc/common/staged.h),
and the baseline build both with integer operations. The same outputs written through
non-temporal stores (csrc/common/stream.h, forced with MODEKERNELS_STREAM_BYTES=0) must have the
same bits too."""
import os
import subprocess
import sys

import pytest
import torch

import modekernels
import modekernels._C
from modekernels import functional as F

ops = torch.ops.modekernels
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (N, C, H, W) and memory format: channels-first with the cache-resident passes, channels-last
# with rows under and over 4 KB (row-by-row and four-row sweeps) and with 64 channels (their
# coefficients held across rows), a size with tails, channels-first rows of 3x3 and 5x5 (walked
# as channels-last columns by every pass, and by the elementwise passes), and a single
# channels-first channel (fewer channels than threads: no cache-resident passes).
SHAPES = [((4, 6, 9, 7), "contiguous"), ((4, 24, 5, 3), "channels_last"),
          ((10, 2064, 1, 3), "channels_last"), ((3, 64, 2, 5), "channels_last"),
          ((3, 5, 17, 1), "contiguous"), ((6, 7, 3, 3), "contiguous"), ((4, 6, 5, 5), "contiguous"),
          ((3, 1, 13, 11), "contiguous")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_inputs():
    torch.manual_seed(0)
    cases = []
    for shape, layout in SHAPES:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for dtype in DTYPES:
            x, residual, grad = (torch.randn(shape).to(dtype).contiguous(memory_format=fmt) for _ in range(3))
            param = torch.float64 if dtype == torch.float64 else torch.float32
            cases.append(dict(x=x, residual=residual, grad=grad, weight=torch.randn(shape[1], dtype=param),
                              bias=torch.randn(shape[1], dtype=param), bias_last=torch.randn(shape[-1]).to(dtype)))
    for dtype in (torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
            x = x.reshape(16, 16, 16, 16).contiguous(memory_format=fmt)
            residual, grad = (torch.randn(x.shape).to(dtype).contiguous(memory_format=fmt) for _ in range(2))
            cases.append(dict(all_bits=True, x=x, residual=residual, grad=grad, weight=torch.randn(16),
                              bias=torch.randn(16), bias_last=torch.randn(16).to(dtype),
                              mean=torch.randn(16), var=torch.rand(16) + 0.5))
    return cases


def run_elementwise(case):
    """The elementwise kernels on one case: BatchNorm eval with the case's statistics (plain,
    +ReLU, +add+ReLU) and its backward (x as the incoming gradient, then as the input of a
    recomputed ReLU gate and as a saved one), and the dropouts."""
    x, residual, grad, weight, bias, mean, var = (
        case[k] for k in ("x", "residual", "grad", "weight", "bias", "mean", "var"))
    stats = (mean, var, weight, 1e-5, False, [True, False, False])
    out = {}
    for name, res, relu in (("bn", None, False), ("bn_relu", None, True), ("bn_add_relu", residual, True)):
        out[name] = [ops.batch_norm_eval(x, mean, var, weight, bias, 1e-5, res, relu)]
    out["bn"].append(ops.batch_norm_backward(x, grad, *stats)[0])
    out["bn_relu"].append(ops.batch_norm_backward(grad, x, *stats, relu=True, bias=bias)[0])
    out["bn_add_relu"] += ops.batch_norm_backward(grad, grad, *stats, relu_output=x, residual_grad=True)[::3]
    out["dropout"] = dropouts(case)
    return out


def dropouts(case):
    x, residual, bias = case["x"], case["residual"], case["bias_last"]
    gen = torch.Generator().manual_seed(1)
    return [F.dropout(x, 0.3, generator=gen), F.dropout2d(x, 0.3, generator=gen),
            F.dropout_add(x, residual, 0.3, generator=gen), F.dropout_add(x, residual, 0.3, training=False),
            F.bias_dropout_add(x, bias, residual, 0.3, generator=gen),
            F.bias_dropout_add(x, bias, residual, 0.3, training=False)]


def run_kernels(case):
    """Every CPU kernel on one case: BatchNorm train, eval and backward (plain, +ReLU,
    +add+ReLU), statistics and gradient sums, and the dropouts with a seeded generator."""
    x, residual, grad, weight, bias = (case[k] for k in ("x", "residual", "grad", "weight", "bias"))
    out = {}
    for name, res, relu in (("bn", None, False), ("bn_relu", None, True), ("bn_add_relu", residual, True)):
        y, mean, var = ops.batch_norm_train(x, weight, bias, 1e-5, res, relu)
        back = ops.batch_norm_backward(grad, x, mean, var, weight, 1e-5, True, [True, True, True],
                                       relu_output=y if relu else None, residual_grad=res is not None)
        out[name] = [y, mean, var, *back]
        out[name + "_eval"] = [ops.batch_norm_eval(x, mean, var + 0.5, weight, bias, 1e-5, res, relu),
                               *ops.batch_norm_backward(grad, x, mean, var + 0.5, weight, 1e-5, False,
                                                        [True, True, True])[:3]]
    out["stats"] = [*ops.batch_norm_stats(x), *ops.batch_norm_grad_sums(grad, x, out["bn"][1])]
    out["dropout"] = dropouts(case)
    return out


def outputs(cases):
    return [run_elementwise(case) if case.get("all_bits") else run_kernels(case) for case in cases]


def bits(t):
    """t's bits as integers, so that NaNs compare too."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def subprocess_outputs(tmp_path, cases, build, **env):
    """outputs(cases) from a process with the environment variables `env` added, which must run
    the CPU kernels' `build` ("AVX512", "AVX2", "DEFAULT"): from its second run, whose outputs
    take memory that the first one mapped (outputs on pages never touched are not streamed)."""
    src, dst = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(cases, src)
    code = ("import sys, torch, modekernels._C; from tests.test_cpu_capability import outputs; "
            "assert modekernels._C.cpu_capability == sys.argv[3], modekernels._C.cpu_capability; "
            "cases = torch.load(sys.argv[1]); outputs(cases); torch.save(outputs(cases), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(src), str(dst), build], env=subprocess_env(**env), check=True,
                   cwd=tmp_path)
    return torch.load(dst)


def subprocess_env(**env):
    """os.environ with `env` added, and the modekernels this process imported (in place, or
    installed from a wheel), then the tests, first on the path."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(modekernels.__file__)))
    return dict(os.environ, **env, PYTHONPATH=os.pathsep.join(
        filter(None, [package_parent, ROOT, os.environ.get("PYTHONPATH")])))


def assert_same_bits(cases, got, expected):
    checked = 0
    for case, g, e in zip(cases, got, expected):
        assert g.keys() == e.keys()
        for name in g:
            for i, (a, b) in enumerate(zip(g[name], e[name])):
                where = f"{name}[{i}] {case['x'].dtype} {tuple(case['x'].shape)}"
                assert a.dtype == b.dtype and a.shape == b.shape, where
                assert torch.equal(bits(a), bits(b)), where
                checked += a.numel()
    assert checked > 0


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])


# torch's ATEN_CPU_CAPABILITY values, narrowest first, and the build of ours each selects.
BUILDS = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}


def expected_build():
    flags, torch_capability = cpu_flags(), torch.backends.cpu.get_cpu_capability()
    if torch_capability == "AVX512" and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= set(flags):
        return "AVX512"
    # torch's baseline reads "DEFAULT", or "NO AVX" before torch 2.9.
    return "AVX2" if {"avx2", "f16c"} <= set(flags) and torch_capability in ("AVX2", "AVX512") else "DEFAULT"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or "x86" not in os.uname().machine,
                    reason="the AVX2 and AVX-512 builds exist on x86-64 only")
def test_capability_is_the_widest_the_cpu_and_torch_have():
    assert modekernels._C.cpu_capability == expected_build()


def narrower_build(capability):
    """ATEN_CPU_CAPABILITY=capability's build, or a skip where this process runs it or a narrower one."""
    running = list(BUILDS.values()).index(modekernels._C.cpu_capability)
    if running <= list(BUILDS).index(capability):
        pytest.skip(f"this process runs the {modekernels._C.cpu_capability} build")
    return BUILDS[capability]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_build_gives_the_narrower_builds_bits(tmp_path, capability):
    build = narrower_build(capability)
    cases = make_inputs()
    got = outputs(cases)
    assert_same_bits(cases, got, subprocess_outputs(tmp_path, cases, build, ATEN_CPU_CAPABILITY=capability))


@pytest.mark.parametrize("capability", ["default", "avx2", None])
def test_streamed_outputs_have_the_stored_bits(tmp_path, capability):
    """With MODEKERNELS_STREAM_BYTES=0 the BatchNorm passes and channel-wise dropout write every
    output whose memory is mapped already through non-temporal stores (csrc/common/stream.h;
    float16 and bfloat16 spans narrowed in registers in the AVX-512 build, csrc/common/staged.h),
    in each build (None: this process's); this process, with the default 16 MB, streams none of
    these small outputs."""
    env = {"MODEKERNELS_STREAM_BYTES": "0"}
    if capability is None:
        build = modekernels._C.cpu_capability
    else:
        build = narrower_build(capability)
        env["ATEN_CPU_CAPABILITY"] = capability
    cases = make_inputs()
    got = outputs(cases)
    assert_same_bits(cases, got, subprocess_outputs(tmp_path, cases, build, **env))


@pytest.mark.parametrize("value", ["16MB", "-1", "1e6"])
def test_stream_bytes_that_are_not_a_number_of_bytes_fail_the_import(value):
    code = ("try:\n"
            "    import modekernels\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(MODEKERNELS_STREAM_BYTES=value),
                          capture_output=True, text=True, check=True)
    assert done.stdout.startswith(
        f"MODEKERNELS_STREAM_BYTES must be a number of bytes (a non-negative integer), got '{value}'"), done


@pytest.mark.parametrize("value, expected", [(None, 16 << 20), ("", 16 << 20), ("12345", 12345)])
def test_stream_bytes_is_the_environments_or_16_mb(value, expected):
    env = subprocess_env()
    env.pop("MODEKERNELS_STREAM_BYTES", None)
    if value is not None:
        env["MODEKERNELS_STREAM_BYTES"] = value
    done = subprocess.run([sys.executable, "-c", "import modekernels; print(modekernels._C.stream_bytes)"],
                          env=env, capture_output=True, text=True, check=True)
    assert int(done.stdout) == expected, done
