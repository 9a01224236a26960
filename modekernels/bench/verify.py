"""Verification section: every op against torch's built-in layers, on small shapes.

For each op, mode (train, eval), dtype and layout, modekernels' forward and backward are run and
compared with torch computing the same thing in float64 from the same inputs and state:

- BatchNorm (and its fused ReLU / add+ReLU forms) against torch.nn.BatchNormNd (+ relu, + add):
  output and running statistics (forward), gradients of input, weight, bias, residual (backward).
- Dropout and its fused / channel-wise forms: in eval against torch's layer (the identity, or
  the plain adds); in training against torch's composition under the mask our op drew, which is
  read back by calling the op on ones with an identically seeded generator. The keep rate must
  also lie within 6 sigma of 1 - p.

A row reports the worst quantity of its direction: max absolute error, max error relative to the
largest expected magnitude, and pass/fail under `harness.TOL` (the criterion of
`harness.assert_close`).
"""
import dataclasses
import math

import torch

import modekernels
from modekernels import functional as F

from .harness import TOL, dtype_str, param_dtype, progress_bar, shape_str

P = 0.25  # not a power of two: 1 / (1 - p) rounds in every dtype, as it would in a model
SEED = 1234


@dataclasses.dataclass(frozen=True)
class Check:
    op: str
    shape: tuple
    layout: str = "contiguous"


CHECKS = [
    Check("dropout", (4, 8, 6, 5)),
    Check("dropout1d", (4, 8, 10)),
    Check("dropout2d", (4, 8, 6, 5)),
    Check("dropout2d", (4, 8, 6, 5), "channels_last"),
    Check("dropout3d", (2, 8, 3, 4, 5)),
    Check("dropout_add", (4, 16, 32)),
    Check("bias_dropout_add", (4, 16, 32)),
    Check("batch_norm1d", (16, 8)),
    Check("batch_norm1d", (8, 8, 10)),
    Check("batch_norm2d", (4, 8, 6, 5)),
    Check("batch_norm2d", (4, 8, 6, 5), "channels_last"),
    Check("batch_norm3d", (2, 8, 3, 4, 5)),
    Check("batch_norm3d", (2, 8, 3, 4, 5), "channels_last"),
    Check("batch_norm_relu2d", (4, 8, 6, 5)),
    Check("batch_norm_add_relu2d", (4, 8, 6, 5), "channels_last"),
]


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t.contiguous()


def _inputs(check, dtype, device):
    """x, residual, bias, incoming gradient: x and residual in [0.5, 1.5) so that no value is 0."""
    gen = torch.Generator().manual_seed(0)
    x, residual, grad = (_layout((torch.rand(check.shape, generator=gen) + 0.5).to(device, dtype),
                                 check.layout) for _ in range(3))
    bias = torch.rand(check.shape[-1], generator=gen).to(device, dtype)
    return x, residual, bias, grad


def _grads(output, inputs, grad):
    """Gradients of output w.r.t. the inputs that require them, in order."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(output, wanted, grad)


# --------------------------------------------------------------------------------- dropout

_DROPOUT = {  # op -> (ours(x, residual, bias, training, generator), uses residual, uses bias)
    "dropout": (lambda x, r, b, t, g: F.dropout(x, P, t, generator=g), False, False),
    "dropout1d": (lambda x, r, b, t, g: F.dropout1d(x, P, t, generator=g), False, False),
    "dropout2d": (lambda x, r, b, t, g: F.dropout2d(x, P, t, generator=g), False, False),
    "dropout3d": (lambda x, r, b, t, g: F.dropout3d(x, P, t, generator=g), False, False),
    "dropout_add": (lambda x, r, b, t, g: F.dropout_add(x, r, P, t, generator=g), True, False),
    "bias_dropout_add": (lambda x, r, b, t, g: F.bias_dropout_add(x, b, r, P, t, generator=g),
                         True, True),
}


def _generator(device):
    return torch.Generator(device=device).manual_seed(SEED)


def _dropout_quantities(check, dtype, device, training):
    """{direction: {name: (actual, expected float64)}} and the keep rate (training only)."""
    ours, with_residual, with_bias = _DROPOUT[check.op]
    x, residual, bias, grad = _inputs(check, dtype, device)
    residual = residual.requires_grad_() if with_residual else None
    bias = bias.requires_grad_() if with_bias else None
    xr = x.detach().requires_grad_()
    out = ours(xr, residual, bias, training, _generator(device))
    actual_grads = _grads(out, (xr, residual, bias), grad)

    # The mask the op drew: the same op, seeded alike, on ones (and zero residual and bias).
    zeros = torch.zeros_like
    ones_out = ours(torch.ones_like(x), residual if residual is None else zeros(residual),
                    bias if bias is None else zeros(bias), training, _generator(device))
    kept = (ones_out != 0).double()
    scale = kept / (1 - P) if training else kept

    xd, gd = x.double().requires_grad_(), grad.double()
    rd = residual.detach().double().requires_grad_() if with_residual else None
    bd = bias.detach().double().requires_grad_() if with_bias else None
    if training:
        expected = (xd if bd is None else xd + bd) * scale
    else:  # torch's layers in eval: the identity, then torch's adds
        layer = {"dropout": torch.nn.Dropout, "dropout1d": torch.nn.Dropout1d,
                 "dropout2d": torch.nn.Dropout2d, "dropout3d": torch.nn.Dropout3d}.get(
                     check.op, torch.nn.Dropout)(P).eval()
        expected = layer(xd if bd is None else xd + bd)
    if rd is not None:
        expected = rd + expected
    expected_grads = _grads(expected, (xd, rd, bd), gd)
    names = ["grad_input"] + ["grad_residual"] * with_residual + ["grad_bias"] * with_bias
    quantities = {"fwd": {"output": (out, expected)},
                  "bwd": dict(zip(names, zip(actual_grads, expected_grads)))}
    keep_rate = kept.mean().item() if training else None
    if not training:  # eval must not draw a mask at all: everything is kept
        assert kept.all(), f"{check.op} dropped elements in eval mode"
    return quantities, keep_rate


def _mask_count(check):
    """Independent keep/drop draws: one per (n, c) for channel-wise dropout, else per element."""
    channel_wise = check.op in ("dropout1d", "dropout2d", "dropout3d")
    return check.shape[0] * check.shape[1] if channel_wise else math.prod(check.shape)


def _keep_rate_ok(keep_rate, numel_masks):
    return abs(keep_rate - (1 - P)) <= 6 * math.sqrt(P * (1 - P) / numel_masks)


# ------------------------------------------------------------------------------ batch norm

_BATCH_NORM = {  # op -> (our class, torch's class, relu, residual)
    "batch_norm1d": (modekernels.BatchNorm1d, torch.nn.BatchNorm1d, False, False),
    "batch_norm2d": (modekernels.BatchNorm2d, torch.nn.BatchNorm2d, False, False),
    "batch_norm3d": (modekernels.BatchNorm3d, torch.nn.BatchNorm3d, False, False),
    "batch_norm_relu2d": (modekernels.BatchNormReLU2d, torch.nn.BatchNorm2d, True, False),
    "batch_norm_add_relu2d": (modekernels.BatchNormAddReLU2d, torch.nn.BatchNorm2d, True, True),
}


def _batch_norm_quantities(check, dtype, device, training):
    ours_cls, torch_cls, relu, with_residual = _BATCH_NORM[check.op]
    x, residual, _, grad = _inputs(check, dtype, device)
    channels = check.shape[1]
    gen = torch.Generator().manual_seed(1)
    reference = torch_cls(channels)
    with torch.no_grad():
        for t, low, high in ((reference.weight, 0.5, 1.5), (reference.bias, -1, 1),
                             (reference.running_mean, -1, 1), (reference.running_var, 0.5, 2)):
            t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)
    ours = ours_cls(channels)
    ours.load_state_dict(reference.state_dict())
    ours.to(device, param_dtype(dtype)).train(training)
    reference.to(device, torch.float64).train(training)

    def forward(module, x, residual, tail):
        out = module(x, residual) if tail and with_residual else module(x)
        if not tail:  # torch's layer: the fused tail as separate ops
            out = out + residual if with_residual else out
            out = torch.relu(out) if relu else out
        return out

    xr = x.detach().requires_grad_()
    rr = residual.detach().requires_grad_() if with_residual else None
    out = forward(ours, xr, rr, True)
    actual = _grads(out, (xr, ours.weight, ours.bias, rr), grad)
    xd = x.double().requires_grad_()
    rd = residual.double().requires_grad_() if with_residual else None
    expected = forward(reference, xd, rd, False)
    wanted = _grads(expected, (xd, reference.weight, reference.bias, rd), grad.double())
    fwd = {"output": (out, expected)}
    if training:
        fwd |= {name: (getattr(ours, name), getattr(reference, name))
                for name in ("running_mean", "running_var")}
    names = ["grad_input", "grad_weight", "grad_bias"] + ["grad_residual"] * with_residual
    return {"fwd": fwd, "bwd": dict(zip(names, zip(actual, wanted)))}, None


# ---------------------------------------------------------------------------------- errors

def _errors(actual, expected, dtype):
    """(max abs error, max abs error / max |expected|, passed) under harness.assert_close's rule."""
    tol = TOL[dtype]
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    diff = (actual - expected).abs()
    magnitude = expected.abs()
    top = magnitude.max().item() if expected.numel() else 0.0
    passed = bool((diff <= tol["atol"] * max(1.0, top) + tol["rtol"] * magnitude).all())
    max_abs = diff.max().item() if diff.numel() else 0.0
    return max_abs, max_abs / top if top else max_abs, passed


def verify(device, dtypes, progress=True):
    """One row per (check, mode, direction, dtype): the worst quantity's errors and pass/fail."""
    rows = []
    grid = [(c, mode, d) for c in CHECKS for mode in ("train", "eval") for d in dtypes]
    bar, log = progress_bar(grid, "verifying", progress)
    for check, mode, dtype in bar:
        quantities_fn = _dropout_quantities if check.op in _DROPOUT else _batch_norm_quantities
        try:
            quantities, keep_rate = quantities_fn(check, dtype, device, mode == "train")
            error = None
        except Exception as exc:  # an op that raises fails its row; the section goes on
            quantities, keep_rate, error = {"fwd": {}, "bwd": {}}, None, f"{type(exc).__name__}: {exc}"
            log(f"FAIL {check.op} {mode} {dtype_str(dtype)}: {error}")
        for direction, named in quantities.items():
            errors = {name: _errors(a, e, dtype) for name, (a, e) in named.items()}
            worst = max(errors, key=lambda n: (not errors[n][2], errors[n][1]), default=None)
            max_abs, max_rel, passed = errors[worst] if worst else (None, None, False)
            if keep_rate is not None and direction == "fwd":
                passed = passed and _keep_rate_ok(keep_rate, _mask_count(check))
            rows.append({
                "op": check.op, "shape": shape_str(check.shape), "layout": check.layout,
                "mode": mode, "direction": direction, "dtype": dtype_str(dtype),
                "worst": worst, "max_abs": max_abs, "max_rel": max_rel,
                "atol": TOL[dtype]["atol"], "rtol": TOL[dtype]["rtol"],
                "keep_rate": keep_rate if direction == "fwd" else None,
                "passed": passed and error is None, "error": error,
            })
    return rows


def summarize(rows):
    """One row per (op, dtype): how many checks passed, and the largest relative error."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["dtype"]), []).append(r)
    return [{"op": op, "dtype": dtype, "checks": len(group),
             "passed_checks": sum(r["passed"] for r in group),
             "max_rel": max((r["max_rel"] for r in group if r["max_rel"] is not None), default=None),
             "passed": all(r["passed"] for r in group)}
            for (op, dtype), group in groups.items()]
