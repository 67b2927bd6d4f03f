"""Training throughput of modelsel's engines against the machine's GEMM limit.

The grid entries of ``run_all.py`` time whole processes: imports, data decoding,
validation, retraining, testing and the report are all in their wall time. This probe
times only the training loop, the way the issue's reference table measured plain
PyTorch ("two such processes with 1 thread each, together"), so the engine's own
efficiency can be read as a fraction of the GEMM limit::

    python benchmarks/throughput_probe.py [--epochs 3] [--width 256] [--batch 256]
        [--rounds 2] [--engines stacked,sequential,pytorch] [--data-root DIR] [--json]

``--engines`` takes modelsel's engines (``stacked``, ``sequential``) and ``pytorch``: the
loop the issue's table measured, written by hand (``baselines.in_memory_epochs``: an
``nn.Sequential``, ``torch.optim.SGD``, batches sliced from a fresh ``randperm`` of
tensors in memory), training the same 5 fold models one after another at batch 256. It
shows what this machine gives the usual way, next to the GEMM limit and modelsel's engines.

For each engine it runs, interleaved over ``--rounds`` rounds:

``1 process x 2 threads``
    one child process, torch with 2 intra-op threads (``modelsel --workers 1``);
``2 processes x 1 thread``
    two child processes at once, 1 thread each (``modelsel --workers 2``).

Each child loads the Fashion-MNIST training split, builds the benchmark's 5 stratified
folds and trains the D2L MLP (784-``width``-10, SGD lr 0.1) on all 5 fold training sets
(48,000 images each) with ``train_models``, without validation data, after a short
untimed warm-up. The children of one measurement start together: each says it is ready,
and the parent starts them all once every one has. The
figure is training samples per second summed over the children, from the engines' own
epoch times (``History.fit_seconds``: the epochs' steps only; the final pass over the
training data that ``train_models`` always makes is left out) over the slowest child.

The GEMM limit (``baselines.py``'s ``gemm_step_seconds``: the five float32 ``torch.mm``
of one training step) is measured at the start and at the end, each time both ways the
rows train: at 2 threads in the parent, and in two 1-thread child processes at once (their
rates summed). The fastest of the four is the limit. (The grid section of ``run_all.py``
uses the 2-thread figure alone. On a machine whose two threads are slowed when they work
in one process, the 2-thread figure alone understates what the cores can do and so
overstates every fraction.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from baselines import PLAIN_LOOP, data_root, flops_per_sample, gemm_step_seconds, in_memory_epochs

from modelsel.cv import fold_indices, make_fold_data
from modelsel.data import load_dataset
from modelsel.engines import train_models
from modelsel.spec import CVSpec, FashionMNISTSpec, ModelSpec, TrainingSpec
from modelsel.training import FoldData, torch_threads

#: ``--engine`` of a child that times the GEMMs of a step instead of training (the limit).
GEMM_CHILD = "gemm"

FOLDS = 5
CONFIGS: dict[str, tuple[int, int]] = {  # name: (processes, threads per process)
    "1 process x 2 threads": (1, 2),
    "2 processes x 1 thread": (2, 1),
}


def run_child(args: argparse.Namespace) -> None:
    """Train the 5 fold models once when the parent says go; print one JSON line.

    With ``--engine gemm``, time the GEMMs of one training step instead (best of
    ``gemm_step_seconds``' repeats): ``samples`` is one batch and ``train_s`` its time.
    """
    torch.set_num_threads(args.threads)
    if args.engine == GEMM_CHILD:
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.time()
        seconds = gemm_step_seconds(args.width, batch=args.batch)
        print(json.dumps({"start": started, "end": time.time(), "train_s": seconds, "samples": args.batch}), flush=True)
        return

    dataset = load_dataset(FashionMNISTSpec(name="fashion-mnist", root=data_root(args.data_root)), seed=0)
    cv_folds = make_fold_data(dataset, fold_indices(dataset, CVSpec(folds=FOLDS), seed=0), device=torch.device("cpu"))
    # No validation pass; training rows from the dataset's tensors, as a study's folds take them.
    folds = [FoldData(source=f.source) for f in cv_folds]
    model = ModelSpec(depth=1, width=args.width)

    def train_seconds(members: list[FoldData], epochs: int, seed: int) -> float:
        """Train one model per member with the child's engine; the epochs' training seconds."""
        if args.engine == PLAIN_LOOP:  # the models one after another, as a hand-written script trains them
            return sum(
                seconds
                for index, f in enumerate(members)
                for _, seconds in in_memory_epochs(
                    f.X_train, f.y_train, width=args.width, seed=seed * FOLDS + index, epochs=epochs,
                    batch_size=args.batch,
                )
            )  # fmt: skip
        training = TrainingSpec(optimizer="sgd", lr=0.1, batch_size=args.batch, epochs=epochs, engine=args.engine)
        trained = train_models(
            members, model_spec=model, training=training, task="classification", n_outputs=10, seed=seed
        )
        return sum(m.history.fit_seconds for m in trained)

    train_seconds([FoldData(X_train=f.X_train[:4096], y_train=f.y_train[:4096]) for f in folds], 1, 0)  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()  # the parent's go
    started = time.time()
    train_s = train_seconds(folds, args.epochs, args.seed)
    ended = time.time()
    samples = sum(f.n_train for f in folds) * args.epochs
    print(
        json.dumps(
            {"start": started, "end": ended, "train_s": train_s, "samples": samples},
        ),
        flush=True,
    )


def measure(args: argparse.Namespace, engine: str, processes: int, threads: int) -> dict[str, Any]:
    """Run ``processes`` children of ``threads`` threads at once; their summed throughput."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    children = []
    for index in range(processes):
        command = [
            sys.executable, str(Path(__file__).resolve()), "--child",
            "--engine", engine, "--threads", str(threads), "--epochs", str(args.epochs),
            "--width", str(args.width), "--batch", str(args.batch),
            "--seed", str(index), "--data-root", data_root(args.data_root),
        ]  # fmt: skip
        children.append(
            subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        )
    try:
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                _, err = child.communicate()
                raise RuntimeError(f"child failed before training (exit {child.returncode}): {err.strip()[-300:]}")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, err = child.communicate()
            if child.returncode != 0:
                raise RuntimeError(f"child failed (exit {child.returncode}): {err.strip()[-300:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:  # a failed measurement leaves no child behind
            if child.poll() is None:
                child.kill()
                child.wait()
    samples = sum(r["samples"] for r in results)
    slowest_train_s = max(r["train_s"] for r in results)
    span_s = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "samples": samples,
        "train_s": slowest_train_s,
        "samples_per_s": samples / slowest_train_s,
        "summed_samples_per_s": sum(r["samples"] / r["train_s"] for r in results),
        "span_s": span_s,
        "span_samples_per_s": samples / span_s,
    }


def gemm_limit(args: argparse.Namespace) -> dict[str, Any]:
    """Samples per second of the GEMMs alone: the faster of 2 threads in this process and
    two 1-thread processes at once (their rates summed), as the two ways the rows train."""
    with torch_threads(2):
        seconds = gemm_step_seconds(args.width, batch=args.batch)
    one_process = args.batch / seconds
    two_processes = measure(args, GEMM_CHILD, 2, 1)["summed_samples_per_s"]
    rate = max(one_process, two_processes)
    return {
        "samples_per_s": rate,
        "gflops": flops_per_sample(args.width) * rate / 1e9,
        "one_process_2_threads": one_process,
        "two_processes_1_thread": two_processes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", default="stacked,sequential,pytorch")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", action="store_true", help="also print one JSON line with every figure")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="stacked", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    gemm_start = gemm_limit(args)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {e: {c: [] for c in CONFIGS} for e in engines}
    for _ in range(args.rounds):
        for engine in engines:
            for config, (processes, threads) in CONFIGS.items():
                result = measure(args, engine, processes, threads)
                runs[engine][config].append(result)
                print(
                    f"{engine:10s} {config:24s} {result['samples_per_s']:>9,.0f} samples/s "
                    f"(training {result['train_s']:.2f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    gemm_end = gemm_limit(args)
    limit = max(gemm_start["samples_per_s"], gemm_end["samples_per_s"])
    table: dict[str, dict[str, dict[str, float]]] = {}
    for engine, configs in runs.items():
        table[engine] = {}
        for config, results in configs.items():
            rate = statistics.median(r["samples_per_s"] for r in results)
            table[engine][config] = {
                "samples_per_s": rate,
                "gemm_fraction": rate / limit,
                "rounds": [round(r["samples_per_s"]) for r in results],
                "span_samples_per_s": statistics.median(r["span_samples_per_s"] for r in results),
            }
    for engine, configs in table.items():
        for config, figures in configs.items():
            print(
                f"{engine:10s} {config:24s} {figures['samples_per_s']:>9,.0f} samples/s = "
                f"{figures['gemm_fraction']:.1%} of the GEMM limit ({limit:,.0f})"
            )
    if args.json:
        print(
            json.dumps(
                {
                    "width": args.width,
                    "batch": args.batch,
                    "epochs": args.epochs,
                    "rounds": args.rounds,
                    "gemm": {"start": gemm_start, "end": gemm_end, "limit_samples_per_s": limit},
                    "engines": table,
                }
            )
        )


if __name__ == "__main__":
    main()
