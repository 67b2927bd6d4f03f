"""Baselines that modelsel's benchmark compares against, each runnable on its own.

Every subcommand prints exactly one JSON line on stdout::

    python benchmarks/baselines.py {d2l,skorch,sklearn,gemm} --grid small --epochs 5 --folds 5 \
        [--train-size N] [--threads T] [--data-root DIR]

with the keys ``name``, ``wall_s`` (seconds inside the process from the start of the
entry's function: its own imports, data loading and evaluation included, interpreter
start and the ``torch`` import not; ``run_all.py`` times the whole process around it),
``fold_epochs``, ``samples_trained``, ``best_cv_accuracy`` and ``best_params``, plus a
few entry-specific extras
(``samples_by_width`` for the GEMM-limit fraction, ``best_cv_std``, ``gemm`` figures).

The entries:

``d2l``
    The hand-written loop: an Optuna study with ``GridSampler`` over the grid whose
    objective runs ``StratifiedKFold(folds, shuffle=True, random_state=0)`` and trains each
    fold the D2L way (``torchvision.datasets.FashionMNIST(..., transform=ToTensor())``,
    ``Subset``, ``DataLoader(batch_size=256, shuffle=True, num_workers=0)``, SGD).
``skorch``
    ``skorch.NeuralNetClassifier`` under ``GridSearchCV`` with the same folds.
``sklearn``
    ``MLPClassifier(solver="sgd")`` under ``GridSearchCV`` with the same folds. Its ``alpha``
    is set to the grid's weight decay, but sklearn's L2 term is ``alpha / batch_size * W``
    in the gradient where torch's ``weight_decay`` adds ``weight_decay * W``: at batch 256
    sklearn's penalty is 256 times weaker for the same number.
``gemm``
    The machine's float32 ``torch.mm`` throughput at the D2L MLP's training-step shapes,
    i.e. the time a training step would take if it did nothing but its GEMMs.

The D2L MLP is 784-w-10 with ReLU, trained by SGD (lr 0.1, batch 256) on cross-entropy
with pixels in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: Hyperparameter grids: width of the hidden layer × SGD weight decay.
GRIDS: dict[str, dict[str, list[Any]]] = {
    "small": {"width": [64, 256], "weight_decay": [0.0, 1e-4]},
    "one": {"width": [256], "weight_decay": [0.0]},
}
BATCH_SIZE = 256
LR = 0.1
N_INPUTS = 784
N_CLASSES = 10
SEED = 0
#: Samples in one full Fashion-MNIST training epoch (the unit of the GEMM-limit figures).
EPOCH_SAMPLES = 60_000
DEFAULT_DATA_ROOT = "/work/shared/data"


# ---------------------------------------------------------------------- helpers


def data_root(explicit: str | None = None) -> str:
    """The torchvision data root: ``explicit``, else ``$MODELSEL_DATA_ROOT``, else the shared copy."""
    return explicit or os.environ.get("MODELSEL_DATA_ROOT") or DEFAULT_DATA_ROOT


def flops_per_sample(width: int) -> int:
    """FLOPs of one training sample through the 784-``width``-10 MLP (no input gradient).

    Forward ``2·(784·w + w·10)``, weight gradients ``2·(784·w + w·10)``, hidden-activation
    gradient ``2·w·10``; bias and elementwise work is not counted.
    """
    linear = N_INPUTS * width + width * N_CLASSES
    return 2 * linear + 2 * linear + 2 * width * N_CLASSES


def grid_cells(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid, width-major, as parameter dicts."""
    return [{"width": w, "weight_decay": wd} for w in grid["width"] for wd in grid["weight_decay"]]


def subsample_indices(labels: np.ndarray, train_size: int | None, seed: int = SEED) -> np.ndarray:
    """Sorted indices of a stratified subsample of ``train_size`` samples (all when ``None``)."""
    if train_size is None or train_size >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(
        np.arange(len(labels)), train_size=train_size, stratify=labels, random_state=seed
    )
    return np.sort(chosen)


def _split_arrays(root: str, *, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """A Fashion-MNIST split as float32 ``X`` in [0, 1] of shape (n, 784) and int64 ``y``,
    decoded straight from the raw files' tensors (no PIL)."""
    import torchvision

    dataset = torchvision.datasets.FashionMNIST(root, train=train)
    x = (dataset.data.reshape(-1, N_INPUTS).float() / 255.0).numpy()
    return x, dataset.targets.numpy().astype(np.int64)


def load_test_arrays(root: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST test split (10,000 images) as :func:`load_arrays` gives the training split."""
    x, y = _split_arrays(root, train=False)
    return np.ascontiguousarray(x), y


def load_arrays(root: str, train_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST training split as float32 ``X`` in [0, 1] of shape (n, 784) and int64 ``y``,
    subsampled with :func:`subsample_indices`, so every baseline sees the same samples."""
    x, labels = _split_arrays(root, train=True)
    chosen = subsample_indices(labels, train_size)
    return np.ascontiguousarray(x[chosen]), labels[chosen]


def stratified_folds(folds: int) -> Any:
    """The cross-validation splitter every baseline uses."""
    from sklearn.model_selection import StratifiedKFold

    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=SEED)


class MLP(nn.Module):
    """The D2L MLP: Flatten, Linear(784, width), ReLU, Linear(width, 10)."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(N_INPUTS, width), nn.ReLU(), nn.Linear(width, N_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images or flattened images."""
        return self.net(x)


#: The name under which the probes report :func:`in_memory_epochs` beside modelsel's engines.
PLAIN_LOOP = "pytorch"


def in_memory_epochs(
    X: torch.Tensor, y: torch.Tensor, *, width: int, seed: int, epochs: int, batch_size: int = BATCH_SIZE
) -> Iterator[tuple[nn.Module, float]]:
    """The D2L loop on tensors held in memory, the way one writes it by hand.

    ``MLP(width)``, ``torch.optim.SGD(lr=LR)``, a fresh ``randperm`` each epoch and
    batches of ``batch_size`` sliced from it (the issue's "PyTorch on tensors held in
    memory, batches sliced from a shuffled index"). Yields the network (in train mode)
    and the epoch's seconds after each epoch.
    """
    torch.manual_seed(seed)
    net = MLP(width)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    n = X.shape[0]
    for _ in range(epochs):
        net.train()
        started = time.perf_counter()
        order = torch.randperm(n)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss_fn(net(X[batch]), y[batch]).backward()
            optimizer.step()
        yield net, time.perf_counter() - started


def _result(
    name: str,
    start: float,
    *,
    fold_epochs: int,
    samples_by_width: dict[int, int],
    best_cv_accuracy: float | None,
    best_params: dict[str, Any] | None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "wall_s": round(time.perf_counter() - start, 3),
        "fold_epochs": fold_epochs,
        "samples_trained": sum(samples_by_width.values()),
        "best_cv_accuracy": best_cv_accuracy,
        "best_params": best_params,
        "samples_by_width": {str(w): n for w, n in samples_by_width.items()},
        **extra,
    }


def _fold_samples(y: np.ndarray, folds: int) -> list[int]:
    """Training-fold sizes of :func:`stratified_folds` on labels ``y``."""
    return [len(train) for train, _ in stratified_folds(folds).split(np.zeros(len(y)), y)]


def _samples_by_width(grid: dict[str, list[Any]], y: np.ndarray, folds: int, epochs: int) -> dict[int, int]:
    per_cell = sum(_fold_samples(y, folds)) * epochs
    return {w: per_cell * len(grid["weight_decay"]) for w in grid["width"]}


# ------------------------------------------------------------------------ d2l


def run_d2l(
    grid: dict[str, list[Any]], epochs: int, folds: int, train_size: int | None, root: str
) -> dict[str, Any]:
    """The hand-written Optuna + StratifiedKFold + D2L ``DataLoader`` loop over the grid."""
    start = time.perf_counter()
    import optuna
    import torchvision
    from torch.utils.data import DataLoader, Subset
    from torchvision.transforms import ToTensor

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dataset = torchvision.datasets.FashionMNIST(root, train=True, transform=ToTensor())
    labels = dataset.targets.numpy()
    chosen = subsample_indices(labels, train_size)
    splits = list(stratified_folds(folds).split(np.zeros(len(chosen)), labels[chosen]))
    fold_scores: dict[int, list[float]] = {}

    def train(train_set: Any, width: int, weight_decay: float) -> nn.Module:
        train_iter = DataLoader(train_set, BATCH_SIZE, shuffle=True)
        net = MLP(width)
        loss_fn = nn.CrossEntropyLoss()
        optimizer = torch.optim.SGD(net.parameters(), lr=LR, weight_decay=weight_decay)
        for _ in range(epochs):
            net.train()
            for x, y in train_iter:
                optimizer.zero_grad()
                loss_fn(net(x), y).backward()
                optimizer.step()
        return net

    def accuracy(net: nn.Module, data: Any) -> float:
        net.eval()
        correct = 0
        with torch.no_grad():
            for x, y in DataLoader(data, BATCH_SIZE, shuffle=False):
                correct += int((net(x).argmax(dim=1) == y).sum())
        return correct / len(data)

    def train_fold(width: int, weight_decay: float, fold: int) -> float:
        train_idx, val_idx = splits[fold]
        torch.manual_seed(SEED + fold)
        net = train(Subset(dataset, chosen[train_idx].tolist()), width, weight_decay)
        return accuracy(net, Subset(dataset, chosen[val_idx].tolist()))

    def objective(trial: optuna.Trial) -> float:
        width = trial.suggest_categorical("width", grid["width"])
        weight_decay = trial.suggest_categorical("weight_decay", grid["weight_decay"])
        scores = [train_fold(width, weight_decay, fold) for fold in range(folds)]
        fold_scores[trial.number] = scores
        print(
            f"d2l trial {trial.number}: width={width} weight_decay={weight_decay:g} "
            f"cv={np.mean(scores):.4f} at {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        return float(np.mean(scores))

    cells = grid_cells(grid)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.GridSampler(grid, seed=SEED))
    study.optimize(objective, n_trials=len(cells))
    best = study.best_trial
    # What GridSearchCV's refit and modelsel do after the search: retrain the best
    # configuration on the whole training sample, then score the test split once.
    torch.manual_seed(SEED)
    final = train(Subset(dataset, chosen.tolist()), best.params["width"], best.params["weight_decay"])
    test_set = torchvision.datasets.FashionMNIST(root, train=False, transform=ToTensor())
    test_accuracy = accuracy(final, test_set)
    return _result(
        "d2l",
        start,
        fold_epochs=len(cells) * folds * epochs,
        samples_by_width=_samples_by_width(grid, labels[chosen], folds, epochs),
        best_cv_accuracy=round(study.best_value, 5),
        best_params=best.params,
        best_cv_std=round(float(np.std(fold_scores[best.number])), 5),
        test_accuracy=round(test_accuracy, 5),
        train_size=len(chosen),
    )


# --------------------------------------------------------------------- skorch


def run_skorch(
    grid: dict[str, list[Any]], epochs: int, folds: int, train_size: int | None, root: str
) -> dict[str, Any]:
    """``skorch.NeuralNetClassifier`` under ``GridSearchCV`` over the grid."""
    start = time.perf_counter()
    from sklearn.model_selection import GridSearchCV
    from skorch import NeuralNetClassifier

    x, y = load_arrays(root, train_size)
    torch.manual_seed(SEED)
    net = NeuralNetClassifier(
        module=MLP,
        module__width=grid["width"][0],
        criterion=nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD,
        lr=LR,
        batch_size=BATCH_SIZE,
        max_epochs=epochs,
        train_split=None,
        iterator_train__shuffle=True,
        device="cpu",
        verbose=0,
    )
    search = GridSearchCV(
        net,
        param_grid={"module__width": grid["width"], "optimizer__weight_decay": grid["weight_decay"]},
        cv=stratified_folds(folds),
        scoring="accuracy",
        refit=True,  # sklearn's default: retrain the best configuration on all of x, as modelsel does
        n_jobs=1,
    )
    search.fit(x, y)
    x_test, y_test = load_test_arrays(root)
    return _grid_search_result(
        "skorch", start, search, grid, y, folds, epochs, width_key="module__width", test=(x_test, y_test)
    )


# -------------------------------------------------------------------- sklearn


def run_sklearn(
    grid: dict[str, list[Any]], epochs: int, folds: int, train_size: int | None, root: str
) -> dict[str, Any]:
    """``MLPClassifier(solver="sgd")`` under ``GridSearchCV`` over the grid (``alpha`` = weight decay)."""
    start = time.perf_counter()
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV
    from sklearn.neural_network import MLPClassifier

    x, y = load_arrays(root, train_size)
    mlp = MLPClassifier(
        hidden_layer_sizes=(grid["width"][0],),
        solver="sgd",
        learning_rate_init=LR,
        batch_size=BATCH_SIZE,
        max_iter=epochs,
        alpha=grid["weight_decay"][0],
        momentum=0.0,
        nesterovs_momentum=False,
        shuffle=True,
        random_state=SEED,
    )
    search = GridSearchCV(
        mlp,
        param_grid={
            "hidden_layer_sizes": [(w,) for w in grid["width"]],
            "alpha": grid["weight_decay"],
        },
        cv=stratified_folds(folds),
        scoring="accuracy",
        refit=True,  # sklearn's default: retrain the best configuration on all of x, as modelsel does
        n_jobs=1,
    )
    with warnings.catch_warnings():
        # max_iter is the epoch budget here, not a convergence criterion.
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(x, y)
    x_test, y_test = load_test_arrays(root)
    return _grid_search_result(
        "sklearn", start, search, grid, y, folds, epochs, width_key="hidden_layer_sizes", test=(x_test, y_test)
    )


def _grid_search_result(
    name: str,
    start: float,
    search: Any,
    grid: dict[str, list[Any]],
    y: np.ndarray,
    folds: int,
    epochs: int,
    *,
    width_key: str,
    test: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """The result of a refitted ``GridSearchCV``, with the test accuracy of its best estimator."""
    test_accuracy = float(search.score(*test))
    best = search.best_params_
    width = best[width_key]
    params = {
        "width": int(width[0] if isinstance(width, tuple) else width),
        "weight_decay": float(best.get("optimizer__weight_decay", best.get("alpha", 0.0))),
    }
    return _result(
        name,
        start,
        fold_epochs=len(grid_cells(grid)) * folds * epochs,
        samples_by_width=_samples_by_width(grid, y, folds, epochs),
        best_cv_accuracy=round(float(search.best_score_), 5),
        best_params=params,
        best_cv_std=round(float(search.cv_results_["std_test_score"][search.best_index_]), 5),
        test_accuracy=round(test_accuracy, 5),
        train_size=len(y),
    )


# ----------------------------------------------------------------------- gemm


def gemm_step_seconds(width: int, batch: int = BATCH_SIZE, repeats: int = 15, min_time: float = 0.1) -> float:
    """Best-of-``repeats`` seconds of the GEMMs of one training step of the 784-``width``-10 MLP.

    The five ``torch.mm`` calls use the layouts autograd uses for ``nn.Linear`` (weights
    stored ``[out, in]``) and write into preallocated outputs, so only GEMM time is measured:
    forward ``X·W1ᵀ`` and ``H·W2ᵀ``, weight gradients ``dOᵀ·H`` and ``dHᵀ·X``, and the
    hidden-activation gradient ``dO·W2``.
    """
    gen = torch.Generator().manual_seed(SEED)
    x = torch.rand(batch, N_INPUTS, generator=gen)
    w1 = torch.randn(width, N_INPUTS, generator=gen)
    w2 = torch.randn(N_CLASSES, width, generator=gen)
    h = torch.rand(batch, width, generator=gen)
    d_out = torch.randn(batch, N_CLASSES, generator=gen)
    out1, out2 = torch.empty(batch, width), torch.empty(batch, N_CLASSES)
    grad_w1, grad_w2, grad_h = (
        torch.empty(width, N_INPUTS),
        torch.empty(N_CLASSES, width),
        torch.empty(batch, width),
    )

    def step() -> None:
        torch.mm(x, w1.t(), out=out1)
        torch.mm(h, w2.t(), out=out2)
        torch.mm(d_out.t(), h, out=grad_w2)
        torch.mm(d_out, w2, out=grad_h)
        torch.mm(grad_h.t(), x, out=grad_w1)

    return _best_time(step, repeats, min_time)


def _best_time(fn: Callable[[], None], repeats: int, min_time: float) -> float:
    """Seconds per call of ``fn``: warm up, size the loop to ``min_time``, keep the best repeat."""
    for _ in range(20):
        fn()
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time / 4:
            break
        calls *= 2
    calls = max(1, int(calls * min_time / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def run_gemm(widths: Sequence[int], repeats: int = 15) -> dict[str, Any]:
    """The GEMM limit of a training step at batch 256 for each width (float32 ``torch.mm``)."""
    start = time.perf_counter()
    per_width: dict[str, dict[str, float]] = {}
    for width in widths:
        seconds = gemm_step_seconds(width, repeats=repeats)
        per_sample = seconds / BATCH_SIZE
        per_width[str(width)] = {
            "gflops": round(flops_per_sample(width) * BATCH_SIZE / seconds / 1e9, 2),
            "step_us": round(seconds * 1e6, 2),
            "seconds_per_sample": per_sample,
            "epoch_s": round(per_sample * EPOCH_SAMPLES, 4),
            "samples_per_s": round(1.0 / per_sample),
        }
    headline = per_width["256"] if "256" in per_width else next(iter(per_width.values()))
    return {
        **_result("gemm", start, fold_epochs=0, samples_by_width={}, best_cv_accuracy=None, best_params=None),
        "threads": torch.get_num_threads(),
        "gflops": headline["gflops"],
        "epoch_s": headline["epoch_s"],
        "samples_per_s": headline["samples_per_s"],
        "per_width": per_width,
    }


# ------------------------------------------------------------------------- CLI

RUNNERS: dict[str, Callable[[dict[str, list[Any]], int, int, int | None, str], dict[str, Any]]] = {
    "d2l": run_d2l,
    "skorch": run_skorch,
    "sklearn": run_sklearn,
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (one subcommand per baseline)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entry", choices=[*RUNNERS, "gemm"], help="which baseline to run")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="small", help="hyperparameter grid")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per fold")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument(
        "--train-size", type=int, default=None, help="stratified subsample of the 60k training split"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--data-root", default=None, help="torchvision root; default $MODELSEL_DATA_ROOT")
    parser.add_argument(
        "--gemm-widths", default="64,256", help="gemm: comma-separated hidden widths to measure"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one baseline and print its JSON line."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.entry == "gemm":
        result = run_gemm([int(w) for w in args.gemm_widths.split(",")])
    else:
        root = data_root(args.data_root)
        if not (Path(root) / "FashionMNIST" / "raw").is_dir():
            print(f"error: no FashionMNIST/raw under {root}; set MODELSEL_DATA_ROOT", file=sys.stderr)
            return 2
        result = RUNNERS[args.entry](GRIDS[args.grid], args.epochs, args.folds, args.train_size, root)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
