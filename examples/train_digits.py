"""Train a small CNN on scikit-learn's digits, with torch's layers and with modekernels'.

The same network (BatchNorm2d, BatchNorm1d, Dropout) is trained twice from the same initial
weights and data order: once as built, once after modekernels.convert. Both runs print and plot
their loss and accuracy curves; the script exits non-zero unless both reach MIN_ACCURACY on the
test split and their final accuracies are within MAX_GAP points.

    python examples/train_digits.py [--epochs N] [--seed S] [--quick] [--out curves.png]
"""
import argparse
import dataclasses
import sys
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import modekernels

MIN_ACCURACY = 0.95
MAX_GAP = 0.02
BATCH_SIZE = 64


@dataclasses.dataclass
class History:
    train_loss: list = dataclasses.field(default_factory=list)
    test_loss: list = dataclasses.field(default_factory=list)
    test_accuracy: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    eval_deterministic: bool = False


def load_data(seed):
    """(x_train, y_train, x_test, y_test): 8x8 images scaled to [0, 1], a stratified 80/20 split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y,
                                                        random_state=seed)
    return x_train, y_train, x_test, y_test


def make_cnn(dropout=0.3):
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(128, 10))


def train_epoch(model, optimizer, x, y, generator):
    """One pass over (x, y) in shuffled mini-batches; returns the mean training loss."""
    total = 0.0
    for batch in torch.randperm(len(x), generator=generator).split(BATCH_SIZE):
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
    return total / len(x)


@torch.no_grad()
def evaluate(model, x, y):
    """(loss, accuracy) on (x, y); the caller must have put the whole model in eval mode."""
    modekernels.check_modes(model, "eval")
    logits = model(x)
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return nn.functional.cross_entropy(logits, y).item(), accuracy


def train(name, model, data, epochs, seed):
    """Trains `model` for `epochs` epochs, evaluating after each; returns its History."""
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    history = History()
    start = time.perf_counter()
    with tqdm(range(epochs), desc=f"{name:>11}", unit="epoch") as bar:
        for _ in bar:
            with modekernels.training(model):
                train_loss = train_epoch(model, optimizer, x_train, y_train, generator)
            with modekernels.evaluating(model):
                test_loss, accuracy = evaluate(model, x_test, y_test)
            history.train_loss.append(train_loss)
            history.test_loss.append(test_loss)
            history.test_accuracy.append(accuracy)
            bar.set_postfix(loss=f"{train_loss:.3f}", test_acc=f"{accuracy:.2%}")
    history.seconds = time.perf_counter() - start
    with modekernels.evaluating(model), torch.no_grad():
        history.eval_deterministic = torch.equal(model(x_test), model(x_test))
    return history


def failures(histories):
    """What keeps the runs from passing: the accuracy bar, their gap, eval determinism."""
    final = {name: h.test_accuracy[-1] for name, h in histories.items()}
    problems = [f"{name}: test accuracy {acc:.2%} is below {MIN_ACCURACY:.0%}"
                for name, acc in final.items() if acc < MIN_ACCURACY]
    gap = max(final.values()) - min(final.values())
    if gap > MAX_GAP:
        problems.append(f"final accuracies differ by {gap * 100:.2f} points "
                        f"(at most {MAX_GAP * 100:.0f} allowed)")
    problems += [f"{name}: two eval passes gave different outputs"
                 for name, h in histories.items() if not h.eval_deterministic]
    return problems


def print_curves(histories):
    names = list(histories)
    print("epoch  " + "  ".join(f"{n + ' train loss':>24}  {n + ' test acc':>22}" for n in names))
    for epoch in range(len(histories[names[0]].train_loss)):
        print(f"{epoch + 1:>5}  " + "  ".join(
            f"{h.train_loss[epoch]:>24.4f}  {h.test_accuracy[epoch]:>22.2%}"
            for h in histories.values()))
    print("final test accuracy: " + ", ".join(
        f"{name} {h.test_accuracy[-1]:.2%} ({h.seconds:.1f} s)" for name, h in histories.items()))


def plot_curves(histories, path):
    """Loss (train solid, test dashed) and test accuracy per epoch of every run, as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for (name, h), color in zip(histories.items(), ("tab:blue", "tab:orange")):
        epochs = range(1, len(h.train_loss) + 1)
        loss_ax.plot(epochs, h.train_loss, color=color, label=f"{name} train")
        loss_ax.plot(epochs, h.test_loss, color=color, linestyle="--", label=f"{name} test")
        acc_ax.plot(epochs, h.test_accuracy, color=color, marker=".", label=name)
    acc_ax.axhline(MIN_ACCURACY, color="gray", linewidth=0.8, linestyle=":",
                   label=f"{MIN_ACCURACY:.0%} bar")
    loss_ax.set(title="cross-entropy loss", xlabel="epoch", yscale="log")
    acc_ax.set(title="test accuracy", xlabel="epoch", ylim=(None, 1.0))
    loss_ax.legend()
    acc_ax.legend()
    fig.savefig(path, dpi=100)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 epochs: a few seconds")
    parser.add_argument("--out", default="digits_curves.png", help="where to write the plot")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 4
    return args


def main(argv=None):
    """Runs both trainings; returns the exit status (0 when both runs pass)."""
    args = parse_args(argv)
    data = load_data(args.seed)
    histories = {}
    for name, prepare in (("torch", lambda model: model), ("modekernels", modekernels.convert)):
        torch.manual_seed(args.seed)  # the same initial weights for both runs
        histories[name] = train(name, prepare(make_cnn()), data, args.epochs, args.seed)
    print_curves(histories)
    plot_curves(histories, args.out)
    print(f"curves written to {args.out}")
    problems = failures(histories)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
