import math
import os
import re
import warnings
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

import modekernels
import modekernels.functional as MF
from modekernels import _ops, reference

from helpers import DEVICES, FLOAT_DTYPES, LAYOUTS, cuda, dtype_id, make_layout

mkops = torch.ops.modekernels


# ------------------------------------------------------------------------- the random stream

def test_reference_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 published with Random123 (kat_vectors).
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        words = reference.philox4x32_10([np.array([c]) for c in counter], key)
        assert tuple(int(w[0]) for w in words) == expected


STATES = [(0, 0), (123456789, 4), (2**63 + 12345, 2**40 + 8), (2**64 - 1, 2**64 - 4)]


@pytest.mark.parametrize("seed,offset", STATES)
@pytest.mark.parametrize("numel", [1, 3, 4, 37, 1000, 65537])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_cpu_stream_equals_reference(seed, offset, numel, p):
    state = torch.tensor([seed, offset], dtype=torch.uint64).view(torch.int64)
    mult = mkops.dropout_backward(torch.ones(numel, dtype=torch.float64), state, p)
    expected = reference.dropout_keep_mask(numel, seed, offset, p).double() / (1 - p)
    assert torch.equal(mult, expected)


@cuda
@pytest.mark.parametrize("seed,offset", STATES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cpu_and_cuda_masks_equal(seed, offset, dtype):
    state = torch.tensor([seed, offset], dtype=torch.uint64).view(torch.int64)
    ones = torch.ones(4099, dtype=dtype)
    cpu = mkops.dropout_backward(ones, state, 0.3)
    gpu = mkops.dropout_backward(ones.cuda(), state.cuda(), 0.3)
    assert torch.equal(cpu, gpu.cpu())


@cuda
@pytest.mark.parametrize("seed,offset", STATES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cpu_and_cuda_channelwise_masks_equal(seed, offset, layout, dtype):
    state = torch.tensor([seed, offset], dtype=torch.uint64).view(torch.int64)
    ones = make_layout(torch.ones(3, 5, 7, 9, dtype=dtype), layout)
    cpu = mkops.feature_dropout_backward(ones, state, 0.3)
    gpu = mkops.feature_dropout_backward(ones.cuda(), state.cuda(), 0.3)
    assert torch.equal(cpu, gpu.cpu())


@cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cuda_fused_sums_round_like_the_cpu(dtype):
    # residual + (x + bias) * mask / (1 - p), each operation rounded in opmath on its own (no fma
    # on the GPU), as the CPU kernels round it (whose float16/bfloat16 scale is also rounded to
    # the dtype, as torch's CPU mask holds it; an opmath `mult` has the opmath scale).
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    x, r = (torch.randn(4, 33, 37).to(dtype) for _ in range(2))
    b = torch.randn(37).to(dtype)
    for bias in (None, b):
        args = (x.cuda(), r.cuda(), 0.3) if bias is None else (x.cuda(), b.cuda(), r.cuda(), 0.3)
        out, state = (mkops.dropout_add if bias is None else mkops.bias_dropout_add)(*args)
        mult = mkops.dropout_backward(torch.ones(x.shape, dtype=opmath), state.cpu(), 0.3)
        base = x.to(opmath) if bias is None else x.to(opmath) + b.to(opmath)
        assert torch.equal(out.cpu(), (base * mult + r.to(opmath)).to(dtype))


# ------------------------------------------------------------------------------- semantics

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (3, 8, 16, 16)], ids=str)
def test_forward_equals_reference(device, dtype, layout, shape):
    x = make_layout(torch.randn(shape, device=device).to(dtype), layout)
    out, state = _ops.dropout(x, 0.4)
    assert out.shape == x.shape and out.dtype == dtype
    dense = torch.empty_like(x).copy_(x)  # x's layout if x is dense, else its dense counterpart
    assert out.stride() == dense.stride()
    assert torch.equal(out, reference.dropout(dense, 0.4, state))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_keeps_memory_format(layout):
    x = make_layout(torch.randn(2, 3, 4, 5), layout)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert modekernels.Dropout(0.5)(x).is_contiguous(memory_format=fmt)
    assert torch.nn.Dropout(0.5)(x).is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.8, 0.97])
@pytest.mark.parametrize("numel", [1000, 100003])
def test_keep_rate_within_five_sigma(p, numel):
    y = MF.dropout(torch.ones(numel), p)
    kept = (y != 0).sum().item()
    sigma = math.sqrt(numel * p * (1 - p))
    assert abs(kept - numel * (1 - p)) <= 5 * sigma


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.75, 0.892147458079873])
def test_survivors_are_scaled_exactly_as_torchs(dtype, p):
    # torch's CPU dropout forms 1 / (1 - p) in float32 (for the last p, one ulp from the rounded
    # float64 quotient we used until 2026-12-06) and holds it in the input's dtype.
    x = torch.rand(10007, dtype=dtype) + 0.5  # no zeros: a zero in the output is a dropped element
    ours, theirs = MF.dropout(x, p), torch.nn.functional.dropout(x, p)
    both = (ours != 0) & (theirs != 0)
    assert torch.equal(ours[both], theirs[both])
    assert 0 < both.sum() < x.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_gradient_is_the_forward_mask_times_scale(device, dtype):
    x = (torch.rand(3, 5, 7, device=device) + 0.5).to(dtype).requires_grad_()
    y = MF.dropout(x, 0.3)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y.detach() != 0
    opmath = reference.opmath_dtype(dtype)
    scaled = (g.to(opmath) * reference.keep_scale(0.3, dtype, device)).to(dtype)
    assert torch.equal(x.grad, torch.where(kept, scaled, 0.0).to(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_backward_with_gradient_in_another_layout(layout):
    x = make_layout(torch.rand(2, 4, 6, 6) + 0.5, layout).requires_grad_()
    y = MF.dropout(x, 0.5)
    g = torch.randn(2, 4, 6, 6)  # contiguous, whatever y's layout
    y.backward(g)
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, torch.where(kept, g * 2, 0.0), atol=0, rtol=0)


def test_nan_and_inf_propagate_like_torch():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 64)
    ours = MF.dropout(x, 1.0)
    theirs = torch.nn.functional.dropout(x, 1.0)
    assert torch.equal(ours.isnan(), theirs.isnan())


@pytest.mark.parametrize("device", DEVICES)
def test_eval_p0_and_empty_return_the_input_itself(device):
    x = torch.randn(4, 5, device=device)
    for m in (modekernels.Dropout(0.5).eval(), modekernels.Dropout(0.0)):
        assert m(x) is x
    assert MF.dropout(x, 0.5, training=False, inplace=True) is x
    empty = torch.randn(0, 3, device=device)
    assert MF.dropout(empty, 0.5) is empty


@pytest.mark.parametrize("device", DEVICES)
def test_p_one_gives_zeros(device):
    x = torch.randn(100, device=device, requires_grad=True)
    y = MF.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def _rng_state(device):
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


@pytest.mark.parametrize("device", DEVICES)
def test_p_one_draws_nothing_as_torchs_shortcut(device):
    # torch returns input * 0 at p = 1 without a random draw, so vmap's "error" randomness lets it
    # through; ours drew a key for a mask it did not need until 2026-12-06.
    x, b = torch.randn(4, 3, 8, device=device), torch.randn(8, device=device)
    cases = [(lambda t: MF.dropout(t, 1.0), torch.zeros_like(x)),
             (lambda t: MF.dropout(t.clone(), 1.0, inplace=True), torch.zeros_like(x)),
             (lambda t: MF.dropout1d(t, 1.0), torch.zeros_like(x)),
             (lambda t: MF.dropout_add(t, t, 1.0), x),
             (lambda t: MF.bias_dropout_add(t, b, t, 1.0), x)]
    before = _rng_state(device)
    for fn, expected in cases:
        assert torch.equal(fn(x), expected)
        assert torch.equal(torch.vmap(fn, randomness="error")(x), expected)
    assert torch.equal(_rng_state(device), before)


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_p_out_of_range_is_torch_value_error(p):
    x = torch.randn(4)
    with pytest.raises(ValueError) as ours:
        MF.dropout(x, p)
    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.dropout(x, p)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        modekernels.Dropout(p)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        mkops.dropout(x, p)


@pytest.mark.parametrize("ours,theirs", [(MF.dropout, torch.nn.functional.dropout),
                                          (MF.dropout2d, torch.nn.functional.dropout2d)],
                         ids=["elementwise", "channel"])
@pytest.mark.parametrize("p", [float("nan"), np.float32("nan"), torch.tensor(float("nan"))],
                         ids=["float", "numpy", "tensor"])
def test_p_nan_is_torch_runtime_error_after_its_type_checks(ours, theirs, p):
    # torch's Python check of p lets NaN through; its op raises a RuntimeError, in both modes,
    # after its argument parser has checked the types.
    x = torch.randn(2, 4, 6, 5)
    for training in (True, False):
        with pytest.raises(RuntimeError) as expected:
            theirs(x, p, training)
        with pytest.raises(RuntimeError, match=f"^{re.escape(str(expected.value))}$"):
            ours(x, p, training)
    with pytest.raises(TypeError) as expected:
        theirs(x, p, None)
    with pytest.raises(TypeError, match=f"^{re.escape(str(expected.value))}$"):
        ours(x, p, None)
    with pytest.raises(RuntimeError, match="^dropout probability has to be between 0 and 1, but got nan$"):
        MF.dropout_add(x, x, p, False)


@pytest.mark.parametrize("p", [Fraction(1, 2), Decimal("0.5"), "0.5", None, np.float32(0.5),
                               np.int64(1), np.bool_(False), True], ids=repr)
@pytest.mark.parametrize("name", ["dropout", "dropout1d", "dropout2d", "dropout3d"])
def test_p_of_other_python_types_as_torch(name, p):
    # torch's parser reads ints, floats and numpy numbers as floats and refuses Fraction and
    # Decimal with its TypeError; str and None fail torch's Python comparison with 0.0 first.
    x = torch.randn(2, 4, 6, 5) if name != "dropout1d" else torch.randn(2, 4, 6)
    try:
        expected = getattr(torch.nn.functional, name)(x, p)
    except TypeError as error:
        with pytest.raises(TypeError, match=f"^{re.escape(str(error))}$"):
            getattr(MF, name)(x, p)
    else:
        ours = getattr(MF, name)(x, p)
        if float(p) in (0.0, 1.0):
            assert torch.equal(ours, expected)
        else:
            kept = ours != 0
            torch.testing.assert_close(ours[kept], x[kept] / (1 - float(p)))


@pytest.mark.parametrize("name", ["dropout1d", "dropout2d", "dropout3d"])
def test_feature_dropout_reads_the_rank_before_the_types(name):
    # torch's channel-wise functionals call input.dim() and check or warn on the rank in Python,
    # ahead of the parser's checks of the types.
    for bad_input in (None, [1.0]):
        with pytest.raises(AttributeError) as expected:
            getattr(torch.nn.functional, name)(bad_input, 0.5)
        with pytest.raises(AttributeError, match=f"^{re.escape(str(expected.value))}$"):
            getattr(MF, name)(bad_input, 0.5)
    if name == "dropout1d":
        with pytest.raises(RuntimeError, match="^dropout1d: Expected 2D or 3D input"):
            MF.dropout1d(torch.randn(2, 3, 4, 5), 0.5, None)


@pytest.mark.parametrize("training", [None, 1, np.bool_(True), "yes"], ids=repr)
@pytest.mark.parametrize("ours,theirs", [(MF.dropout, torch.nn.functional.dropout),
                                          (MF.dropout2d, torch.nn.functional.dropout2d)],
                         ids=["elementwise", "channel"])
@pytest.mark.parametrize("inplace", [False, True])
def test_training_that_is_not_a_bool_is_torch_type_error(training, ours, theirs, inplace):
    x = torch.randn(2, 4, 6, 5)
    with pytest.raises(TypeError) as expected:
        theirs(x, 0.5, training, inplace)
    with pytest.raises(TypeError, match=re.escape(str(expected.value))):
        ours(x, 0.5, training, inplace)
    with pytest.raises(TypeError, match=r"^dropout_add\(\): argument 'train' \(position 4\)"):
        MF.dropout_add(x, x, 0.5, training)
    with pytest.raises(TypeError, match=r"^bias_dropout_add\(\): argument 'train' \(position 5\)"):
        MF.bias_dropout_add(x, x[0, 0, 0], x, 0.5, training)


@pytest.mark.parametrize("p", [torch.tensor([0.5]), torch.tensor(0.5, requires_grad=True)],
                         ids=["1-d", "requires-grad"])
@pytest.mark.parametrize("ours,theirs", [(MF.dropout, torch.nn.functional.dropout),
                                          (MF.dropout2d, torch.nn.functional.dropout2d)],
                         ids=["elementwise", "channel"])
def test_p_that_is_not_a_float_is_torch_type_error(p, ours, theirs):
    # torch's argument parser takes a 0-d tensor that does not require grad as a float, no other.
    x = torch.randn(2, 4, 6, 5)
    before = x.clone()
    with pytest.raises(TypeError) as expected:
        theirs(x, p, True, True)
    with pytest.raises(TypeError, match=re.escape(str(expected.value))):
        ours(x, p, True, True)
    assert torch.equal(x, before)
    with pytest.raises(TypeError, match=r"^dropout_add\(\): argument 'p' \(position 3\) must be float"):
        MF.dropout_add(x, x, p)
    with pytest.raises(TypeError, match=r"^bias_dropout_add\(\): argument 'p' \(position 4\)"):
        MF.bias_dropout_add(x, x[0, 0, 0], x, p)
    torch.testing.assert_close(ours(x, p.detach().reshape(()), False), x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_tensors_and_generators_of_another_type_are_type_errors(training):
    # As torch's parser words it, at the argument's position in our signatures; in every mode.
    x = torch.randn(2, 3, 4)
    calls = {r"dropout_add\(\): argument 'residual' \(position 2\) must be Tensor, not list":
             lambda: MF.dropout_add(x, [1.0], 0.5, training),
             r"bias_dropout_add\(\): argument 'bias' \(position 2\) must be Tensor, not NoneType":
             lambda: MF.bias_dropout_add(x, None, x, 0.5, training),
             r"bias_dropout_add\(\): argument 'residual' \(position 3\) must be Tensor, not "
             r"numpy.ndarray": lambda: MF.bias_dropout_add(x, x[0, 0], np.ones(4), 0.5, training),
             r"dropout\(\): argument 'generator' must be torch.Generator, not int":
             lambda: MF.dropout(x, 0.5, training, generator=3),
             r"feature_dropout_\(\): argument 'generator' must be torch.Generator, not str":
             lambda: MF.dropout1d(x, 0.5, training, True, generator="seed"),
             r"dropout_add\(\): argument 'generator' must be torch.Generator, not int":
             lambda: MF.dropout_add(x, x, 0.5, training, generator=0)}
    for message, call in calls.items():
        with pytest.raises(TypeError, match="^" + message + "$"):
            call()


def test_input_that_is_not_a_tensor_is_torch_type_error():
    with pytest.raises(TypeError) as expected:
        torch.nn.functional.dropout([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match=re.escape(str(expected.value))):
        MF.dropout([1.0, 2.0], 0.5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("inplace", [False, True])
def test_unsupported_dtype_is_clear_error_and_mutates_nothing(dtype, inplace):
    x = torch.ones(8, dtype=dtype)
    before = x.clone()
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        MF.dropout(x, 0.5, inplace=inplace)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("name,shape", [("dropout", (2, 3)), ("dropout1d", (2, 3, 4)),
                                        ("dropout2d", (2, 3, 4, 4)), ("dropout2d", (5,)),
                                        ("dropout3d", (3, 2, 2, 2))])
@pytest.mark.parametrize("inplace", [False, True])
def test_p_1_on_unsupported_dtypes_gives_torch_zeros(dtype, name, shape, inplace):
    # torch's p = 1 shortcut multiplies by a zero of the input's dtype before anything looks at
    # the dtype; ours takes the same path (any other p raises our TypeError, tested above).
    x = torch.arange(1, 1 + math.prod(shape)).reshape(shape).to(dtype)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout2d's rank warning, tested elsewhere
        for fn in (getattr(torch.nn.functional, name), getattr(MF, name)):
            given = x.clone()
            out = fn(given, 1.0, True, inplace)
            assert (out is given) == inplace
            results.append(out)
        with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
            getattr(MF, name)(x, 0.5, True, inplace)
    assert results[1].dtype == results[0].dtype == dtype
    assert torch.equal(results[1], results[0])


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("shape", [(), (5,)], ids=["0d", "1d"])
def test_feature_dropout_of_fewer_than_2_dims_is_torch_error(device, shape):
    # After torch's deprecation warning for such inputs, which ours gives too.
    x = torch.randn(shape, device=device)
    warning = f"dropout2d: Received a {len(shape)}-D input"
    with pytest.raises(RuntimeError) as theirs, pytest.warns(UserWarning, match=warning):
        torch.nn.functional.dropout2d(x, 0.5)
    with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))), \
            pytest.warns(UserWarning, match=warning):
        modekernels.Dropout2d(0.5)(x)


@pytest.mark.parametrize("name", ["dropout2d", "dropout3d"])
@pytest.mark.parametrize("shape", [(), (5,)], ids=["0d", "1d"])
@pytest.mark.parametrize("inplace", [False, True])
def test_feature_dropout_of_fewer_than_2_dims_with_p_1_multiplies_by_zero_as_torch(name, shape, inplace):
    # torch's p = 1 shortcut comes before its dimension check: no error, NaN stays NaN.
    x = torch.tensor([float("nan"), 2.0, -3.0, 0.5, 1.0])[: (shape[0] if shape else 1)].reshape(shape)
    results = []
    for fn in (getattr(torch.nn.functional, name), getattr(MF, name)):
        given = x.clone()
        with pytest.warns(UserWarning, match=f"{name}: Received a {len(shape)}-D input"):
            out = fn(given, 1.0, True, inplace)
        assert (out is given) == inplace
        results.append(out)
    torch.testing.assert_close(results[1], results[0], equal_nan=True)


@pytest.mark.parametrize("name,rank", [("dropout2d", 2), ("dropout2d", 3), ("dropout2d", 5),
                                       ("dropout3d", 3), ("dropout3d", 6)])
def test_feature_dropout_rank_warnings_are_torchs_and_point_at_the_caller(name, rank):
    x = torch.randn((2,) * rank)
    messages = []
    for fn in (getattr(torch.nn.functional, name), getattr(MF, name)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(x, 0.5)
        messages.append([str(w.message) for w in caught])
        assert caught and all(w.filename == __file__ for w in caught)
    assert messages[1] == messages[0]


@cuda
def test_generator_on_the_wrong_device_is_an_error():
    x = torch.randn(8)
    with pytest.raises(RuntimeError, match="generator"):
        MF.dropout(x, 0.5, generator=torch.Generator(device="cuda"))
    with pytest.raises(RuntimeError, match="generator"):
        MF.dropout(x.cuda(), 0.5, generator=torch.Generator())


def test_backward_rejects_a_bad_rng_state():
    g = torch.ones(8)
    with pytest.raises(RuntimeError, match="rng_state"):
        mkops.dropout_backward(g, torch.zeros(3, dtype=torch.int64), 0.5)
    with pytest.raises(RuntimeError, match="rng_state"):
        mkops.dropout_backward(g, torch.zeros(2, dtype=torch.float32), 0.5)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_raw_ops_name_a_required_tensor_given_as_none(device):
    # torch's binding hands None through as an undefined tensor; the kernels and fake kernels name it.
    x = torch.randn(4, 5, device=device)
    calls = {"residual": lambda: mkops.dropout_add(x, None, 0.5),
             "bias": lambda: mkops.bias_dropout_add(x, None, x, 0.5),
             "rng_state": lambda: mkops.dropout_backward(x, None, 0.5),
             "input": lambda: mkops.dropout_add(None, x, 0.5)}
    for name, call in calls.items():
        if device == "meta" and name != "input":
            continue  # the fake kernels check the tensor the others are compared with
        with pytest.raises(TypeError, match=f"expected {name} to be a Tensor, but got None"):
            call()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [mkops.dropout_backward, mkops.feature_dropout_backward])
def test_backward_reads_a_strided_rng_state(device, backward):
    # A view of the pair (here a column of a stack) regenerates the mask of the pair itself.
    x = torch.ones(4, 6, 5, device=device)
    _, state = mkops.dropout(x, 0.5)
    strided = torch.stack([state, state + 1], 1)[:, 0]
    assert not strided.is_contiguous()
    assert torch.equal(backward(x, strided, 0.5), backward(x, state, 0.5))


# ---------------------------------------------------------------------------- randomness

@pytest.mark.parametrize("device", DEVICES)
def test_manual_seed_reproduces_and_successive_calls_differ(device):
    x = torch.randn(4096, device=device)
    torch.manual_seed(7)
    a, b = MF.dropout(x, 0.5), MF.dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(MF.dropout(x, 0.5), a)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_generator_reproduces_independently_of_global_seed(device):
    x = torch.randn(4096, device=device)
    a = MF.dropout(x, 0.5, generator=torch.Generator(device=device).manual_seed(3))
    torch.manual_seed(99)
    b = MF.dropout(x, 0.5, generator=torch.Generator(device=device).manual_seed(3))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------- in place

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_equals_out_of_place_and_keeps_autograd(device, layout):
    base = torch.rand(2, 4, 6, 6, device=device) + 0.5
    torch.manual_seed(11)
    expected = MF.dropout(make_layout(base, layout), 0.3)
    w = torch.ones((), device=device, requires_grad=True)
    x = make_layout(base, layout) * w  # a non-leaf, as in a real model
    torch.manual_seed(11)
    y = MF.dropout(x, 0.3, inplace=True)
    assert y is x
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    y.sum().backward()
    kept = expected != 0
    torch.testing.assert_close(w.grad, (base * kept / 0.7).sum(), rtol=1e-5, atol=1e-4)


def _inference_tensor():
    with torch.inference_mode():
        return torch.randn(4, 6)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 6, requires_grad=True),
    lambda: torch.randn(4, 6, requires_grad=True)[1:],
    _inference_tensor,
], ids=["leaf", "view-of-leaf", "inference-tensor"])
@pytest.mark.parametrize("ours,theirs", [(MF.dropout, torch.nn.functional.dropout),
                                          (MF.dropout1d, torch.nn.functional.dropout1d)],
                         ids=["elementwise", "channel"])
def test_inplace_on_a_tensor_it_may_not_write_is_torch_error_before_any_write(make, ours, theirs):
    x = make()
    with pytest.raises(RuntimeError) as expected:
        theirs(x, 0.5, True, True)
    before = x.detach().clone()  # torch's dropout has written its mask into an inference tensor
    with pytest.raises(RuntimeError) as raised:
        ours(x, 0.5, True, True)
    assert str(raised.value) == str(expected.value)
    assert torch.equal(x.detach(), before)
    with torch.no_grad() if x.requires_grad else torch.inference_mode():
        assert ours(x, 0.5, True, True) is x  # where torch allows the write


@pytest.mark.parametrize("ours,theirs", [(MF.dropout, torch.nn.functional.dropout),
                                          (MF.dropout1d, torch.nn.functional.dropout1d)],
                         ids=["elementwise", "channel"])
def test_inplace_under_no_grad_on_a_saved_tensor_fails_the_backward_as_torch(ours, theirs):
    # exp saves its output for the backward: writing into it must bump its version counter, or
    # the backward would use the dropped-out values without a word.
    messages = []
    for fn in (theirs, ours):
        x = torch.randn(4, 6, requires_grad=True)
        y = x.exp()
        with torch.no_grad():
            fn(y, 0.5, True, True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as raised:
            y.sum().backward()
        messages.append(str(raised.value))
    assert messages[1] == messages[0]


@pytest.mark.parametrize("ours,theirs", [(MF.dropout, torch.nn.functional.dropout),
                                          (MF.dropout2d, torch.nn.functional.dropout2d)],
                         ids=["elementwise", "channel"])
@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "no-grad"])
@pytest.mark.parametrize("view", [False, True], ids=["tensor", "view"])
def test_inplace_counts_one_version_as_torch(ours, theirs, recorded, view):
    # One in-place write, one count on the tensor and its base, where autograd records it or not.
    counts = []
    for fn in (theirs, ours):
        h = torch.randn(4, 6, 5, 5, requires_grad=True) * 1.0
        x = h[:, ::2] if view else h
        before = (x._version, h._version)
        with torch.set_grad_enabled(recorded):
            fn(x, 0.5, True, True)
        counts.append((x._version - before[0], h._version - before[1]))
    assert counts[1] == counts[0] == (1, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", [MF.dropout, MF.dropout2d], ids=["elementwise", "channel"])
def test_inplace_on_a_view_of_a_tensor_that_requires_grad_works_as_torch(device, fn):
    # Every other channel of an activation, dropped in place: the base's gradient is the mask
    # (times 1/(1-p)) there and untouched elsewhere, as with torch's in-place dropout.
    x = torch.randn(4, 6, 5, 5, device=device, requires_grad=True)
    h = x * 1.0
    view = h[:, ::2]
    before = view.detach().clone()
    fn(view, 0.5, True, inplace=True)
    h.backward(torch.ones_like(h))
    kept = view.detach() != 0
    assert kept.any() and not kept.all()
    torch.testing.assert_close(view.detach(), torch.where(kept, before * 2, 0.0))
    torch.testing.assert_close(x.grad[:, ::2], kept.float() * 2)
    torch.testing.assert_close(x.grad[:, 1::2], torch.ones_like(x.grad[:, 1::2]))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("device", DEVICES)
def test_jagged_nested_tensor_like_torch(device):
    # torch's dropout takes jagged nested tensors (out of place): here the mask lies over their
    # values, as over a dense tensor drawn from the same generator state.
    parts = [torch.randn(3, 16, device=device), torch.randn(5, 16, device=device)]
    x = torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)
    y = MF.dropout(x, 0.4, generator=torch.Generator(device).manual_seed(3))
    assert y.is_nested and y.shape[0] == 2 and torch.equal(y.offsets(), x.offsets())
    dense = MF.dropout(x.values().detach(), 0.4, generator=torch.Generator(device).manual_seed(3))
    assert torch.equal(y.values(), dense)
    assert all(torch.equal(a, b) for a, b in zip(y.unbind(), dense.split([3, 5])))
    y.values().sum().backward()
    torch.testing.assert_close(x.grad.values(), torch.where(dense != 0, 1 / 0.6, 0.0))
    with pytest.raises(TypeError, match="torch.jagged layout only"):
        MF.dropout(torch.nested.nested_tensor(parts), 0.4)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("p,training", [(0.4, False), (0.0, True), (1.0, True)],
                         ids=["eval", "p-0", "p-1"])
def test_jagged_nested_tensor_shortcuts_as_torch(p, training):
    # Out of place, torch's eval and p = 0 copy a jagged tensor (with a gradient); in place, they
    # return it, p = 1 zeros it (NaN stays NaN), and torch's in-place draw is not implemented.
    parts = [torch.tensor([[1.0, float("nan")]]), torch.randn(3, 2)]
    x = torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)
    ours, theirs = (fn(x, p, training) for fn in (MF.dropout, torch.nn.functional.dropout))
    assert ours is not x and ours.requires_grad
    # A mask is drawn only for the jagged layout; torch's older one takes the shortcuts too.
    strided = torch.nested.nested_tensor(parts)
    for inplace in (False, True):
        padded = [fn(strided.clone(), p, training, inplace).to_padded_tensor(0.0)
                  for fn in (MF.dropout, torch.nn.functional.dropout)]
        torch.testing.assert_close(*padded, equal_nan=True)
    assert ours.values().data_ptr() != x.values().data_ptr()
    torch.testing.assert_close(ours.values(), theirs.values(), equal_nan=True)
    with torch.no_grad():
        for fn in (MF.dropout, torch.nn.functional.dropout):
            y = x.detach().clone()
            assert fn(y, p, training, inplace=True) is y
            torch.testing.assert_close(y.values(), ours.values(), equal_nan=True)
        for fn in (MF.dropout, torch.nn.functional.dropout):
            with pytest.raises(NotImplementedError):
                fn(x.detach().clone(), 0.4, True, inplace=True)


# ---------------------------------------------------------------------- torch integration

def test_module_is_a_torch_dropout():
    ours, theirs = modekernels.Dropout(0.25, inplace=True), torch.nn.Dropout(0.25, inplace=True)
    assert isinstance(ours, torch.nn.Dropout)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict() == theirs.state_dict() == {}
    assert type(ours).forward is not torch.nn.Dropout.forward
    assert [k for k in vars(ours) if not k.startswith("_")] == [k for k in vars(theirs) if not k.startswith("_")]


GRADCHECK_CASES = {
    "dropout": lambda x, r, b, g: MF.dropout(x, 0.4, generator=g),
    "dropout-inplace": lambda x, r, b, g: MF.dropout(x.clone(), 0.4, inplace=True, generator=g),
    "dropout1d": lambda x, r, b, g: MF.dropout1d(x, 0.4, generator=g),
    "dropout_add": lambda x, r, b, g: MF.dropout_add(x, r, 0.4, generator=g),
    "bias_dropout_add": lambda x, r, b, g: MF.bias_dropout_add(x, b, r, 0.4, generator=g),
    "bias_dropout_add-eval": lambda x, r, b, g: MF.bias_dropout_add(x, b, r, 0.4, training=False),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_and_gradgradcheck_float64(case):
    # Backward, forward-mode and forward-over-reverse gradients of every input, against numerical
    # ones (the same mask on every call: a fresh generator with one seed).
    def f(x, r, b):
        return GRADCHECK_CASES[case](x, r, b, torch.Generator().manual_seed(5))
    x, r = (torch.randn(3, 5, 17, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b = torch.randn(17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, r, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x, r, b), check_fwd_over_rev=True)


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_torch_func_reverse_transforms_match_autograd(case):
    # torch.func.grad and jacrev (functorch refuses C++ autograd Functions, so our ops give their
    # outputs as torch operations under them) against torch.autograd on the same mask.
    def f(x, r, b):
        return GRADCHECK_CASES[case](x, r, b, torch.Generator().manual_seed(5))
    x, r, weights = (torch.randn(3, 5, 17, dtype=torch.float64) for _ in range(3))
    b = torch.randn(17, dtype=torch.float64)

    def loss(x, r, b):
        return (f(x, r, b) * weights).sum()

    leaves = [t.clone().requires_grad_() for t in (x, r, b)]
    expected = torch.autograd.grad(loss(*leaves), leaves, allow_unused=True, materialize_grads=True)
    grads = torch.func.grad(loss, argnums=(0, 1, 2))(x, r, b)
    torch.testing.assert_close(grads, expected)
    jacobian = torch.func.jacrev(lambda x: f(x, r, b)[:2, :1])(x)
    expected = torch.autograd.functional.jacobian(lambda x: f(x, r, b)[:2, :1], x)
    torch.testing.assert_close(jacobian, expected)


@pytest.mark.parametrize("functional", [MF.dropout, MF.dropout1d], ids=["dropout", "dropout1d"])
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
def test_per_sample_gradients_with_vmap_over_grad(functional, inplace):
    # Per-sample gradients (vmap of grad). randomness="same": every sample has the mask that one
    # sample alone draws from the same generator state.
    w, x, weights = torch.randn(5, 8), torch.randn(6, 5, 8), torch.randn(5, 8)

    def loss(w, sample, seed=3):
        out = functional(sample * w, 0.4, inplace=inplace,
                         generator=torch.Generator().manual_seed(seed))
        return (out * weights).sum()

    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(None, 0), randomness="same")(w, x)
    one_by_one = torch.stack([torch.func.grad(loss)(w, sample) for sample in x])
    torch.testing.assert_close(per_sample, one_by_one)
    different = torch.vmap(torch.func.grad(loss), in_dims=(None, 0), randomness="different")(w, x)
    assert not torch.equal(different, per_sample)
    kept = (different != 0) == (x * weights != 0)  # each sample's gradient: its own mask
    assert 0 < kept.float().mean() < 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature", [False, True], ids=["elementwise", "feature"])
def test_raw_ops_carry_a_tangent_through_the_same_mask(device, feature):
    # Forward-mode AD through the ops themselves (torch.ops.modekernels): the forward op's tangent
    # and the backward op's (forward-over-reverse) go through the mask of the values.
    forward, backward = ((mkops.feature_dropout, mkops.feature_dropout_backward) if feature
                         else (mkops.dropout, mkops.dropout_backward))
    x, t = (torch.randn(4, 6, 5, device=device) for _ in range(2))
    state = torch.tensor([3, 8], device=device)
    with torch.autograd.forward_ad.dual_level():
        out, rng_state = forward.default(torch.autograd.forward_ad.make_dual(x, t), 0.5, None)
        out_primal, out_tangent = torch.autograd.forward_ad.unpack_dual(out)
        dual = backward.default(torch.autograd.forward_ad.make_dual(x, t), state, 0.5)
        primal, tangent = torch.autograd.forward_ad.unpack_dual(dual)
    torch.testing.assert_close(out_primal, backward(x, rng_state, 0.5))
    torch.testing.assert_close(out_tangent, backward(t, rng_state, 0.5))
    assert torch.equal(primal, backward(x, state, 0.5))
    assert torch.equal(tangent, backward(t, state, 0.5))
    assert torch.count_nonzero(tangent) not in (0, t.numel())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "transposed"])
@pytest.mark.parametrize("op", ["dropout", "feature_dropout", "dropout_add", "bias_dropout_add"])
def test_with_a_tangent_the_same_mask_and_generator_state(op, layout):
    # With a tangent the ops run as torch operations on a mask that the op draws on ones: the
    # values, rng_state and the generator's advance are those of the plain call.
    x = make_layout(torch.randn(2, 4, 3, 5), layout)
    extra = {"dropout_add": (torch.randn(2, 4, 3, 5),),
             "bias_dropout_add": (torch.randn(5), torch.randn(2, 4, 3, 5))}.get(op, ())
    generators = [torch.Generator().manual_seed(7) for _ in range(2)]
    plain, plain_state = getattr(mkops, op)(x, *extra, 0.4, generators[0])
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.randn_like(x))
        out, state = getattr(mkops, op)(dual, *extra, 0.4, generators[1])
        out = torch.autograd.forward_ad.unpack_dual(out).primal
    torch.testing.assert_close(out, plain)
    assert torch.equal(state, plain_state)
    assert torch.equal(generators[0].get_state(), generators[1].get_state())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    x = torch.randn(3, 5, 7, device=device, requires_grad=True)
    state = torch.tensor([5, 8], device=device)
    torch.library.opcheck(mkops.dropout_backward.default, (x, state, 0.3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["dropout", "dropout_"])
def test_opcheck_forward(device, op):
    # The op draws a new mask on every call, so opcheck's checks that compare two runs (the
    # aot_dispatch ones) do not apply; schema, fake tensor and autograd registration do.
    x = torch.randn(3, 5, 7, device=device, requires_grad=(op == "dropout"))
    torch.library.opcheck(getattr(mkops, op).default, (x, 0.3, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), modekernels.Dropout(0.5, inplace=True),
                                torch.nn.ReLU(), modekernels.Dropout(0.2),
                                torch.nn.Linear(32, 4)).to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 16, device=device)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        torch.manual_seed(0)
        eager_out = model(x)
        eager_out.sum().backward()
        eager_grad = model[0].weight.grad.clone()
        model.zero_grad()
        torch.manual_seed(0)
        comp_out = compiled(x)
        comp_out.sum().backward()
        torch.testing.assert_close(comp_out, eager_out)
        torch.testing.assert_close(model[0].weight.grad, eager_grad)
        model.zero_grad()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [modekernels.Dropout, modekernels.Dropout1d], ids=["elementwise", "channel"])
def test_torch_compile_inplace_dropout_of_a_graph_input_keeps_the_mask_in_the_gradient(device, cls):
    # The compiled block starts with the in-place dropout of an input computed outside it, which
    # requires grad: its gradient must carry the mask, and the input be changed as in eager.
    torch._dynamo.reset()
    block = torch.nn.Sequential(cls(0.5, inplace=True), torch.nn.Flatten(),
                                torch.nn.Linear(24, 3)).to(device)
    x0 = torch.randn(4, 6, 4, device=device)
    results = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        x = x0.clone().requires_grad_()
        h = x * 2.0
        torch.manual_seed(0)
        y = fn(h)
        y.sum().backward()
        results.append((y, h, x.grad))
    torch.testing.assert_close(results[1], results[0])
    assert (results[0][2] == 0).any()  # the mask dropped some


@pytest.mark.parametrize("fn", [MF.dropout, MF.dropout2d], ids=["elementwise", "channel"])
def test_compiled_autograd_takes_an_eager_inplace_dropout(fn):
    # The in-place dropout's autograd node, recorded in eager mode, in a backward that compiled
    # autograd compiles (which refuses a C++ Function that marks an input dirty).
    torch._dynamo.reset()
    x0, grads = torch.randn(4, 6, 3, 3), []
    for compiled in (False, True):
        x = x0.clone().requires_grad_()
        torch.manual_seed(0)
        loss = fn(x * 1.0, 0.5, True, True).square().sum()
        if compiled:
            with torch._dynamo.config.patch(compiled_autograd=True):
                torch.compile(loss.backward, backend="eager")()
        else:
            loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert (grads[0] == 0).any()


@pytest.mark.parametrize("number", [np.float64, np.float32, torch.tensor], ids=["np64", "np32", "tensor"])
@pytest.mark.parametrize("cls", [modekernels.Dropout, modekernels.Dropout2d], ids=["elementwise", "channel"])
def test_torch_compile_takes_a_numpy_or_tensor_p(cls, number):
    # Read as a float, as torch's parser reads it, before it reaches our op (graph breaks
    # allowed, as torch's): the same masks as in eager.
    torch._dynamo.reset()
    x = torch.randn(4, 6, 5, 5)
    outputs = []
    for fn in (cls(number(0.4)), torch.compile(cls(number(0.4)), backend="eager")):
        torch.manual_seed(0)
        outputs.append(fn(x))
    torch.testing.assert_close(outputs[1], outputs[0])
    assert (outputs[0] == 0).any()


@pytest.mark.parametrize("cls", [modekernels.Dropout2d, modekernels.Dropout3d], ids=["2d", "3d"])
def test_torch_compile_fullgraph_takes_the_warned_input_ranks(cls):
    # A 3-D input: eager warns as torch does; a compiled graph cannot hold warnings.warn, and
    # compiles as torch's does, with the same masks.
    torch._dynamo.reset()
    model = cls(0.5)
    x = torch.randn(6, 5, 7)
    with pytest.warns(UserWarning, match=f"{cls.__name__.lower()}: Received a"):
        torch.manual_seed(0)
        eager = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), eager)


def test_torch_compile_with_an_explicit_generator_breaks_the_graph_like_torch_bernoulli():
    torch._dynamo.reset()
    g = torch.Generator()
    x = torch.randn(64)
    for fn in (lambda t: torch.bernoulli(t.sigmoid(), generator=g) * 2,
               lambda t: MF.dropout(t, 0.5, True, generator=g) * 2):
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(fn, fullgraph=True)(x)
        g.manual_seed(3)
        eager = fn(x)
        g.manual_seed(3)
        torch.testing.assert_close(torch.compile(fn)(x), eager)


def test_saved_state_is_16_bytes():
    x = torch.randn(8, 256, 56, 56, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        MF.dropout(x, 0.5)
    ours = sum(t.numel() * t.element_size() for t in saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.dropout(x, 0.5)
    theirs = sum(t.numel() * t.element_size() for t in saved)
    assert ours == 16
    assert theirs >= 8 * ours


# --------------------------------------------------------------------------------- CUDA only

@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cuda_graph_replay_draws_fresh_masks(dtype):
    x = torch.rand(1 << 16, device="cuda", dtype=dtype) + 0.5
    static_x = x.clone().requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside capture
        MF.dropout(static_x, 0.5).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = MF.dropout(static_x, 0.5)
        static_y.sum().backward()
    masks = []
    for _ in range(3):
        graph.replay()
        kept = static_y != 0
        torch.testing.assert_close(static_x.grad, torch.where(kept, 2.0, 0.0).to(dtype), atol=0, rtol=0)
        masks.append(kept.clone())
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def free_memory(device):
    """Bytes a test may allocate: on Linux what the kernel reports available (the page cache
    included, which a long build fills), else the free pages."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as info:
            return next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("device", DEVICES)
def test_64bit_indexing(device):
    # 2^31 + 37 float16 elements (8.6 GB in all): the mask of the elements around index 2^31 is
    # the reference's, so no element index wraps at 32 bits.
    n = 2**31 + 37
    if free_memory(device) < 5 * n:
        pytest.skip("needs 10 GB of free memory")
    x = torch.ones(n, device=device, dtype=torch.float16)
    y = MF.dropout(x, 0.5, inplace=True)
    assert set(y[-1000:].unique().tolist()) <= {0.0, 2.0}
    z = mkops.dropout_backward(x.fill_(1), torch.tensor([1, 0], device=device), 0.5)
    start = 2**31 - 2**20
    keep = reference.dropout_keep_mask(n - start, 1, 0, 0.5, start=start)
    assert torch.equal(z[start:].cpu(), keep.half() * 2)


# ------------------------------------------------------------------------------- torch.vmap

# (function of (x, r, b, generator) for one sample, how its mask repeats): x and r are (N, C, H,
# W) samples, b a bias over W; "channel" masks are constant over (H, W).
VMAP_CASES = {
    "dropout": (lambda x, r, b, g: MF.dropout(x, 0.4, generator=g), "element"),
    "dropout-inplace": (lambda x, r, b, g: MF.dropout(x.clone(), 0.4, inplace=True, generator=g), "element"),
    "dropout2d": (lambda x, r, b, g: MF.dropout2d(x, 0.4, generator=g), "channel"),
    "dropout2d-inplace": (lambda x, r, b, g: MF.dropout2d(x.clone(), 0.4, inplace=True, generator=g), "channel"),
    "dropout_add": (lambda x, r, b, g: MF.dropout_add(x, r, 0.4, generator=g), "element"),
    "bias_dropout_add": (lambda x, r, b, g: MF.bias_dropout_add(x, b, r, 0.4, generator=g), "element"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(VMAP_CASES))
@pytest.mark.parametrize("randomness", ["same", "different"])
@pytest.mark.parametrize("batched_bias", [False, True], ids=["bias", "batched-bias"])
def test_vmap_draws_a_mask_per_sample_or_one_for_all_like_torch(device, case, randomness, batched_bias):
    fn, unit = VMAP_CASES[case]
    B, shape = 3, (2, 4, 8, 16)
    x = torch.randn(B, *shape, device=device)
    r = torch.randn_like(x)
    b = torch.randn(B, 16, device=device) if batched_bias else torch.randn(16, device=device)
    with_bias = b if case == "bias_dropout_add" else torch.zeros_like(b)
    with_residual = r if "add" in case else torch.zeros_like(r)

    def run(*inputs):  # the same generator state each time: the same masks
        g = torch.Generator(device).manual_seed(7)
        return torch.vmap(lambda *t: fn(*t, g), in_dims=(0, 0, 0 if batched_bias else None),
                          randomness=randomness)(*inputs)

    keep = run(torch.ones_like(x), torch.zeros_like(r), torch.zeros_like(b)) != 0
    if unit == "channel":
        assert torch.equal(keep, keep[..., :1, :1].expand_as(keep))
    assert torch.equal(keep[0], keep[1]) == (randomness == "same")
    assert 0.4 < keep.float().mean().item() < 0.8
    bias_rows = with_bias[:, None, None, None] if batched_bias else with_bias
    expected = with_residual + torch.where(keep, (x + bias_rows) / 0.6, 0)
    torch.testing.assert_close(run(x, r, b), expected)


@pytest.mark.parametrize("case", list(VMAP_CASES))
def test_vmap_random_call_in_error_mode_raises_like_torch(case):
    fn, _ = VMAP_CASES[case]
    x = torch.randn(3, 2, 4, 8, 16)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.vmap(torch.nn.functional.dropout)(x)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.vmap(lambda t: fn(t, t, torch.zeros(16), None))(x)


def test_vmap_fused_eval_sums_draw_nothing_in_error_mode():
    x, r, b = torch.randn(3, 4, 16), torch.randn(3, 4, 16), torch.randn(3, 16)
    sums = torch.vmap(lambda x, r: MF.dropout_add(x, r, 0.4, training=False))(x, r)
    torch.testing.assert_close(sums, x + r)
    sums = torch.vmap(lambda x, b, r: MF.bias_dropout_add(x, b, r, 0.4, training=False))(x, b, r)
    torch.testing.assert_close(sums, x + b[:, None] + r)
