"""Tools for whole models: convert to modekernels' layers and back, and inspect or control modes.

`convert` and `revert` swap the class of each layer in place. modekernels' layers subclass
torch's and override `forward` only, so a layer's state (parameters, buffers, hooks, `training`)
is the same under either class and nothing has to be copied. `convert(sync=True)` makes every
BatchNorm a modekernels.SyncBatchNorm the same way.

The mode tools work on any model. `modes` reports every module's `training` flag,
`check_modes` asserts one, and `training` / `evaluating` switch a whole model for a block and
then give each module its previous flag back. `freeze_batchnorm` keeps BatchNorm layers on their
running statistics while the rest of the model trains.
"""
import collections
import contextlib
import copy
import dataclasses
import functools
import warnings

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from . import distributed as _distributed, nn as _nn

# torch's layer -> modekernels' drop-in subclass.
_DROPOUT = {
    torch.nn.Dropout: _nn.Dropout,
    torch.nn.Dropout1d: _nn.Dropout1d,
    torch.nn.Dropout2d: _nn.Dropout2d,
    torch.nn.Dropout3d: _nn.Dropout3d,
}
_BATCHNORM = {
    torch.nn.BatchNorm1d: _nn.BatchNorm1d,
    torch.nn.BatchNorm2d: _nn.BatchNorm2d,
    torch.nn.BatchNorm3d: _nn.BatchNorm3d,
    torch.nn.SyncBatchNorm: _distributed.SyncBatchNorm,
}
# convert(sync=True): every unfused BatchNorm, torch's or ours, -> our SyncBatchNorm.
_SYNC = dict.fromkeys([*_BATCHNORM, _nn.BatchNorm1d, _nn.BatchNorm2d, _nn.BatchNorm3d],
                      _distributed.SyncBatchNorm)
# Lazy layers not yet initialized (their classes change at the first call): ours become ours.
_BATCHNORM |= {
    torch.nn.LazyBatchNorm1d: _nn.LazyBatchNorm1d,
    torch.nn.LazyBatchNorm2d: _nn.LazyBatchNorm2d,
    torch.nn.LazyBatchNorm3d: _nn.LazyBatchNorm3d,
}
_OURS = _DROPOUT | _BATCHNORM
# Our BatchNorm -> its fusion with a following ReLU (convert(fuse=True)).
_FUSED_RELU = {
    _nn.BatchNorm1d: _nn.BatchNormReLU1d,
    _nn.BatchNorm2d: _nn.BatchNormReLU2d,
    _nn.BatchNorm3d: _nn.BatchNormReLU3d,
}
_TORCH_OF = {ours: theirs for theirs, ours in _OURS.items()}
_TORCH_OF |= {fused: _TORCH_OF[bn] for bn, fused in _FUSED_RELU.items()}
_OUR_CLASSES = tuple(_TORCH_OF)
_ROOT = "(root)"


# ------------------------------------------------------------------------------- conversion

def convert(model, *, dropout=True, batchnorm=True, inplace=True, subclasses=False, fuse=False,
            sync=False, process_group=None):
    """Replaces torch's Dropout, BatchNorm1d/2d/3d and SyncBatchNorm in `model` with modekernels'.

    torch's LazyBatchNorm1d/2d/3d not yet initialized become modekernels' lazy layers, which turn
    into modekernels' BatchNorm1d/2d/3d at their first call.

    Each matching module (the root included, every shared module once) gets modekernels' class
    in place of its own. The objects are kept rather than rebuilt: modekernels' classes only
    override `forward`, so the state a layer holds is valid under either class, and nothing is
    copied or re-registered. Everything on them stays as it was: the same Parameter objects (an
    optimizer made before keeps working), buffers (running statistics, num_batches_tracked),
    requires_grad, device, dtype, hooks and each module's `training` flag; a layer held in two
    places stays one shared layer, and references held outside the model stay valid. The
    state_dict keys and values do not change, so state_dicts move freely between a converted
    model and the original architecture.

    Only the exact torch classes are converted, unless `subclasses` is true. A user subclass
    then gets a class deriving from both itself and modekernels' layer: its own methods still
    win, and where it calls `super().forward` it reaches modekernels' kernels. Subclasses of
    torch's SyncBatchNorm are the exception and stay as they are (modekernels.SyncBatchNorm is
    no subclass of torch's, so torch's forward would win). Layers that are modekernels' already
    are left alone.

    In training mode, Dropout draws its masks from modekernels' random stream, not torch's, so
    the masks (not their distribution) differ from the original model's.

    With `fuse`, a BatchNorm directly followed by a ReLU inside an nn.Sequential (one that runs
    torch's own forward) becomes one BatchNormReLU layer (same state) and the ReLU a `FusedReLU`
    placeholder (an identity with no state, so state_dicts do not change); `revert` puts the
    same ReLU object back. A BatchNorm used in more than one place, or either layer with hooks of
    its own (forward, forward-pre, backward), is left unfused. Nothing else is fused. A fused
    BatchNorm applies the ReLU wherever it is called from, a reference held outside the model
    included, and global module hooks see its output as the BatchNorm's.

    With `sync`, every BatchNorm1d/2d/3d, torch's or modekernels' (unfused), and torch's
    SyncBatchNorm becomes a modekernels.SyncBatchNorm, in place like every other layer: the
    batch statistics in training are then those of all processes of `process_group` (default:
    the whole world). Layers that were SyncBatchNorm keep their own group. BatchNorm layers left
    unsynchronized (fused ones, user subclasses without `subclasses`) are named in a warning;
    `fuse` does not fuse SyncBatchNorm layers. `revert` then gives torch.nn.SyncBatchNorm
    layers, as torch's convert_sync_batchnorm would (the original BatchNormNd class is not
    recorded).

    Returns the converted model: `model` itself, or a converted deep copy if `inplace` is false.
    """
    if process_group is not None and not sync:
        raise ValueError("process_group is only used with sync=True")
    targets = (_DROPOUT if dropout else {}) | ((_SYNC if sync else _BATCHNORM) if batchnorm else {})
    torch_classes = tuple(targets)

    def ours(cls):
        if cls in targets:
            return targets[cls]
        if issubclass(cls, _OUR_CLASSES):
            return None
        # Subclasses of torch's SyncBatchNorm stay: ours is no subclass of it (distributed.py), so
        # the joint class would reach torch's forward first.
        if (subclasses and issubclass(cls, torch_classes)
                and not issubclass(cls, torch.nn.SyncBatchNorm)):
            return _converted_subclass(cls, next(targets[c] for c in cls.__mro__ if c in targets))
        return None

    model = _swap_classes(model, ours, inplace)
    if sync and batchnorm:
        _set_sync_group(model, process_group)
    if fuse:
        _fuse_batchnorm_relu(model)
    return model


def _set_sync_group(model, process_group):
    """Gives the layers convert(sync=True) made SyncBatchNorm their group; warns of the rest."""
    unsynchronized = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.SyncBatchNorm, _distributed.SyncBatchNorm)):
            if not hasattr(module, "process_group"):  # a plain BatchNorm until now
                module.process_group = process_group
        elif isinstance(module, _BatchNorm):
            unsynchronized.append(_display(name))
    if unsynchronized:
        warnings.warn("convert(sync=True) left these BatchNorm layers unsynchronized (fused "
                      "layers, and subclasses without subclasses=True): "
                      + ", ".join(unsynchronized), stacklevel=3)


class FusedReLU(torch.nn.Identity):
    """Where `convert(fuse=True)` folded a ReLU into the BatchNorm before it; `revert` restores it.

    An identity, which raises where its input comes from a BatchNorm that applies no ReLU (an
    autograd node of torch's BatchNorm kernels or of our SyncBatchNorm; ours fused report
    `CppFunction`): the fused layer was replaced, as `torch.nn.SyncBatchNorm.convert_sync_batchnorm`
    replaces every BatchNorm, and the ReLU would silently go missing. Inputs without a node (no
    grad, eval under no_grad) and traced or compiled calls pass unchecked.
    """

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def forward(self, input):
        if isinstance(input, torch.Tensor) and not torch.compiler.is_compiling():
            node = type(input.grad_fn).__name__
            if "BatchNorm" in node:
                raise RuntimeError(
                    f"FusedReLU: its input comes from {node}, a BatchNorm without the ReLU that "
                    "convert(fuse=True) folded into the layer before; that layer was replaced (as "
                    "torch.nn.SyncBatchNorm.convert_sync_batchnorm replaces every BatchNorm). Undo "
                    "the fusion first (modekernels.revert), or synchronize with "
                    "modekernels.SyncBatchNorm.convert_sync_batchnorm, which leaves fused layers "
                    "as they are")
        return input


def _fuse_batchnorm_relu(model):
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for seq in _plain_sequentials(model):
        for i in range(len(seq) - 1):
            bn, act = seq[i], seq[i + 1]
            if (type(bn) in _FUSED_RELU and type(act) is torch.nn.ReLU and uses[id(bn)] == 1
                    and not _hooked(bn) and not _hooked(act)):
                bn.__class__ = _FUSED_RELU[type(bn)]
                fused = FusedReLU(act.inplace)
                fused.training = act.training
                # The ReLU itself, for revert to put back (outside the module tree: not a child).
                object.__setattr__(fused, "_mk_relu", act)
                seq[i + 1] = fused


def _plain_sequentials(model):
    """The nn.Sequential modules of `model` that run torch's forward: one of a subclass that
    defines its own may read a BatchNorm's output or call its layers in another order."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Sequential)
            and type(m).forward is torch.nn.Sequential.forward]


def _hooked(module):
    """Whether hooks watch the module's own inputs, outputs or gradients, which fusing changes
    (the BatchNorm's output would be the ReLU's) or drops (the ReLU's call)."""
    return any(getattr(module, hooks) for hooks in (
        "_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"))


def _unfuse_relu(model):
    """Puts back the ReLU each FusedReLU stands for (a new one for a FusedReLU pickled before
    they kept it), with the FusedReLU's `training` flag, wherever it is (older versions fused in
    every nn.Sequential)."""
    for parent in model.modules():
        for name, m in list(parent.named_children()):
            if type(m) is FusedReLU:
                relu = vars(m).get("_mk_relu") or torch.nn.ReLU(m.inplace)
                relu.training = m.training
                setattr(parent, name, relu)


def revert(model, *, inplace=True):
    """The inverse of `convert`: modekernels' layers become torch's (or the user's subclass).

    The result holds no reference to modekernels, so it can be pickled whole and loaded where
    modekernels is not installed (as long as no BatchNorm is frozen, see `freeze_batchnorm`).
    """
    def theirs(cls):
        return _TORCH_OF.get(cls) or vars(cls).get("_mk_source")

    model = _swap_classes(model, theirs, inplace)
    _unfuse_relu(model)
    return model


def _swap_classes(model, new_class, inplace):
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        if parametrize.is_parametrized(module):
            cls = new_class(type(module).__bases__[0])
            if cls is not None:
                module.__class__ = _reparametrized(type(module), cls)
            continue
        cls = new_class(type(module))
        if cls is not None:
            module.__class__ = cls
    return model


def _reparametrized(parametrized, base):
    """The class torch.nn.utils.parametrize made for a module (`parametrized`, derived from the
    module's own class, with a property per parametrized tensor) remade on `base`: the module
    then runs base's forward, and remove_parametrizations, which deletes those properties from
    the module's class and gives the module the class's first base, leaves it a `base`."""
    namespace = {k: v for k, v in vars(parametrized).items() if k not in ("__dict__", "__weakref__")}
    return type(f"Parametrized{base.__name__}", (base,), namespace)


@functools.cache
def _converted_subclass(source, ours):
    """The class `convert(subclasses=True)` gives to instances of the user's class `source`,
    deriving from it and from modekernels' layer `ours`."""
    namespace = {"__module__": source.__module__, "_mk_source": source,
                 "__reduce_ex__": _reduce_converted_subclass}
    return type(source.__name__, (source, ours), namespace)


def _reduce_converted_subclass(self, protocol):
    # A class made at run time cannot be pickled by name: pickle the user's class instead, and
    # rebuild the converted class from it when loading.
    _, _, *state = object.__reduce_ex__(self, protocol)
    return (_new_converted_subclass, type(self).__bases__, *state)


def _new_converted_subclass(source, ours=None):
    # `ours` is absent from pickles made before convert(sync=True) existed.
    ours = ours or next(_OURS[cls] for cls in source.__mro__ if cls in _OURS)
    return object.__new__(_converted_subclass(source, ours))


# ------------------------------------------------------------------------------------ modes

@dataclasses.dataclass
class ModeReport:
    """The `training` flag of every module of a model; str() gives a readable report.

    Names are those of `model.named_modules()` ("" for the root; a shared module appears once).
    `mixed` lists the modules whose flag differs from their parent's (the tops of the subtrees
    in another mode), frozen BatchNorm layers excepted: those are listed in `frozen`.
    """

    training: dict  # name -> bool
    classes: dict  # name -> class name
    frozen: list
    mixed: list

    def __str__(self):
        root = "train" if self.training[""] else "eval"
        head = f"{self.classes['']}: {root} mode"
        if self.mixed:
            head += "; MIXED, in another mode than their parent: " + ", ".join(self.mixed)
        else:
            head += "; all modules alike"
        if self.frozen:
            head += f"; {len(self.frozen)} BatchNorm layer(s) frozen"
        width = max(len(_display(name)) for name in self.training)
        cls_width = max(len(cls) for cls in self.classes.values())
        lines = [head]
        for name, flag in self.training.items():
            line = f"  {_display(name):<{width}}  {self.classes[name]:<{cls_width}}  "
            line += "train" if flag else "eval "
            if name in self.frozen:
                line += "  frozen BatchNorm: uses and keeps its running statistics"
            elif name in self.mixed:
                line += f"  <- differs from its parent ({'eval' if flag else 'train'})"
            lines.append(line.rstrip())
        return "\n".join(lines)

    def __repr__(self):
        return (f"<ModeReport of {self.classes['']}: {len(self.training)} modules, "
                f"{len(self.mixed)} mixed, {len(self.frozen)} frozen>")


def modes(model):
    """A ModeReport of every module's `training` flag in `model`."""
    named = dict(model.named_modules())
    training = {name: module.training for name, module in named.items()}
    frozen = [name for name, module in named.items() if _is_frozen(module)]
    mixed = [name for name, flag in training.items()
             if name and name not in frozen and flag != training[_parent(name)]]
    classes = {name: type(module).__name__ for name, module in named.items()}
    return ModeReport(training, classes, frozen, mixed)


class ModeError(ValueError):
    """A model is not in the mode it was expected to be in. `modules` names the offenders."""

    def __init__(self, message, modules):
        super().__init__(message)
        self.modules = modules


def check_modes(model, expect):
    """Raises ModeError naming every module of `model` not in the `expect`ed mode.

    `expect` is "eval" or "train". Frozen BatchNorm layers count as being in training mode:
    they are meant to stay in eval while the model trains.
    """
    if expect not in ("eval", "train"):
        raise ValueError(f'expect must be "eval" or "train", got {expect!r}')
    report = modes(model)
    wanted = expect == "train"
    offenders = [name for name, flag in report.training.items()
                 if flag != wanted and not (wanted and name in report.frozen)]
    if offenders:
        raise ModeError(f"expected {report.classes['']} in {expect} mode, but "
                        f"{len(offenders)} module(s) are not: {_subtrees(offenders)}", offenders)


def _subtrees(names, limit=10):
    """The tops of the subtrees that `names` (from named_modules) make up, for a message."""
    inside = set(names)
    tops = [name for name in names if not name or _parent(name) not in inside]
    shown = []
    for top in tops[:limit]:
        prefix = top + "." if top else ""
        below = sum(1 for name in names if name != top and name.startswith(prefix))
        shown.append(_display(top) + (f" (and {below} inside)" if below else ""))
    more = f" and {len(tops) - limit} more" if len(tops) > limit else ""
    return ", ".join(shown) + more


def training(model):
    """A context manager: `model` in training mode (model.train()) for the block, then every
    module's previous flag back, also on an exception. Frozen BatchNorm layers stay in eval."""
    return _switched(model, True)


def evaluating(model):
    """A context manager: `model` in eval mode (model.eval()) for the block, then every module's
    previous flag back, also on an exception, so a partly frozen model comes back as it was.

    Gradients stay on: combine with torch.no_grad() or torch.inference_mode()."""
    return _switched(model, False)


@contextlib.contextmanager
def _switched(model, mode):
    before = {module: module.training for module in model.modules()}
    try:
        model.train(mode)
        yield model
    finally:
        for module, flag in before.items():
            module.training = flag


def _display(name):
    return name or _ROOT


def _parent(name):
    return name.rpartition(".")[0]


# ------------------------------------------------------------------------ frozen BatchNorm

class _FrozenTrain:
    """Stands in for `train` on one BatchNorm instance: the layer stays in eval mode.

    model.train() calls each child's `train`, which finds this instance attribute before the
    class's method. Freezing is thus a plain `training = False` that torch (and torch.compile)
    already understands: running statistics are used and never updated.
    """

    def __init__(self, module):
        self.module = module

    def __call__(self, mode=True):
        self.module.training = False
        return self.module


def _is_frozen(module):
    return isinstance(vars(module).get("train"), _FrozenTrain)


def freeze_batchnorm(model):
    """Freezes every BatchNorm layer (any _BatchNorm, torch's or modekernels') in `model`.

    A frozen layer normalizes with its running statistics and leaves them, and
    num_batches_tracked, unchanged, while the rest of the model trains; later model.train()
    calls keep it so. Its affine parameters still receive gradients: set their requires_grad
    to freeze them too. Undo with `unfreeze_batchnorm`. Returns `model`.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    stateless = [_display(name) for name, m in layers if not m.track_running_stats]
    if stateless:
        raise ValueError("cannot freeze BatchNorm layers without running statistics "
                         f"(track_running_stats=False): {', '.join(stateless)}")
    for _, layer in layers:
        layer.train = _FrozenTrain(layer)
        layer.training = False
    return model


def unfreeze_batchnorm(model):
    """Undoes `freeze_batchnorm`: frozen layers take their parent's mode again. Returns `model`."""
    parents = [(model, model)] + [(parent, child) for parent in model.modules()
                                  for child in parent.children()]
    for parent, child in parents:
        if _is_frozen(child):
            del child.train
            child.training = parent.training
    return model
