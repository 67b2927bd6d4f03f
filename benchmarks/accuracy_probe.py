"""Is modelsel's training as accurate as the plain PyTorch loop? (an accuracy check, not a timing)

One benchmark run gives one draw of each way's accuracy, and with SGD at lr 0.1 a single
model's validation accuracy after 5 epochs moves by about 0.015 from seed to seed. This
probe trains the D2L MLP (784-256-10, ReLU, SGD lr 0.1, batch 256, 5 epochs) on fold 0 of
the benchmark's ``StratifiedKFold(5, shuffle=True, random_state=0)`` of Fashion-MNIST many
times, each with its own seed, three ways:

- ``pytorch``: the D2L loop on tensors in memory (``nn.Sequential``, ``torch.optim.SGD``,
  a fresh ``randperm`` per epoch, batches sliced from it). It is the benchmark's D2L loop
  without its ``DataLoader``: same pixels (uint8 / 255), same model, same updates;
- ``sequential`` and ``stacked``: ``modelsel.engines.train_models`` with that engine, the
  fold given once per seed (each member gets its own initialisation and shuffles).

It prints, per way, the validation accuracy after each epoch as mean ± standard error over
the seeds, and each modelsel engine's difference from ``pytorch`` at the last epoch::

    python benchmarks/accuracy_probe.py [--seeds 20] [--epochs 5] [--train-size N] [--threads T] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # the benchmark's data loading, folds and MLP

from modelsel.engines import train_models
from modelsel.spec import ModelSpec, TrainingSpec
from modelsel.training import FoldData

WAYS = ("pytorch", "sequential", "stacked")


def fold_zero(root: str, train_size: int | None = None) -> FoldData:
    """Fold 0 of the benchmark's stratified 5-fold split of the training images (all 60k by default)."""
    x, y = baselines.load_arrays(root, train_size)
    train, val = next(baselines.stratified_folds(5).split(np.zeros(len(y)), y))
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    return FoldData(X[train].contiguous(), Y[train], X[val].contiguous(), Y[val])


def _accuracy(net: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(X).argmax(dim=1) == y).double().mean())


def train_pytorch(fold: FoldData, *, seed: int, epochs: int, width: int) -> list[float]:
    """The D2L loop on in-memory tensors; validation accuracy after each epoch."""
    assert fold.X_val is not None and fold.y_val is not None
    accuracies = []
    for net, _ in baselines.in_memory_epochs(fold.X_train, fold.y_train, width=width, seed=seed, epochs=epochs):
        net.eval()
        accuracies.append(_accuracy(net, fold.X_val, fold.y_val))
    return accuracies


def train_modelsel(fold: FoldData, *, engine: str, seeds: int, epochs: int, width: int) -> list[list[float]]:
    """``train_models`` on ``seeds`` copies of the fold; each member's validation curve."""
    training = TrainingSpec(
        optimizer="sgd", lr=baselines.LR, batch_size=baselines.BATCH_SIZE, epochs=epochs, engine=engine
    )
    members = train_models(
        [fold] * seeds,
        model_spec=ModelSpec(depth=1, width=width),
        training=training,
        task="classification",
        n_outputs=baselines.N_CLASSES,
        seed=0,
    )
    return [list(m.history.val_metric) for m in members]


def summarize(curves: list[list[float]]) -> dict[str, Any]:
    """Per-epoch mean and standard error over seeds."""
    by_epoch = list(zip(*curves, strict=True))
    return {
        "seeds": len(curves),
        "mean": [statistics.fmean(v) for v in by_epoch],
        "se": [statistics.stdev(v) / math.sqrt(len(v)) for v in by_epoch],
        "sd_last": statistics.stdev(by_epoch[-1]),
        "last": list(by_epoch[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--train-size", type=int, default=None, help="default: all 60k training images")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--data-root", default=os.environ.get("MODELSEL_DATA_ROOT", "/work/shared/data"))
    parser.add_argument("--json", action="store_true", help="also print one JSON line with every figure")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fold = fold_zero(args.data_root, args.train_size)
    results: dict[str, dict[str, Any]] = {}
    for way in WAYS:
        started = time.perf_counter()
        if way == "pytorch":
            curves = [
                train_pytorch(fold, seed=seed, epochs=args.epochs, width=args.width) for seed in range(args.seeds)
            ]
        else:
            curves = train_modelsel(fold, engine=way, seeds=args.seeds, epochs=args.epochs, width=args.width)
        results[way] = {**summarize(curves), "wall_s": round(time.perf_counter() - started, 1)}
        figures = results[way]
        epochs = "  ".join(f"{m:.4f}±{s:.4f}" for m, s in zip(figures["mean"], figures["se"], strict=True))
        print(f"{way:>10}: {epochs}  (sd of one model at the end {figures['sd_last']:.4f})", flush=True)
    reference = results["pytorch"]
    for way in WAYS[1:]:
        diff = results[way]["mean"][-1] - reference["mean"][-1]
        se = math.hypot(results[way]["se"][-1], reference["se"][-1])
        results[way]["diff_last"] = diff
        results[way]["diff_se"] = se
        print(f"{way} - pytorch at epoch {args.epochs}: {diff:+.4f} ± {se:.4f} ({diff / se:+.1f} standard errors)")
    if args.json:
        summary = {
            "seeds": args.seeds,
            "epochs": args.epochs,
            "width": args.width,
            "threads": torch.get_num_threads(),
            "val_size": int(fold.y_val.shape[0]) if fold.y_val is not None else 0,
            "ways": results,
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
