"""Engine measurements (owned by the engine work, not part of ``run_all.py``).

Times ``train_models`` engines side by side in one process, interleaved and repeated,
and prints medians, so ratios stay meaningful on a shared machine::

    python benchmarks/engine_probe.py [--case NAME ...] [--repeats 5] [--threads 1]
        [--baseline PATH_TO_OLD_engines.py] [--device cuda] [--json] [--profile]
        [--members 40] [--engines sequential,stacked,stacked+bf16,stacked+tf32]

Each case trains k fold models for a few epochs; the figure is training samples per
second summed over members (member epochs x train size / wall seconds), and the CPU
time per step (process time, less sensitive to other processes than wall time).

``--members N`` trains N models instead of the k fold models (the folds repeated), as
when several trials of a sweep stack with their folds. ``stacked-eager`` is the stacked
engine with every step launched eagerly (no CUDA graph; the same as ``stacked`` on the
CPU); ``stacked-unfused`` keeps plain SGD's separate update pass on the CPU instead of
the step inside the backward pass. An engine name may carry a
precision suffix: ``+bf16`` runs it under ``torch.autocast`` with bfloat16, ``+tf32``
lets float32 matrix products use TF32 (``torch.set_float32_matmul_precision("high")``).
Each engine's mean final validation accuracy is printed beside its speed, so a faster
precision shows what it costs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from baselines import data_root

from modelsel.cv import fold_indices, make_fold_data
from modelsel.data import load_dataset
from modelsel.engines import train_models
from modelsel.spec import CVSpec, DigitsSpec, FashionMNISTSpec, ModelSpec, TrainingSpec
from modelsel.training import FoldData


@dataclass
class Case:
    dataset: str
    model: ModelSpec
    training: TrainingSpec
    folds: int = 5


N_OUTPUTS = 10  # Fashion-MNIST classes

def _synthetic(n: int, d: int, classes: int, folds: int) -> list[FoldData]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(folds):
        m = n + (i % 2)
        X = torch.randn(m, d, generator=g)
        y = torch.randint(0, classes, (m,), generator=g)
        out.append(FoldData(X, y, X[: m // 4], y[: m // 4]))
    return out


CASES: dict[str, Case] = {
    "digits-q": Case(
        "digits",
        ModelSpec(depth=2, width=64, dropout=0.2),
        TrainingSpec(optimizer="adam", lr=1e-3, batch_size=64, epochs=5, weight_decay=1e-4),
    ),
    "digits-q-nodrop": Case(
        "digits",
        ModelSpec(depth=2, width=64),
        TrainingSpec(optimizer="adam", lr=1e-3, batch_size=64, epochs=5),
    ),
    "digits-wide": Case(
        "digits",
        ModelSpec(depth=1, width=256, dropout=0.2),
        TrainingSpec(optimizer="adam", lr=1e-3, batch_size=64, epochs=5, weight_decay=1e-4),
    ),
}

for _batch in (32, 64, 128, 256):
    CASES[f"d2l-b{_batch}"] = Case(
        "fashion",
        ModelSpec(depth=1, width=256),
        TrainingSpec(optimizer="sgd", lr=0.1, batch_size=_batch, epochs=1),
    )


def _folds(case: Case, device: torch.device) -> list[FoldData]:
    """The case's folds on ``device``; a dataset's as a study makes them (``make_fold_data``
    on the device: training splits as rows of the dataset's tensors)."""
    if case.dataset == "fashion":
        ds = load_dataset(FashionMNISTSpec(name="fashion-mnist", root=data_root()), seed=0)
    elif case.dataset == "digits":
        ds = load_dataset(DigitsSpec(name="digits"), seed=0)
    else:
        n, d = (int(v) for v in case.dataset.split("x"))
        return [
            FoldData(*(t.to(device) if t is not None else None for t in (f.X_train, f.y_train, f.X_val, f.y_val)))
            for f in _synthetic(n, d, 10, case.folds)
        ]
    return make_fold_data(ds, fold_indices(ds, CVSpec(folds=case.folds), seed=0), device=device)


def _load_baseline(path: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location("baseline_training", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_training"] = module
    spec.loader.exec_module(module)
    return module.train_models  # type: ignore[no-any-return]


def measure(
    case: Case,
    folds: list[FoldData],
    engines: dict[str, Callable[..., Any]],
    repeats: int,
    device: torch.device,
    warmup: int = 0,
) -> dict[str, dict[str, float]]:
    samples = sum(f.X_train.shape[0] for f in folds) * case.training.epochs
    steps = sum(-(-f.X_train.shape[0] // case.training.batch_size) for f in folds) * case.training.epochs
    wall: dict[str, list[float]] = {k: [] for k in engines}
    cpu: dict[str, list[float]] = {k: [] for k in engines}
    accuracy: dict[str, float] = {}
    for _ in range(warmup):  # untimed: CUDA context, cuBLAS handles, allocator pools
        for run in engines.values():
            run(case.training, folds)
    for _ in range(repeats):
        for name, run in engines.items():
            t0, c0 = time.perf_counter(), time.process_time()
            trained = run(case.training, folds)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            accuracy[name] = statistics.fmean(m.history.val_metric[-1] for m in trained)
    out = {}
    for name in engines:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        out[name] = {
            "samples_per_s": samples / w,
            "wall_s": w,
            "cpu_ms_per_step": c / steps * 1e3,
            "cpu_samples_per_s": samples / c,
            "val_accuracy": accuracy[name],
        }
    return out


#: Operators counted as GEMM kernels, and as the minibatch gather, in ``--profile``.
GEMM_OPS = frozenset({"aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm"})
GATHER_OPS = frozenset({"aten::index_select", "aten::index"})


def profile_shares(run: Callable[[], Any], device: torch.device, top: int = 8) -> dict[str, Any]:
    """Self time of one run by operator group (GEMM, gather, other) and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, float(getattr(e, attr))) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    gemm = sum(t for k, t in events if k in GEMM_OPS)
    gather = sum(t for k, t in events if k in GATHER_OPS)
    ranked = sorted(events, key=lambda kt: -kt[1])[:top]
    return {
        "gemm": gemm / total,
        "gather": gather / total,
        "other": 1 - (gemm + gather) / total,
        "top": [(k, t / total) for k, t in ranked],
    }


def _run_engine(engine: str, case: Case, device: torch.device, training: TrainingSpec, folds: list[FoldData]) -> Any:
    """Train ``folds`` with ``engine`` (``sequential``, ``stacked``, ``stacked-eager``: stacked
    without its CUDA graph, or ``stacked-unfused``: stacked with a separate SGD update pass),
    optionally with ``+bf16``/``+tf32``."""
    name, _, precision = engine.partition("+")
    with contextlib.ExitStack() as stack:
        if precision == "bf16":
            # One autocast region spans the whole run, so its cache of casted weights must be
            # off: with it on, the forward would keep using the first step's bf16 weights.
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False))
        elif precision == "tf32":
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")
            stack.callback(torch.set_float32_matmul_precision, previous)
        elif precision:
            raise SystemExit(f"unknown precision suffix {precision!r} in engine {engine!r}: use +bf16 or +tf32")
        return train_models(
            folds,
            model_spec=case.model,
            training=training.model_copy(update={"engine": name.removesuffix("-eager").removesuffix("-unfused")}),
            task="classification",
            n_outputs=N_OUTPUTS,
            seed=0,
            device=device,
            cuda_graph=name != "stacked-eager",
            fused_sgd=name != "stacked-unfused",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", action="append", choices=sorted(CASES), default=None)
    parser.add_argument("--synthetic", action="append", default=[], help="NxD:width:depth:batch:optimizer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--baseline", default=None, help="an older engines.py (training.py before it) to time beside"
    )
    parser.add_argument("--engines", default="sequential,stacked")
    parser.add_argument("--json", action="store_true", help="also print one JSON line with every figure")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the folds and models live there)")
    parser.add_argument("--profile", action="store_true", help="also break each engine's time down by operator")
    parser.add_argument("--members", type=int, default=None, help="models per run (default: the k folds)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per engine (default 1 on CUDA, else 0)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cases = {name: CASES[name] for name in (args.case or [])}
    for text in args.synthetic:
        shape, width, depth, batch, opt = text.split(":")
        cases[f"syn-{text}"] = Case(
            shape,
            ModelSpec(depth=int(depth), width=int(width)),
            TrainingSpec(optimizer=opt, lr=1e-3, batch_size=int(batch), epochs=2),
        )
    baseline = _load_baseline(args.baseline) if args.baseline else None
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for name, case in cases.items():
        engines: dict[str, Callable[[TrainingSpec, list[FoldData]], Any]] = {}
        if baseline is not None:
            engines["baseline"] = lambda t, f, case=case: baseline(
                f, model_spec=case.model, training=t, task="classification", n_outputs=N_OUTPUTS, seed=0
            )
        for engine in args.engines.split(","):
            engines[engine] = functools.partial(_run_engine, engine, case, device)
        folds = _folds(case, device)
        if args.members is not None:
            folds = [folds[i % len(folds)] for i in range(args.members)]
        warmup = args.warmup if args.warmup is not None else int(device.type == "cuda")
        result = measure(case, folds, engines, args.repeats, device, warmup=warmup)
        figures[name] = result
        if args.profile:
            for engine, run in engines.items():
                shares = profile_shares(functools.partial(run, case.training, folds), device)
                result[engine]["profile"] = shares  # type: ignore[assignment]
                top = ", ".join(f"{k.removeprefix('aten::')} {v:.0%}" for k, v in shares["top"])
                print(
                    f"{name:28s} {engine:11s} GEMM {shares['gemm']:.0%}, gather {shares['gather']:.0%}, "
                    f"other {shares['other']:.0%}; top: {top}",
                    flush=True,
                )
        ref = next(iter(result.values()))
        for engine, r in result.items():
            print(
                f"{name:28s} {engine:11s} {r['samples_per_s']:10.0f} samples/s  wall {r['wall_s']:7.3f} s  "
                f"cpu {r['cpu_ms_per_step']:7.3f} ms/step  "
                f"cpu-ratio {ref['cpu_ms_per_step'] / r['cpu_ms_per_step']:.2f}x "
                f"wall-ratio {ref['wall_s'] / r['wall_s']:.2f}x  val acc {r['val_accuracy']:.4f}",
                flush=True,
            )
    if args.json:
        import json

        print(
            json.dumps(
                {
                    "name": "engines",
                    "threads": args.threads,
                    "repeats": args.repeats,
                    "device": str(device),
                    "cases": figures,
                }
            )
        )


if __name__ == "__main__":
    main()
