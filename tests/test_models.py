import contextlib
import copy
import importlib.util
import io
import pathlib
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import modekernels

from helpers import DEVICES, TOL, needs_torchvision, torchvision

OUR_LAYERS = (modekernels.Dropout, modekernels.BatchNorm1d, modekernels.BatchNorm2d,
        modekernels.BatchNorm3d)
TORCH_LAYERS = (nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def classes(model):
    return {name: type(m) for name, m in model.named_modules()}


def converted_names(model):
    return sorted(name for name, m in model.named_modules() if type(m) in OUR_LAYERS)


def targets(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, TORCH_LAYERS))


def randomize_running_stats(model, generator):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.running_mean.normal_(0, 0.1, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.num_batches_tracked.fill_(7)


# ------------------------------------------------------------------------------ torchvision

@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def resnet(request):
    """A torchvision ResNet with random weights and non-trivial running statistics."""
    if torchvision is None:
        pytest.skip("needs a torchvision that imports with this torch")
    torch.manual_seed(0)
    model = getattr(torchvision.models, request.param)(weights=None)
    randomize_running_stats(model, torch.Generator().manual_seed(1))
    return model


def test_resnet_converts_every_batchnorm_and_leaves_the_original(resnet):
    converted = modekernels.convert(resnet, inplace=False)
    assert converted is not resnet
    assert converted_names(converted) == targets(resnet) != []
    assert converted_names(resnet) == []
    assert all(type(m) is not t for m in converted.modules() for t in TORCH_LAYERS)


def one_step(model, x, mode):
    """What one forward (and, in training, backward) pass gives, each flattened in float64."""
    model.train(mode == "train")
    output = model(x.to(model.conv1.weight.dtype))
    result = {"output": output}
    if mode == "train":
        output.square().mean().backward()
        result["running statistics"] = torch.cat(
            [b.flatten() for name, b in model.named_buffers() if "running" in name])
        result["num_batches_tracked"] = torch.stack(
            [b for name, b in model.named_buffers() if "num_batches" in name])
        result["gradients"] = torch.cat([p.grad.flatten() for p in model.parameters()])
    return {kind: value.detach().double() for kind, value in result.items()}


def relative_error(value, exact):
    return ((value - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("device", DEVICES)
def test_resnet_converted_gives_the_same_step_as_torch(resnet, device, mode):
    # Compared in float64: in float32, rounding differences grow through a deep network in
    # training mode (torch's own float32 gradients of a random ResNet-50 are a few percent off its
    # float64 ones), so two correct float32 runs need not agree to float32 tolerance.
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(device)
    theirs = one_step(copy.deepcopy(resnet).to(device, torch.float64), x, mode)
    ours = one_step(modekernels.convert(copy.deepcopy(resnet).to(device, torch.float64)), x, mode)
    assert set(ours) == ({"output"} if mode == "eval" else
                         {"output", "running statistics", "num_batches_tracked", "gradients"})
    for kind, reference in theirs.items():
        assert relative_error(ours[kind], reference) <= 1e-9, kind


@needs_torchvision
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "densenet121",
                                  "regnet_y_400mf", "shufflenet_v2_x0_5"])
def test_torchvision_models_converted_and_fused_give_torchs_step(name, mode):
    # BatchNorm in other settings than ResNet's: squeeze-excitation and hardswish (MobileNetV3),
    # stochastic depth (EfficientNet), BN+ReLU called outside Sequentials and concatenated
    # features (DenseNet), grouped convolutions and fusable pairs (RegNet, ShuffleNet). float64,
    # as in the ResNet test above (at 32x32 the last BatchNorms see two values a channel, whose
    # difference is ill-conditioned: 1e-8 apart in training); dropout at p = 0 in both, their
    # masks being different streams.
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None, num_classes=10).double()
    randomize_running_stats(theirs, torch.Generator().manual_seed(1))
    for m in theirs.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ours = modekernels.convert(copy.deepcopy(theirs), fuse=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for model in (theirs, ours):
        model.train(mode == "train")
        torch.manual_seed(5)  # stochastic depth draws alike
        output = model(x)
        output.square().mean().backward()
        results.append({"output": output.detach(),
                        "gradients": torch.cat([p.grad.flatten() for p in model.parameters()]),
                        "buffers": torch.cat([b.double().flatten() for b in model.buffers()])})
    for kind, reference in results[0].items():
        assert relative_error(results[1][kind], reference) <= 1e-9, kind


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_step_matches_torch(device, mode):
    # Mixed precision (torch.autocast, bfloat16): the convolution hands BatchNorm+ReLU a bfloat16
    # input with float32 parameters, as it hands torch's layers; outputs, gradients and running
    # statistics as torch's.
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                           nn.Linear(8 * 6 * 6, 4)).to(device)
    ours = modekernels.convert(copy.deepcopy(theirs), fuse=True)
    x = torch.randn(4, 3, 8, 8, device=device)
    results = []
    for model in (theirs, ours):
        getattr(model, mode)()
        with torch.autocast(device, dtype=torch.bfloat16):
            y = model(x)
            normalized = model[2](model[1](model[0](x)))  # ours: BatchNormReLU, placeholder
        y.float().square().sum().backward()
        results.append((y, normalized, [p.grad for p in model.parameters()],
                        [b.clone() for b in model[1].buffers()]))
    assert results[1][1].dtype == results[0][1].dtype == torch.bfloat16
    torch.testing.assert_close(results[1], results[0], **TOL[torch.bfloat16])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_step(use_reentrant):
    # torch.utils.checkpoint reruns the forward in the backward with the generator's state
    # restored: the same dropout masks, so the step equals the plain one, and the running
    # statistics are updated twice, as torch's layers under checkpoint have them.
    def block(fuse):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                              nn.Conv2d(8, 4, 3))
        return modekernels.convert(model, fuse=True) if fuse else model

    def step(model, checkpointed):
        x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(5)
        run = torch.utils.checkpoint.checkpoint if checkpointed else (lambda f, t, **_: f(t))
        y = run(model, x, use_reentrant=use_reentrant)
        y.square().sum().backward()
        return [y, x.grad, *(p.grad for p in model.parameters())], model[1].running_var

    plain, plain_stats = step(block(fuse=True), checkpointed=False)
    ours, our_stats = step(block(fuse=True), checkpointed=True)
    _, torch_stats = step(block(fuse=False), checkpointed=True)
    for got, expected in zip(ours, plain):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(our_stats, torch_stats)
    assert not torch.allclose(our_stats, plain_stats)  # updated once more


@pytest.mark.parametrize("early_stop", [True, False], ids=["early-stop", "full-rerun"])
def test_checkpointed_region_that_ends_in_a_batchnorm(early_stop):
    # The README's exception: non-reentrant checkpointing's early stop ends the rerun inside our
    # op, before the separate update of the running statistics; without it, torch's two updates.
    def step(model):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
            torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False).sum().backward()
        return model[1].num_batches_tracked.item(), model[1].running_mean, x.grad

    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ours = modekernels.convert(copy.deepcopy(theirs))
    (their_count, their_mean, their_grad), (our_count, our_mean, our_grad) = map(step, (theirs, ours))
    assert their_count == 2 and our_count == (1 if early_stop else 2)
    torch.testing.assert_close(our_grad, their_grad)
    if not early_stop:
        torch.testing.assert_close(our_mean, their_mean)


@pytest.mark.parametrize("device", DEVICES)
def test_resnet_converted_eval_output_float32(resnet, device):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).to(device)
    theirs = one_step(copy.deepcopy(resnet).to(device), x, "eval")["output"]
    ours = one_step(modekernels.convert(copy.deepcopy(resnet).to(device)), x, "eval")["output"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@needs_torchvision
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fx_feature_extractor_on_a_converted_resnet(mode):
    # torchvision's feature extraction traces the model with torch.fx in both modes: our layers
    # trace into calls of modekernels.functional, and the features are torch's.
    from torchvision.models import feature_extraction
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    randomize_running_stats(resnet, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    nodes = {"layer1": "early", "layer4": "late"}
    features = []
    for model in (resnet, modekernels.convert(copy.deepcopy(resnet), fuse=True)):
        extractor = feature_extraction.create_feature_extractor(model, nodes).train(mode == "train")
        features.append(extractor(x))
    torch.testing.assert_close(features[1], features[0], rtol=1e-4, atol=1e-4)


class _Tails(nn.Module):
    """Every layer whose eval-mode op a decomposition replaces, the fused ones included."""

    def __init__(self):
        super().__init__()
        self.bn = modekernels.BatchNormReLU2d(8)
        self.batch_stats = modekernels.BatchNorm2d(8, track_running_stats=False)
        self.add_relu = modekernels.BatchNormAddReLU2d(8)
        self.dropout_add = modekernels.DropoutAdd(0.3)
        self.bias_dropout_add = modekernels.BiasDropoutAdd(0.3)
        self.dropouts = nn.Sequential(modekernels.Dropout(0.3), modekernels.Dropout2d(0.3))
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x):
        y = self.add_relu(self.batch_stats(self.bn(x)), x)
        return self.dropouts(self.bias_dropout_add(self.dropout_add(y, x), self.bias, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eval_graph_decomposes_into_torch_operators(dtype):
    # What exporters that know only torch's operators need (torch.onnx: README).
    model = _Tails()
    randomize_running_stats(model, torch.Generator().manual_seed(1))
    model = model.to(dtype).eval()
    x = torch.randn(2, 8, 4, 5, dtype=dtype)
    program = torch.export.export(model, (x,)).run_decompositions(modekernels.decompositions())
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [op for op in ops if "modekernels" in op], ops
    torch.testing.assert_close(program.module()(x), model(x), **TOL[dtype])


@pytest.mark.parametrize("layer,shapes", [(modekernels.DropoutAdd(0.3), [(4, 8), (4, 8)]),
                                          (modekernels.BiasDropoutAdd(0.3), [(4, 8), (8,), (4, 8)])],
                         ids=["dropout_add", "bias_dropout_add"])
def test_training_graph_keeps_the_fused_dropouts(layer, shapes):
    # Their masks are our random stream, which no torch operator draws: the ops stay, and the
    # decomposed program draws the eager layer's masks.
    args = [torch.randn(shape) for shape in shapes]
    program = torch.export.export(layer, tuple(args)).run_decompositions(modekernels.decompositions())
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("dropout_add" in op for op in ops), ops
    outputs = []
    for fn in (program.module(), layer):
        torch.manual_seed(0)
        outputs.append(fn(*args))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_fx_symbolic_trace_records_our_functions_and_updates_the_statistics():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), modekernels.BatchNormReLU2d(8),
                          modekernels.Dropout(0.3), modekernels.BatchNorm2d(8),
                          modekernels.Dropout2d(0.2), modekernels.SyncBatchNorm(8), nn.Flatten(2),
                          modekernels.BatchNorm1d(8))
    traced = torch.fx.symbolic_trace(model)
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    F = modekernels.functional
    assert {F.batch_norm, F.batch_norm_relu, F.dropout, F.dropout2d} <= targets
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    outputs = []
    for m in (eager, traced):
        torch.manual_seed(3)
        outputs.append(m(x))
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(dict(traced.named_buffers()), dict(eager.named_buffers()))


@needs_torchvision
@pytest.mark.parametrize("direction", ["converted_into_torch", "torch_into_converted"])
def test_state_dict_round_trip_strict(direction):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    randomize_running_stats(source, torch.Generator().manual_seed(4))
    target = torchvision.models.resnet18(weights=None)  # other random weights
    if direction == "converted_into_torch":
        modekernels.convert(source)
    else:
        modekernels.convert(target)
    target.load_state_dict(source.state_dict(), strict=True)
    loaded, saved = target.state_dict(), source.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source.eval()(x), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_lazy_batchnorm_converts_and_becomes_ours_at_its_first_call(device):
    # Not yet initialized, torch's LazyBatchNorm would become torch's BatchNormNd at its first
    # call; converted, it becomes ours, running our kernels from that first call on.
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(), nn.Flatten(2),
                             nn.LazyBatchNorm1d()).to(device)

    theirs, ours = make(), modekernels.convert(make())
    assert [type(m) for m in ours[1::2]] == [modekernels.LazyBatchNorm2d, modekernels.LazyBatchNorm1d]
    assert isinstance(ours[1], nn.LazyBatchNorm2d)
    assert type(modekernels.revert(make())[1]) is nn.LazyBatchNorm2d
    x = torch.randn(2, 3, 4, 4, device=device)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    assert [type(m) for m in ours[1::2]] == [modekernels.BatchNorm2d, modekernels.BatchNorm1d]
    assert ours[1].num_features == 4
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), **TOL[torch.float32])
    assert type(modekernels.revert(ours)[1]) is nn.BatchNorm2d


def test_quantization_fusion_with_our_classes_in_its_table():
    # The README's recipe for tools that look layers up by exact class.
    model = modekernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    randomize_running_stats(model, torch.Generator().manual_seed(1))
    mapping = {(nn.Conv2d, modekernels.BatchNorm2d): torch.ao.quantization.fuse_conv_bn}
    fused = torch.ao.quantization.fuse_modules(
        model, [["0", "1"]], fuse_custom_config_dict={"additional_fuser_method_mapping": mapping})
    assert type(fused[1]) is nn.Identity
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), model(x), **TOL[torch.float32])
    assert type(torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])) is nn.Conv2d


def test_fuse_and_revert_keep_the_relu_object_and_every_mode():
    # A model fused in eval and reverted after switching modes: the fused slot and the ReLU put
    # back have the model's flags, and revert puts back the same (here shared) ReLU object.
    relu = nn.ReLU()
    model = nn.Sequential(nn.BatchNorm1d(3), relu, nn.Linear(3, 3), relu).eval()
    modekernels.convert(model, fuse=True)
    assert [type(m) for m in model] == [modekernels.BatchNormReLU1d, modekernels.FusedReLU,
                                        nn.Linear, nn.ReLU]
    modekernels.check_modes(model, "eval")
    model.train()
    copied = modekernels.revert(model, inplace=False)
    assert copied[1] is copied[3] is not relu
    modekernels.revert(model)
    assert model[1] is model[3] is relu
    modekernels.check_modes(model, "train")


class Taps(nn.Sequential):
    """A Sequential with a forward of its own, which returns every layer's output."""

    def forward(self, input):
        outputs = []
        for layer in self:
            input = layer(input)
            outputs.append(input)
        return outputs


def test_fuse_leaves_a_sequential_with_its_own_forward_alone():
    model = nn.Sequential(Taps(nn.BatchNorm1d(3), nn.ReLU()), nn.BatchNorm1d(3), nn.ReLU())
    reference = copy.deepcopy(model[0])
    modekernels.convert(model, fuse=True)
    assert [type(m) for m in model[0]] == [modekernels.BatchNorm1d, nn.ReLU]
    assert type(model[1]) is modekernels.BatchNormReLU1d
    x = torch.randn(8, 3)
    for ours, theirs in zip(model[0](x), reference(x)):
        torch.testing.assert_close(ours, theirs, **TOL[torch.float32])


def test_revert_finds_a_fused_relu_in_a_sequential_with_its_own_forward():
    # Older versions fused in every nn.Sequential: revert puts the ReLU back wherever it is.
    model = Taps(modekernels.BatchNormReLU1d(3), modekernels.FusedReLU())
    modekernels.revert(model)
    assert [type(m) for m in model] == [nn.BatchNorm1d, nn.ReLU]


class Abs(nn.Module):
    def forward(self, weight):
        return weight.abs()


@pytest.mark.parametrize("subclasses", [False, True])
def test_parametrized_layers_convert_revert_and_unparametrize(subclasses):
    # torch's parametrized class is remade on ours and back, so that remove_parametrizations
    # (which deletes the properties from the module's class, then takes its first base) works.
    layer = nn.BatchNorm1d(3)
    nn.utils.parametrize.register_parametrization(layer, "weight", Abs())
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.tensor([-1.0, 2.0, -3.0]))
    x = torch.randn(8, 3)
    expected = layer(x)
    modekernels.convert(layer, subclasses=subclasses)
    assert type(layer).__bases__ == (modekernels.BatchNorm1d,)
    torch.testing.assert_close(layer(x), expected, **TOL[torch.float32])
    modekernels.revert(layer)
    assert type(layer).__bases__ == (nn.BatchNorm1d,)
    modekernels.convert(layer)
    nn.utils.parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is modekernels.BatchNorm1d
    torch.testing.assert_close(layer.weight, torch.tensor([1.0, 2.0, 3.0]))


def test_conv_bn_folding_leaves_a_fused_relu_alone_or_refuses_it():
    # Folding a BatchNormReLU into the convolution before it would drop its ReLU (the ReLU's slot
    # holds an identity): torch.fx's fuser matches exact classes and leaves it, eager
    # quantization's refuses it, and the README's route for the rest is to revert first.
    torch_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    randomize_running_stats(torch_model, torch.Generator().manual_seed(2))
    ours = modekernels.convert(copy.deepcopy(torch_model), fuse=True)
    assert type(ours[1]) is modekernels.BatchNormReLU2d
    x = torch.randn(2, 3, 6, 6)
    expected = torch_model(x)
    from torch.fx.experimental.optimization import fuse
    torch.testing.assert_close(fuse(copy.deepcopy(ours))(x), expected, **TOL[torch.float32])
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(copy.deepcopy(ours), [["0", "1"]])
    reverted = modekernels.revert(copy.deepcopy(ours))
    folded = torch.nn.utils.fusion.fuse_conv_bn_eval(reverted[0], reverted[1])
    torch.testing.assert_close(reverted[2](folded(x)), expected, **TOL[torch.float32])


def test_torchs_sync_batchnorm_conversion_of_a_fused_model_raises_instead_of_dropping_the_relu():
    # torch.nn.SyncBatchNorm.convert_sync_batchnorm turns every BatchNorm, a fused BatchNormReLU
    # too, into torch's SyncBatchNorm; the FusedReLU after it must not pass the negative values on.
    model = modekernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                                fuse=True)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert [type(m) for m in synced] == [nn.Conv2d, nn.SyncBatchNorm, modekernels.FusedReLU]
    x = torch.randn(2, 3, 6, 6)
    for mode in (synced.train, synced.eval):
        mode()
        with pytest.raises(RuntimeError, match="FusedReLU: its input comes from NativeBatchNormBackward0"):
            synced(x)
    ours = modekernels.SyncBatchNorm.convert_sync_batchnorm
    with pytest.warns(UserWarning, match="BatchNormReLU2d is left unsynchronized"):
        kept = ours(copy.deepcopy(model))
    reverted = ours(modekernels.revert(copy.deepcopy(model)))
    assert [type(m) for m in kept] == [nn.Conv2d, modekernels.BatchNormReLU2d, modekernels.FusedReLU]
    assert [type(m) for m in reverted] == [nn.Conv2d, modekernels.SyncBatchNorm, nn.ReLU]
    for m in (kept, reverted):
        assert (m(x) >= 0).all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_sequential_compiles_as_one_graph(training):
    # FusedReLU checks its input's autograd node only outside compilation: no graph break.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train(training)
    randomize_running_stats(model, torch.Generator().manual_seed(3))
    ours = modekernels.convert(copy.deepcopy(model), fuse=True)
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    out = torch.compile(ours, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, model(x), **TOL[torch.float32])


# ------------------------------------------------------------------------------- containers

class Pair(nn.Module):
    """Holds the same BatchNorm twice, once directly and once inside a Sequential."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.block = nn.Sequential(nn.Linear(4, 4), self.bn, nn.Dropout(0.2))

    def forward(self, x):
        return self.block(self.bn(x))


class Listed(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.BatchNorm2d(3), nn.Dropout(0.1), nn.ReLU()])


CONTAINERS = {
    "Sequential": lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.3)),
    "ModuleList": lambda: nn.ModuleList([nn.BatchNorm2d(3), nn.Dropout(0.1),
                                         nn.Sequential(nn.BatchNorm3d(2))]),
    "ModuleList_in_module": Listed,
    "ModuleDict": lambda: nn.ModuleDict({"bn": nn.BatchNorm3d(2), "drop": nn.Dropout(),
                                         "inner": nn.ModuleDict({"bn1d": nn.BatchNorm1d(5)})}),
    "shared_layer": Pair,
    "root_is_a_layer": lambda: nn.BatchNorm2d(3),
}


@pytest.mark.parametrize("make", CONTAINERS.values(), ids=CONTAINERS.keys())
def test_convert_and_revert_containers(make):
    model = make()
    before = classes(model)
    assert modekernels.convert(model) is model
    assert converted_names(model) == targets(model) != []
    assert modekernels.revert(model) is model
    assert classes(model) == before


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "copy"])
def test_shared_layer_stays_shared(inplace):
    original = Pair()
    model = modekernels.convert(original, inplace=inplace)
    assert model.bn is model.block[1]
    assert type(model.bn) is modekernels.BatchNorm1d
    assert (model is original) == inplace
    assert type(original.bn) is (modekernels.BatchNorm1d if inplace else nn.BatchNorm1d)


@pytest.mark.parametrize("device", DEVICES)
def test_convert_preserves_state_hooks_and_flags(device):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5),
                          nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 9)))
    model.to(device, torch.float64)
    model[1].weight.requires_grad_(False)
    model[3].eval()
    model[2].eval()
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    flags = modekernels.modes(model).training
    calls = []
    model[1].register_forward_hook(lambda *_: calls.append("bn"))

    modekernels.convert(model)
    assert converted_names(model) == ["1", "2", "3.1"]
    assert all(p is params[n] for n, p in model.named_parameters())  # the same objects
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    assert modekernels.modes(model).training == flags
    output = model(torch.randn(2, 3, 3, 3, dtype=torch.float64, device=device))
    assert output.dtype == torch.float64 and output.device.type == device
    assert calls == ["bn"]


def test_optimizer_made_before_conversion_still_trains():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    modekernels.convert(model)
    weight = model[1].weight.detach().clone()
    model(torch.randn(8, 3)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, weight)


@pytest.mark.parametrize("dropout,batchnorm,expected", [
    (True, False, ["2"]), (False, True, ["1"]), (False, False, [])],
    ids=["dropout_only", "batchnorm_only", "nothing"])
def test_convert_selects_layer_kinds(dropout, batchnorm, expected):
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    modekernels.convert(model, dropout=dropout, batchnorm=batchnorm)
    assert converted_names(model) == expected


class PlusOneBatchNorm(nn.BatchNorm2d):
    def forward(self, input):
        return super().forward(input) + 1


def test_subclasses_only_on_request():
    model = nn.Sequential(PlusOneBatchNorm(3), nn.BatchNorm2d(3))
    modekernels.convert(model)
    assert type(model[0]) is PlusOneBatchNorm and type(model[1]) is modekernels.BatchNorm2d

    modekernels.convert(model, subclasses=True)
    layer = model[0]
    assert isinstance(layer, PlusOneBatchNorm) and isinstance(layer, modekernels.BatchNorm2d)
    assert type(layer).__name__ == "PlusOneBatchNorm"
    x = torch.randn(2, 3, 4, 4)
    expected = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True) + 1
    torch.testing.assert_close(layer(x), expected, **TOL[torch.float32])

    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded[0]) is type(layer)

    modekernels.revert(model)
    assert type(model[0]) is PlusOneBatchNorm and type(model[1]) is nn.BatchNorm2d


def test_convert_twice_changes_nothing():
    model = modekernels.convert(Pair(), subclasses=True)
    before = classes(model)
    modekernels.convert(model, subclasses=True)
    assert classes(model) == before


@needs_torchvision
def test_reverted_model_pickles_without_modekernels():
    model = modekernels.convert(torchvision.models.resnet18(weights=None))
    pickled = io.BytesIO()
    torch.save(model, pickled)
    assert b"modekernels" in pickled.getvalue()

    modekernels.revert(model)
    pickled = io.BytesIO()
    torch.save(model, pickled)
    assert b"modekernels" not in pickled.getvalue()
    assert converted_names(model) == []


@needs_torchvision
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_jit_script_names_our_layer_and_scripts_the_reverted_model():
    model = modekernels.convert(torchvision.models.resnet18(weights=None), fuse=True).eval()
    before = dict(model.named_modules())
    with pytest.raises(RuntimeError, match=r"^torch.jit.script cannot compile "
                       r"modekernels.BatchNorm2d: use torch.compile, .*modekernels.revert"):
        torch.jit.script(model)
    assert dict(model.named_modules()) == before

    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    scripted = torch.jit.script(modekernels.revert(model))
    torch.testing.assert_close(scripted(x), expected)
    for layer in (modekernels.Dropout2d(), modekernels.DropoutAdd(), modekernels.BatchNormReLU1d(3)):
        with pytest.raises(RuntimeError, match=f"modekernels.{type(layer).__name__}:"):
            torch.jit.script(layer)


# ------------------------------------------------------------------------------------ modes

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 36, 8), nn.BatchNorm1d(8),
                                  nn.Dropout(0.5), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(self.backbone(x))


def partly_frozen():
    """A Net in train mode whose backbone is in eval and whose head's BatchNorm is frozen."""
    model = Net()
    modekernels.freeze_batchnorm(model.head)
    model.backbone.eval()
    return model


def test_modes_report_data():
    report = modekernels.modes(partly_frozen())
    assert report.training == {
        "": True, "backbone": False, "backbone.0": False, "backbone.1": False,
        "backbone.2": False, "head": True, "head.0": True, "head.1": True, "head.2": False,
        "head.3": True, "head.4": True}
    assert report.mixed == ["backbone"]
    assert report.frozen == ["head.2"]
    assert report.classes["head.2"] == "BatchNorm1d"


def test_modes_report_text():
    text = str(modekernels.modes(partly_frozen()))
    head, *rows = text.splitlines()
    assert head.startswith("Net: train mode; MIXED") and "backbone" in head
    assert len(rows) == 11
    by_name = {row.split()[0]: row for row in rows}
    assert by_name["backbone"].split()[1:3] == ["Sequential", "eval"]
    assert "differs from its parent" in by_name["backbone"]
    assert "frozen" in by_name["head.2"]
    assert "differs" not in by_name["backbone.1"]


def test_modes_report_uniform():
    report = modekernels.modes(Net().eval())
    assert report.mixed == [] and report.frozen == [] and not any(report.training.values())
    assert "all modules alike" in str(report).splitlines()[0]


@pytest.mark.parametrize("expect", ["eval", "train"])
def test_check_modes_names_offenders(expect):
    model = Net().train(expect == "eval")  # the opposite mode...
    model.head[1].train(expect == "train")  # ...but for one layer
    with pytest.raises(modekernels.ModeError) as error:
        modekernels.check_modes(model, expect)
    assert isinstance(error.value, ValueError)
    assert "10 module(s) are not: (root) (and 9 inside)" in str(error.value)
    assert set(error.value.modules) == set(dict(model.named_modules())) - {"head.1"}

    model.train(expect == "train")
    modekernels.check_modes(model, expect)


def test_check_modes_accepts_frozen_batchnorm_when_training():
    model = partly_frozen()
    model.train()
    modekernels.check_modes(model, "train")
    model.backbone.eval()
    with pytest.raises(modekernels.ModeError, match=r"backbone \(and 3 inside\)") as error:
        modekernels.check_modes(model, "train")
    assert "head.2" not in error.value.modules
    with pytest.raises(ValueError, match="expect"):
        modekernels.check_modes(model, "training")


class Boom(Exception):
    pass


@pytest.mark.parametrize("raises", [False, True], ids=["normal_exit", "exception"])
@pytest.mark.parametrize("switch", ["training", "evaluating"])
def test_context_managers_restore_mixed_modes(switch, raises):
    model = partly_frozen()
    before = modekernels.modes(model).training
    mode = switch == "training"

    with pytest.raises(Boom) if raises else contextlib.nullcontext():
        with getattr(modekernels, switch)(model) as inside:
            assert inside is model
            flags = modekernels.modes(model).training
            assert flags.pop("head.2") is False  # frozen: eval whatever the model's mode
            assert set(flags.values()) == {mode}
            if raises:
                raise Boom
    assert modekernels.modes(model).training == before


# ------------------------------------------------------------------------- frozen BatchNorm

@pytest.mark.parametrize("layers", ["torch", "modekernels"])
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_batchnorm_keeps_statistics_while_training(device, layers):
    torch.manual_seed(0)
    model = Net()
    if layers == "modekernels":
        modekernels.convert(model)
    randomize_running_stats(model, torch.Generator().manual_seed(5))
    model.to(device)
    bns = [model.backbone[1], model.head[2]]
    stats = copy.deepcopy([b.state_dict() for b in bns])
    modekernels.freeze_batchnorm(model)
    model.train()
    assert [b.training for b in bns] == [False, False] and model.head[3].training

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    conv = model.backbone[0].weight.detach().clone()
    x = torch.randn(4, 1, 8, 8, device=device)
    features = model.backbone[0](x)
    expected = nn.functional.batch_norm(features, bns[0].running_mean, bns[0].running_var,
                                        bns[0].weight, bns[0].bias, training=False)
    torch.testing.assert_close(bns[0](features), expected, **TOL[torch.float32])
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1], device=device)).backward()
    optimizer.step()

    for bn, before in zip(bns, stats):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(bn, name), before[name]), name
        assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0
    assert not torch.equal(model.backbone[0].weight, conv)

    modekernels.unfreeze_batchnorm(model)
    model.train()
    model(x)
    assert all(int(b.num_batches_tracked) == 8 for b in bns)


def test_freeze_survives_train_deepcopy_and_unfreeze_follows_parent():
    model = modekernels.freeze_batchnorm(Net())
    for switch in (model.train, model.eval, model.train):
        switch()
        assert not model.backbone[1].training
    twin = copy.deepcopy(model)
    twin.backbone[1].training = True
    twin.train()
    assert not twin.backbone[1].training  # the copy's override acts on the copy
    assert modekernels.modes(twin).frozen == ["backbone.1", "head.2"]

    model.backbone.eval()
    modekernels.unfreeze_batchnorm(model)
    assert modekernels.modes(model).frozen == []
    assert not model.backbone[1].training and model.head[2].training
    model.train()
    assert model.backbone[1].training


def test_freeze_refuses_layers_without_running_stats():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match=r"\(track_running_stats=False\): 1$"):
        modekernels.freeze_batchnorm(model)
    assert modekernels.modes(model).frozen == []  # nothing changed


def test_frozen_batchnorm_under_compile():
    torch.manual_seed(0)
    model = modekernels.freeze_batchnorm(modekernels.convert(Net()))
    randomize_running_stats(model, torch.Generator().manual_seed(6))
    stats = copy.deepcopy(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 1, 8, 8)
    with modekernels.evaluating(model.head[3]):  # no dropout: eager and compiled comparable
        out = compiled(x)
        out.sum().backward()
        torch.testing.assert_close(out, model(x), **TOL[torch.float32])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(model.backbone[1].get_buffer(name), stats[f"backbone.1.{name}"])
    assert model.backbone[1].weight.grad.abs().sum() > 0


# A layer of each kind, with the inputs its forward takes for an (N, 4, H, W) shape.
DYNAMIC_LAYERS = {
    "Dropout": (lambda: modekernels.Dropout(0.3), lambda s: (torch.randn(s),)),
    "Dropout2d": (lambda: modekernels.Dropout2d(0.3), lambda s: (torch.randn(s),)),
    "DropoutAdd": (lambda: modekernels.DropoutAdd(0.3), lambda s: (torch.randn(s), torch.randn(s))),
    "BiasDropoutAdd": (lambda: modekernels.BiasDropoutAdd(0.3),
                       lambda s: (torch.randn(s), torch.randn(s[-1]), torch.randn(s))),
    "BatchNorm2d": (lambda: modekernels.BatchNorm2d(4), lambda s: (torch.randn(s),)),
    "BatchNormReLU2d": (lambda: modekernels.BatchNormReLU2d(4), lambda s: (torch.randn(s),)),
    "BatchNormAddReLU2d": (lambda: modekernels.BatchNormAddReLU2d(4),
                           lambda s: (torch.randn(s), torch.randn(s))),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layer", list(DYNAMIC_LAYERS))
def test_dynamic_shapes_compile_once(layer, training):
    # torch.compile(dynamic=True) keeps sizes symbolic through our ops, their fake kernels and
    # their autograd, so new batch and spatial sizes reuse the graph (all sizes distinct and
    # above 1, which torch specializes), and it computes what eager does.
    make, inputs = DYNAMIC_LAYERS[layer]
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    eager, compiled = make().train(training), make().train(training)
    fn = torch.compile(compiled, backend=counter, dynamic=True, fullgraph=True)
    compiles = []
    for shape in [(2, 4, 3, 5), (3, 4, 6, 7), (7, 4, 9, 2)]:
        args = [a.requires_grad_() for a in inputs(shape)]
        results = []
        for module in (eager, fn):
            torch.manual_seed(0)
            out = module(*args)
            results.append((out, *torch.autograd.grad(out.square().sum(), args)))
        torch.testing.assert_close(results[1], results[0], **TOL[torch.float32])
        compiles.append(counter.frame_count)
    assert compiles[0] > 0 and compiles[-1] == compiles[0]  # the first shape's graph served all
    torch.testing.assert_close(compiled.state_dict(), eager.state_dict())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layer", list(DYNAMIC_LAYERS))
def test_export_with_dynamic_sizes(layer, training):
    # torch.export with the batch and spatial sizes dynamic: no size is specialized (export
    # would raise), and the program computes at another shape what eager does.
    make, inputs = DYNAMIC_LAYERS[layer]
    module = make().train(training)
    dims = {0: torch.export.Dim("n", min=2), 2: torch.export.Dim("h", min=2),
            3: torch.export.Dim("w", min=2)}
    args = inputs((2, 4, 3, 5))
    dynamic = [dims if a.dim() == 4 else {0: dims[3]} for a in args]
    program = torch.export.export(module, tuple(args), dynamic_shapes=dynamic).module()
    args = inputs((6, 4, 8, 7))
    results = []
    for fn in (program, copy.deepcopy(module)):
        torch.manual_seed(0)
        results.append(fn(*args))
    torch.testing.assert_close(results[0], results[1], **TOL[torch.float32])


# ---------------------------------------------------------------------------------- example

@pytest.fixture(scope="module")
def train_digits():
    path = pathlib.Path(__file__).parents[1] / "examples" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("train_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_quick_run_reaches_the_bar(train_digits, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert train_digits.main(["--quick", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    final = capsys.readouterr().out.splitlines()[-2]
    assert final.startswith("final test accuracy: torch ") and "modekernels" in final


def test_example_failures_are_reported(train_digits):
    def history(accuracy, deterministic=True):
        return train_digits.History(test_accuracy=[accuracy], eval_deterministic=deterministic)

    assert train_digits.failures({"a": history(0.97), "b": history(0.98)}) == []
    problems = train_digits.failures({"a": history(0.94), "b": history(0.99, False)})
    assert len(problems) == 3
    assert "a: test accuracy 94.00%" in problems[0] and "5.00 points" in problems[1]


def test_ddp_example_trains_as_one_process_would():
    # torchrun, two gloo processes, DistributedDataParallel over convert(model, sync=True): the
    # example compares against one process on the whole mini-batches and fails on a difference.
    path = pathlib.Path(__file__).parents[1] / "examples" / "ddp_digits.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(path), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "epoch 2: 2 processes against one, relative difference" in done.stdout
    assert "test accuracy after 2 epochs on 2 processes" in done.stdout
