"""Run every benchmark entry as its own process and write ``benchmarks/results.md``.

The one documented command::

    python benchmarks/run_all.py [--quick] [--out benchmarks/results.md]

On Fashion-MNIST from ``$MODELSEL_DATA_ROOT`` it times, side by side and on the same grid
(width ∈ {64, 256} × weight_decay ∈ {0, 1e-4}, 5 stratified folds, 5 epochs, batch 256, SGD
lr 0.1): the hand-written Optuna + StratifiedKFold + D2L ``DataLoader`` loop, skorch under
``GridSearchCV``, ``MLPClassifier`` under ``GridSearchCV``, and modelsel with one worker,
two workers and the stacked-folds engine; then a 30-trial TPE search with and without
median pruning. The machine's GEMM limit is measured first, in the same run.

Each entry is a separate ``subprocess`` whose wall time is measured around the whole
process (interpreter start and imports included). An entry that fails or times out is
recorded as ``failed: <last line of its output>`` in the table; the run goes on. Logs,
the generated specs, the Optuna storages and a ``results.json`` with every raw figure go
to ``benchmarks/out/<timestamp>/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import GRIDS, PLAIN_LOOP, data_root, flops_per_sample  # noqa: E402

#: Entries in the order they run; ``gemm`` first so every fraction uses this run's limit.
GRID_BASELINES = ("d2l", "skorch", "sklearn")
MODELSEL_GRID = ("modelsel-1w", "modelsel-2w", "modelsel-stacked", "modelsel-stacked-2w")
TPE_ENTRIES = (
    "tpe", "tpe-median", "tpe-percentile", "tpe-sha", "tpe-sha4", "tpe-paired", "tpe-paired4", "tpe-paired4-cap"
)  # fmt: skip
#: TPE entries that search until half the unpruned search's fold-epochs are spent
#: (``budget.fold_epochs``), however many trials that takes, instead of ``--tpe-trials`` trials.
TPE_CAPPED = ("tpe-paired4-cap",)
#: The pruner (spec syntax) of each TPE entry.
TPE_PRUNERS: dict[str, Any] = {
    "tpe": "none",
    "tpe-median": "median",
    "tpe-percentile": "percentile",
    "tpe-sha": {"name": "successive_halving", "options": {"min_resource": 1, "reduction_factor": 3}},
    "tpe-sha4": {"name": "successive_halving", "options": {"min_resource": 1, "reduction_factor": 4}},
    "tpe-paired": "fold_paired",
    "tpe-paired4": {"name": "fold_paired", "options": {"min_worse_folds": 4}},
}
TPE_PRUNERS["tpe-paired4-cap"] = TPE_PRUNERS["tpe-paired4"]  # the same pruner, under a fold-epoch cap
ALL_ENTRIES = ("gemm", *MODELSEL_GRID, *GRID_BASELINES, *TPE_ENTRIES, "engines", "throughput", "accuracy")
#: ``engine_probe.py`` cases of the engine section: the D2L MLP at batch 64 and 256.
ENGINE_CASES = ("d2l-b64", "d2l-b256")

LABELS: dict[str, str] = {
    "gemm": "GEMM limit (torch.mm)",
    "d2l": "(1) hand-written Optuna + StratifiedKFold + D2L DataLoader",
    "skorch": "(2) skorch NeuralNetClassifier + GridSearchCV(cv=5)",
    "sklearn": "(3) sklearn MLPClassifier + GridSearchCV(cv=5)",
    "modelsel-1w": "(4) modelsel, 1 worker, one model at a time (engine: sequential)",
    "modelsel-2w": "(5) modelsel, 2 workers (engine: sequential)",
    "modelsel-stacked": "(6) modelsel, stacked folds (engine: stacked, the default), 1 worker",
    "modelsel-stacked-2w": "(7) modelsel, stacked folds, 2 workers",
    "tpe": "TPE, no pruning",
    "tpe-median": "TPE, median pruning",
    "tpe-percentile": "TPE, percentile pruning (the top 25% go on)",
    "tpe-sha": "TPE, successive halving (min 1 epoch, factor 3)",
    "tpe-sha4": "TPE, successive halving (min 1 epoch, factor 4)",
    "tpe-paired": "TPE, fold-paired pruning (worse than the best trial on every fold)",
    "tpe-paired4": "TPE, fold-paired pruning (worse than the best trial on 4 of 5 folds)",
    "tpe-paired4-cap": (
        "TPE, fold-paired pruning (4 of 5 folds), as many trials as half the unpruned search's "
        "fold-epochs allow (budget.fold_epochs)"
    ),
    "engines": "stacked vs sequential engine (engine_probe.py)",
    "throughput": "training-loop throughput, 1 and 2 processes (throughput_probe.py)",
    "accuracy": "seed-to-seed accuracy of one model (accuracy_probe.py)",
}

#: The TPE search space (spec syntax); the grid's fixed values fill in everything else.
TPE_SEARCH: dict[str, dict[str, Any]] = {
    "width": {"type": "int", "low": 32, "high": 512, "log": True},
    "lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
}

#: The issue's targets for modelsel's best grid entry.
TARGET_SPEEDUP_D2L = 8.0
TARGET_SPEEDUP_SKORCH = 2.5
TARGET_SAMPLES_PER_S = 175_000
TARGET_GEMM_FRACTION = 0.78
TARGET_WORKERS_SPEEDUP = 1.15
TARGET_STACKED_SPEEDUP = 1.5
TARGET_PRUNED_FRACTION = 0.5
TARGET_PRUNED_ACC_DELTA = 0.003


@dataclass
class Settings:
    """What one benchmark run does."""

    grid: str
    epochs: int
    folds: int
    train_size: int | None
    tpe_trials: int
    threads: int | None
    root: str
    timeout_s: float
    quiet_wait_s: float
    out_dir: Path
    acc_tol: float
    seed: int = 0
    device: str = "cpu"
    rounds: int = 1


@dataclass
class Outcome:
    """One entry's measured figures (``error`` set when it failed)."""

    key: str
    label: str
    command: list[str]
    process_s: float | None = None
    load_before: float | None = None
    other_cpu_s: float | None = None
    waited_s: float | None = None
    error: str | None = None
    inner_s: float | None = None
    fold_epochs: int | None = None
    samples_by_width: dict[str, int] = field(default_factory=dict)
    best_cv_accuracy: float | None = None
    best_cv_std: float | None = None
    best_params: dict[str, Any] | None = None
    test_accuracy: float | None = None
    trials_complete: int | None = None
    trials_pruned: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.process_s is not None

    @property
    def samples_trained(self) -> int:
        return sum(self.samples_by_width.values())


# ----------------------------------------------------------------- the entries


def modelsel_spec(settings: Settings, key: str) -> dict[str, Any]:
    """The study spec (as a dict) modelsel runs for grid or TPE entry ``key``."""
    grid = GRIDS[settings.grid]
    dataset: dict[str, Any] = {"name": "fashion-mnist", "root": settings.root, "standardize": False}
    if settings.train_size is not None:
        dataset["train_size"] = settings.train_size
    spec: dict[str, Any] = {
        "name": f"bench-{key}",
        "seed": settings.seed,
        "dataset": dataset,
        "model": {"depth": 1, "width": grid["width"][0], "activation": "relu"},
        "training": {
            "epochs": settings.epochs,
            "batch_size": 256,
            "optimizer": "sgd",
            "lr": 0.1,
            "weight_decay": 0.0,
            "device": settings.device,
            "engine": "stacked" if key.startswith("modelsel-stacked") else "sequential",
        },
        "cv": {"folds": settings.folds},
        "objectives": ["val_accuracy"],
    }
    if key in MODELSEL_GRID:
        spec["sweep"] = {"width": grid["width"], "weight_decay": grid["weight_decay"]}
        spec["budget"] = {"n_trials": len(grid["width"]) * len(grid["weight_decay"])}
    else:
        spec["training"]["engine"] = "auto"
        spec["search"] = TPE_SEARCH
        spec["sampler"] = "tpe"
        spec["pruner"] = TPE_PRUNERS[key]
        spec["budget"] = {"n_trials": settings.tpe_trials}
        if key in TPE_CAPPED:
            full = settings.tpe_trials * settings.epochs * settings.folds
            spec["budget"] = {"n_trials": None, "fold_epochs": int(full * TARGET_PRUNED_FRACTION)}
    return spec


def modelsel_executable() -> list[str]:
    """How to start the ``modelsel`` CLI with this interpreter's installation."""
    script = Path(sys.executable).with_name("modelsel")
    if script.exists():
        return [str(script)]
    found = shutil.which("modelsel")
    if found:
        return [found]
    return [sys.executable, "-c", "from modelsel.cli import entry_point; entry_point()"]


def entry_command(settings: Settings, key: str, work: Path | None = None) -> list[str]:
    """The command line of entry ``key`` (modelsel's spec is written to its folder ``work``,
    by default ``<out_dir>/<key>``)."""
    if key == "engines":
        command = [sys.executable, str(HERE / "engine_probe.py"), "--repeats", "3", "--json"]
        for case in ENGINE_CASES:
            command += ["--case", case]
        command += ["--device", settings.device]
        return [*command, "--threads", str(settings.threads or os.cpu_count() or 1)]
    if key == "throughput":
        command = [sys.executable, str(HERE / "throughput_probe.py"), "--json", "--data-root", settings.root]
        return [*command, "--epochs", str(min(settings.epochs, 3))]
    if key == "accuracy":
        command = [sys.executable, str(HERE / "accuracy_probe.py"), "--json", "--data-root", settings.root]
        command += ["--epochs", str(settings.epochs), "--seeds", "20"]
        if settings.train_size is not None:
            command += ["--train-size", str(settings.train_size)]
        return [*command, *(["--threads", str(settings.threads)] if settings.threads else [])]
    if key == "gemm" or key in GRID_BASELINES:
        command = [sys.executable, str(HERE / "baselines.py"), key]
        if key != "gemm":
            command += [
                "--grid",
                settings.grid,
                "--epochs",
                str(settings.epochs),
                "--folds",
                str(settings.folds),
            ]
            command += ["--data-root", settings.root]
            if settings.train_size is not None:
                command += ["--train-size", str(settings.train_size)]
        if settings.threads is not None:
            command += ["--threads", str(settings.threads)]
        return command
    work = work or settings.out_dir / key
    command = [*modelsel_executable(), "study", "run", str(work / "spec.yaml")]
    command += ["--storage", f"sqlite:///{work / 'bench.db'}", "--output", str(work), "--quiet"]
    if key.endswith("-2w"):
        command += ["--workers", "2"]
    return command


# ------------------------------------------------------------------- running


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have used since boot (``/proc/stat``), if readable."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy.
    ticks = [int(v) for v in fields[:8]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, busy_fraction: float = 0.15, window: float = 2.0) -> float:
    """Wait up to ``max_wait`` seconds for the machine's CPUs to be idle; return the seconds waited.

    Quiet means less than ``busy_fraction`` of all CPUs busy over a ``window``-second sample,
    so that an entry does not start while another process (another user's tests, another
    benchmark) is computing on these cores.
    """
    start = time.perf_counter()
    cpus = os.cpu_count() or 1
    while max_wait > 0:
        before = busy_cpu_seconds()
        time.sleep(window)
        after = busy_cpu_seconds()
        if before is None or after is None:
            break
        if (after - before) / (window * cpus) < busy_fraction or time.perf_counter() - start >= max_wait:
            break
    return round(time.perf_counter() - start, 1)


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (and their waited-for descendants)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last_line(*texts: str, limit: int | None = 300) -> str:
    """The last non-empty line of the first text that has one (cut to ``limit`` characters)."""
    for text in texts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1][:limit]
    return "no output"


def run_entry(settings: Settings, key: str, round_number: int = 1) -> Outcome:
    """Run entry ``key`` as one process and collect its figures (a later round of a grid
    entry works in a folder of its own, so that its study starts empty)."""
    work = settings.out_dir / (key if round_number == 1 else f"{key}-round{round_number}")
    command = entry_command(settings, key, work)
    outcome = Outcome(key=key, label=LABELS[key], command=command)
    work.mkdir(parents=True, exist_ok=True)
    runs_modelsel_cli = key in MODELSEL_GRID or key in TPE_ENTRIES
    if runs_modelsel_cli:
        (work / "spec.yaml").write_text(yaml.safe_dump(modelsel_spec(settings, key), sort_keys=False))
    env = {**os.environ, "MODELSEL_DATA_ROOT": settings.root}
    if settings.threads is not None and runs_modelsel_cli:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(settings.threads)
    outcome.waited_s = wait_for_quiet(settings.quiet_wait_s)
    outcome.load_before = round(os.getloadavg()[0], 2)
    waited = f" (waited {outcome.waited_s:.0f} s for idle CPUs)" if outcome.waited_s else ""
    name = entry_name(settings, key, round_number)
    print(f"[{time.strftime('%H:%M:%S')}] {name}{waited}: {shlex.join(command)}", file=sys.stderr, flush=True)
    busy_start, children_start = busy_cpu_seconds(), children_cpu_seconds()
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=settings.timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        outcome.error = f"failed: timeout after {settings.timeout_s:.0f} s"
        for name, data in (("stdout", exc.stdout), ("stderr", exc.stderr)):
            text = data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
            (work / f"{name}.log").write_text(text)
        return outcome
    outcome.process_s = round(time.perf_counter() - start, 3)
    busy_end = busy_cpu_seconds()
    if busy_start is not None and busy_end is not None:
        # Busy CPU time on the machine during the entry that its own process tree did not use.
        own = children_cpu_seconds() - children_start
        outcome.other_cpu_s = round(max(0.0, busy_end - busy_start - own), 1)
    (work / "stdout.log").write_text(proc.stdout)
    (work / "stderr.log").write_text(proc.stderr)
    if proc.returncode != 0:
        outcome.error = f"failed: {_last_line(proc.stderr, proc.stdout)} (exit {proc.returncode})"
        return outcome
    try:
        if key in PROBE_SECTIONS:  # a probe script printing one JSON line of figures
            outcome.extra = json.loads(_last_line(proc.stdout, limit=None))
        elif key == "gemm" or key in GRID_BASELINES:
            _read_baseline(outcome, proc.stdout)
        else:
            _read_modelsel(outcome, settings, work)
    except Exception as exc:  # any unreadable result becomes a table entry
        outcome.error = f"failed: could not read the result: {type(exc).__name__}: {exc}"
    return outcome


def _read_baseline(outcome: Outcome, stdout: str) -> None:
    result = json.loads(_last_line(stdout, limit=None))
    outcome.inner_s = result["wall_s"]
    outcome.fold_epochs = result["fold_epochs"]
    outcome.samples_by_width = {str(k): int(v) for k, v in result["samples_by_width"].items()}
    outcome.best_cv_accuracy = result["best_cv_accuracy"]
    outcome.best_cv_std = result.get("best_cv_std")
    outcome.best_params = result["best_params"]
    outcome.test_accuracy = result.get("test_accuracy")
    outcome.extra = {
        k: v for k, v in result.items() if k not in {"name", "wall_s", "samples_by_width", "best_params"}
    }


def _read_modelsel(outcome: Outcome, settings: Settings, work: Path) -> None:
    """Figures of a modelsel entry, from its Optuna storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{work / 'bench.db'}"
    spec = modelsel_spec(settings, outcome.key)
    names = optuna.get_all_study_names(storage=storage)
    name = spec["name"] if spec["name"] in names else (names[0] if len(names) == 1 else None)
    if name is None:
        raise ValueError(f"no study '{spec['name']}' in {storage} (found {names})")
    study = optuna.load_study(study_name=name, storage=storage)
    tested = study.user_attrs.get("test_result")
    if isinstance(tested, dict) and isinstance(tested.get("test_metric"), (int, float)):
        outcome.test_accuracy = round(float(tested["test_metric"]), 5)
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED))
    complete = [t for t in trials if t.state == state.COMPLETE and t.value is not None]
    outcome.trials_complete = len(complete)
    outcome.trials_pruned = len(trials) - len(complete)
    folds = settings.folds
    default_width = spec["model"]["width"]
    fold_epochs = 0
    by_width: dict[str, int] = {}
    for trial in trials:
        # modelsel reports the fold-mean validation value once per epoch, all folds in step.
        epochs = len(trial.intermediate_values) or (settings.epochs if trial.state == state.COMPLETE else 0)
        fold_epochs += epochs * folds
        n_train = int(trial.user_attrs.get("n_train", settings.train_size or 60_000))
        width = str(int(trial.params.get("width", default_width)))
        # Every sample is in exactly one validation fold, so the training folds hold (k-1)·n in total.
        by_width[width] = by_width.get(width, 0) + n_train * (folds - 1) * epochs
    outcome.fold_epochs = fold_epochs
    outcome.samples_by_width = by_width
    outcome.extra["pruned_after_all_epochs"] = sum(
        1 for t in trials if t.state == state.PRUNED and len(t.intermediate_values) >= settings.epochs
    )
    if outcome.key in MODELSEL_GRID:
        grid = GRIDS[settings.grid]
        ran = [(int(t.params["width"]), float(t.params["weight_decay"])) for t in trials]
        cells = [(int(w), float(wd)) for w in grid["width"] for wd in grid["weight_decay"]]
        outcome.extra["grid_missing"] = [c for c in cells if c not in ran]
        outcome.extra["grid_repeated"] = sorted({c for c in ran if ran.count(c) > 1})
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    if starts and ends:
        outcome.inner_s = round((max(ends) - min(starts)).total_seconds(), 3)
    if complete:
        best = max(complete, key=lambda t: float(t.value or 0.0))
        outcome.best_cv_accuracy = round(float(best.value or 0.0), 5)
        outcome.best_params = dict(best.params)
        std = best.user_attrs.get("val_metric_std", best.user_attrs.get("cv_std"))
        outcome.best_cv_std = float(std) if isinstance(std, (int, float)) else None


def merge_gemm(first: Outcome, second: Outcome) -> Outcome:
    """One GEMM-limit outcome from two measurements: per width, the faster one."""
    if not second.ok:
        return first
    if not first.ok:
        return second
    runs = [first.extra.get("per_width", {}), second.extra.get("per_width", {})]
    per_width = {
        width: min((run[width] for run in runs if width in run), key=lambda v: v["seconds_per_sample"])
        for width in {*runs[0], *runs[1]}
    }
    headline = per_width.get("256") or next(iter(per_width.values()))
    extra = {**first.extra, "per_width": dict(sorted(per_width.items(), key=lambda kv: int(kv[0])))}
    extra.update(
        gflops=headline["gflops"], epoch_s=headline["epoch_s"], samples_per_s=headline["samples_per_s"]
    )
    extra["gflops_runs"] = [{w: v["gflops"] for w, v in run.items()} for run in runs]
    others = [o.other_cpu_s for o in (first, second) if o.other_cpu_s is not None]
    return Outcome(
        key=first.key,
        label=first.label,
        command=first.command,
        process_s=first.process_s,
        load_before=first.load_before,
        other_cpu_s=max(others) if others else None,
        waited_s=first.waited_s,
        inner_s=first.inner_s,
        extra=extra,
    )


def merge_rounds(rounds: Sequence[Outcome]) -> Outcome:
    """One outcome of a grid entry from its rounds (``--rounds``): the median wall and
    in-process times, the most contention seen, and the first successful round's figures
    (the runs are deterministic; a round whose accuracy differs is noted)."""
    ok = [o for o in rounds if o.ok]
    if not ok:
        return rounds[0]
    merged = Outcome(**{**asdict(ok[0]), "extra": dict(ok[0].extra)})
    merged.process_s = statistics.median(o.process_s for o in ok if o.process_s is not None)
    inner = [o.inner_s for o in ok if o.inner_s is not None]
    merged.inner_s = statistics.median(inner) if inner else None
    others = [o.other_cpu_s for o in ok if o.other_cpu_s is not None]
    merged.other_cpu_s = max(others) if others else None
    merged.extra["round_process_s"] = [o.process_s for o in rounds]
    accuracies = {o.best_cv_accuracy for o in ok}
    if len(accuracies) > 1:
        merged.extra["round_accuracies"] = [o.best_cv_accuracy for o in ok]
    failed = [o.error for o in rounds if not o.ok]
    if failed:
        merged.extra["round_errors"] = failed
    return merged


def is_grid_entry(key: str) -> bool:
    """Whether ``key`` is one of the ways timed on the grid (the entries ``--rounds`` repeats)."""
    return key in MODELSEL_GRID or key in GRID_BASELINES


def entry_name(settings: Settings, key: str, round_number: int) -> str:
    """``key``, with its round when grid entries run in several rounds (progress lines)."""
    return f"{key} (round {round_number})" if settings.rounds > 1 and is_grid_entry(key) else key


def run_order(selected: Sequence[str], rounds: int) -> list[tuple[str, int]]:
    """``(entry, round)`` in the order they run: with several rounds, the grid entries run
    once per round right after one another, every other round in reverse order, so that a
    machine that drifts during the run weighs on all of them alike."""
    grid = [k for k in selected if is_grid_entry(k)]
    order: list[tuple[str, int]] = []
    for key in selected:
        if key in grid:
            if key == grid[0]:
                for round_number in range(1, rounds + 1):
                    keys = grid if round_number % 2 else grid[::-1]
                    order += [(k, round_number) for k in keys]
            continue
        order.append((key, 1))
    return order


# ------------------------------------------------------------------ the report


def gemm_seconds(outcome: Outcome, gemm: Outcome | None) -> float | None:
    """Seconds the entry's training work would take at the measured GEMM limit."""
    if gemm is None or not gemm.ok or not outcome.samples_by_width:
        return None
    per_width: dict[str, dict[str, float]] = gemm.extra.get("per_width", {})
    if not per_width:
        return None
    total = 0.0
    for width, samples in outcome.samples_by_width.items():
        if width in per_width:
            total += samples * per_width[width]["seconds_per_sample"]
        else:
            # An unmeasured width runs at the GFLOP/s of the nearest measured one.
            nearest = min(per_width, key=lambda w: abs(math.log(int(w) / int(width))))
            total += samples * flops_per_sample(int(width)) / (per_width[nearest]["gflops"] * 1e9)
    return total


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _wall(outcome: Outcome) -> str:
    """The wall time; with several rounds, their median and then each round's."""
    runs = outcome.extra.get("round_process_s", [])
    if len(runs) < 2:
        return _fmt(outcome.process_s)
    each = ", ".join(_fmt(r) if r is not None else "failed" for r in runs)
    return f"{_fmt(outcome.process_s)} ({each})"


def _acc(outcome: Outcome) -> str:
    if outcome.best_cv_accuracy is None:
        return "–"
    std = f" ± {outcome.best_cv_std:.4f}" if outcome.best_cv_std is not None else ""
    return f"{outcome.best_cv_accuracy:.4f}{std}"


def _contention(outcome: Outcome) -> str:
    return f"{_fmt(outcome.load_before, 2)} / {_fmt(outcome.other_cpu_s, 1)}"


def _params(params: dict[str, Any] | None) -> str:
    if not params:
        return "–"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def git_commit() -> str:
    """The checked-out commit of this repository (with ``+changes`` when the tree is dirty)."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{sha}{' +changes' if dirty else ''}"


def machine_description(threads: int | None, device: str = "cpu") -> str:
    """CPU model, core count, GPU (for ``device`` cuda), library versions and thread count, in one line."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
            model,
        )
    except OSError:
        pass
    import numpy
    import optuna
    import sklearn
    import torch

    try:
        import skorch

        skorch_version = skorch.__version__
    except ImportError:
        skorch_version = "not installed"
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" and torch.cuda.is_available() else ""
    return (
        f"{model}, {os.cpu_count()} CPUs{gpu}; Python {platform.python_version()}, torch {torch.__version__} "
        f"({threads or torch.get_num_threads()} threads), numpy {numpy.__version__}, "
        f"scikit-learn {sklearn.__version__}, skorch {skorch_version}, optuna {optuna.__version__}"
    )


def render(
    settings: Settings,
    outcomes: dict[str, Outcome],
    command: str,
    started: str,
    pending: Sequence[str] = (),
) -> str:
    """The markdown of ``results.md``; ``pending`` lists entries still to run (a partial file)."""
    gemm = outcomes.get("gemm")
    grid = GRIDS[settings.grid]
    grid_keys = [k for k in (*GRID_BASELINES, *MODELSEL_GRID) if k in outcomes]
    modelsel_ok = [outcomes[k] for k in MODELSEL_GRID if k in outcomes and outcomes[k].ok]
    best_ms = min(modelsel_ok, key=lambda o: o.process_s or math.inf) if modelsel_ok else None
    reference = best_ms or min(
        (outcomes[k] for k in grid_keys if outcomes[k].ok),
        key=lambda o: o.process_s or math.inf,
        default=None,
    )
    size = f"{settings.train_size:,}" if settings.train_size else "all 60,000"
    widths = ", ".join(map(str, grid["width"]))
    decays = ", ".join(f"{v:g}" for v in grid["weight_decay"])
    lines = [
        "# modelsel benchmark results",
        "",
        f"Fashion-MNIST training split ({size} samples), grid width ∈ {{{widths}}} "
        f"× weight_decay ∈ {{{decays}}}, "
        f"{settings.folds}-fold stratified CV, {settings.epochs} epochs, batch 256, SGD lr 0.1, "
        "MLP 784-w-10 ReLU, pixels in [0, 1].",
        "",
        f"- Command: `{command}`",
        f"- Date: {started}",
        f"- Machine: {machine_description(settings.threads, settings.device)}",
        f"- modelsel commit: {git_commit()}",
        f"- Data root: `{settings.root}`; logs, specs and storages: `{settings.out_dir}`",
        *([f"- modelsel seed: {settings.seed} (the baselines keep 0)"] if settings.seed else []),
        *([f"- **Partial results**: still running or not run: {', '.join(pending)}"] if pending else []),
        "",
        "## The grid: same configurations, folds and epochs for every way",
        "",
    ]
    if not grid_keys:
        lines.append("No grid entry was selected in this run.")
    else:
        lines += _grid_table(settings, outcomes, grid_keys, reference, best_ms is not None)
    lines += ["", *_gemm_lines(gemm, outcomes, grid_keys), ""]
    lines += _target_lines(settings, outcomes, best_ms)
    lines += _tpe_lines(settings, outcomes)
    for key, (title, body) in PROBE_SECTIONS.items():
        lines += _probe_section(outcomes, key, title, body)
    lines += _notes(settings, outcomes)
    return "\n".join(lines) + "\n"


def _grid_table(
    settings: Settings,
    outcomes: dict[str, Outcome],
    grid_keys: list[str],
    reference: Outcome | None,
    reference_is_modelsel: bool,
) -> list[str]:
    gemm = outcomes.get("gemm")
    ratio_head = "× modelsel best" if reference_is_modelsel else "× fastest (no modelsel entry ran)"
    lines = [
        f"| way | wall s (process) | in-process s | fold-epochs/s | samples/s | {ratio_head} | "
        "fraction of GEMM limit | best CV acc (± fold std) | best params | test acc (refit) | "
        "load before / others' CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for key in grid_keys:
        o = outcomes[key]
        if not o.ok:
            error = (o.error or "").replace("|", "\\|")
            lines.append(f"| {o.label} | {error} | | | | | | | | | {_contention(o)} |")
            continue
        wall = o.process_s or math.nan
        limit = gemm_seconds(o, gemm)
        ratio = wall / reference.process_s if reference is not None and reference.process_s else None
        lines.append(
            f"| {o.label} | {_wall(o)} | {_fmt(o.inner_s)} | {_fmt((o.fold_epochs or 0) / wall, 2)} | "
            f"{_fmt(o.samples_trained / wall, 0)} | {_fmt(ratio, 2)} | "
            f"{_fmt(limit / wall if limit else None, 3)} | {_acc(o)} | {_params(o.best_params)} | "
            f"{_fmt(o.test_accuracy, 4)} | {_contention(o)} |"
        )
    return lines


def _gemm_lines(gemm: Outcome | None, outcomes: dict[str, Outcome], grid_keys: list[str]) -> list[str]:
    if gemm is None:
        return ["GEMM limit: not measured in this run (entry not selected)."]
    if not gemm.ok:
        return [f"GEMM limit: {gemm.error}"]
    per_width = gemm.extra["per_width"]
    parts = [
        f"width {w}: {v['gflops']:.1f} GFLOP/s, {v['epoch_s']:.3f} s per 60k-sample epoch, "
        f"{v['samples_per_s']:,.0f} samples/s"
        for w, v in per_width.items()
    ]
    runs = gemm.extra.get("gflops_runs", [])
    if len(runs) == 2:
        parts.append(
            "GFLOP/s at start / end: "
            + ", ".join(f"width {w} {runs[0].get(w, 0):.1f} / {runs[1].get(w, 0):.1f}" for w in per_width)
        )
    lines = [
        f"**GEMM limit** (float32 `torch.mm` at batch 256, {gemm.extra.get('threads')} threads, "
        "the five GEMMs of a training step without the input gradient, measured at the start and the end "
        "of this run, the faster of the two): " + "; ".join(parts) + ".",
    ]
    done = next((outcomes[k] for k in grid_keys if outcomes[k].ok and outcomes[k].samples_by_width), None)
    limit = gemm_seconds(done, gemm) if done is not None else None
    if done is not None and limit is not None:
        lines.append(
            f"The grid's training work ({done.samples_trained:,} samples) takes {limit:.1f} s at that "
            "limit; the fraction column is that time over each way's process wall time."
        )
    return lines


def _target_lines(settings: Settings, outcomes: dict[str, Outcome], best: Outcome | None) -> list[str]:
    lines = ["## Targets (modelsel's best grid entry)", ""]
    if best is None:
        return [*lines, "No modelsel grid entry ran successfully, so no target can be checked.", ""]
    wall = best.process_s or math.nan
    rows: list[tuple[str, str, bool | None]] = []
    for key, target in (("d2l", TARGET_SPEEDUP_D2L), ("skorch", TARGET_SPEEDUP_SKORCH)):
        other = outcomes.get(key)
        if other is not None and other.ok:
            speedup = (other.process_s or math.nan) / wall
            rows.append((f"≥ {target:g}× {LABELS[key]}", f"{speedup:.2f}×", speedup >= target))
        else:
            rows.append((f"≥ {target:g}× {LABELS[key]}", "baseline did not run", None))
    rate = best.samples_trained / wall
    rows.append(
        (f"≥ {TARGET_SAMPLES_PER_S:,} samples/s in total", f"{rate:,.0f}", rate >= TARGET_SAMPLES_PER_S)
    )
    limit = gemm_seconds(best, outcomes.get("gemm"))
    if limit is not None:
        frac = limit / wall
        rows.append(
            (f"≥ {TARGET_GEMM_FRACTION:.0%} of the GEMM limit", f"{frac:.1%}", frac >= TARGET_GEMM_FRACTION)
        )
    for one, two, what in (
        ("modelsel-1w", "modelsel-2w", "sequential"),
        ("modelsel-stacked", "modelsel-stacked-2w", "stacked"),
    ):
        a, b = outcomes.get(one), outcomes.get(two)
        if a is not None and b is not None and a.ok and b.ok and a.process_s and b.process_s:
            speedup = a.process_s / b.process_s
            rows.append(
                (
                    f"2 workers ≥ {TARGET_WORKERS_SPEEDUP:g}× 1 worker ({what}, whole process)",
                    f"{speedup:.2f}×",
                    speedup >= TARGET_WORKERS_SPEEDUP,
                )
            )
    seq, stk = outcomes.get("modelsel-1w"), outcomes.get("modelsel-stacked")
    if seq is not None and stk is not None and seq.ok and stk.ok and seq.process_s and stk.process_s:
        speedup = seq.process_s / stk.process_s
        rows.append(
            (
                "stacked folds over sequential, batch 256, 1 worker (whole process; the issue's "
                f"≥ {TARGET_STACKED_SPEEDUP:g}× is at batch 64, see the engine section)",
                f"{speedup:.2f}×",
                None,
            )
        )
    ref = outcomes.get("d2l")
    if ref is not None and ref.ok and ref.best_cv_accuracy is not None and best.best_cv_accuracy is not None:
        delta = best.best_cv_accuracy - ref.best_cv_accuracy
        rows.append(
            (
                f"best CV accuracy within {settings.acc_tol:g} of (1)",
                f"{delta:+.4f}",
                abs(delta) <= settings.acc_tol,
            )
        )
    lines += [f"Best modelsel entry: {best.label}.", "", "| target | measured | met |", "|---|---:|:---:|"]
    for name, value, met in rows:
        lines.append(f"| {name} | {value} | {'–' if met is None else ('yes' if met else '**no**')} |")
    return [*lines, ""]


def _probe_section(
    outcomes: dict[str, Outcome], key: str, title: str, body: Callable[[dict[str, Any]], list[str]]
) -> list[str]:
    """The section of a probe entry (``engines``, ``accuracy``): its heading, then ``body``
    of the probe's JSON figures, or why it was not measured; nothing when it did not run."""
    outcome = outcomes.get(key)
    if outcome is None:
        return []
    lines = [f"## {title}", ""]
    if not outcome.ok:
        return [*lines, f"Not measured: {outcome.error}", ""]
    return [*lines, *body(outcome.extra), ""]


def _engine_body(extra: dict[str, Any]) -> list[str]:
    lines = [
        f"`benchmarks/engine_probe.py` on {extra.get('device', 'cpu')}, in one process, "
        f"{extra['threads']} thread(s), median of "
        f"{extra['repeats']} interleaved runs: 5 fold models of the D2L MLP (784-256-10, SGD lr 0.1) on "
        "Fashion-MNIST folds for one epoch, per-epoch validation and the final training-set evaluation "
        "included.",
        "",
        "| case | engine | samples/s | CPU ms / step | stacked over sequential |",
        "|---|---|---:|---:|---:|",
    ]
    for case, engines in extra["cases"].items():
        sequential = engines.get("sequential", {}).get("wall_s")
        for engine, figures in engines.items():
            ratio = sequential / figures["wall_s"] if sequential and engine != "sequential" else None
            lines.append(
                f"| {case} | {engine} | {figures['samples_per_s']:,.0f} | {figures['cpu_ms_per_step']:.2f} | "
                f"{_fmt(ratio, 2)} |"
            )
    b64 = extra["cases"].get("d2l-b64", {})
    if "sequential" in b64 and "stacked" in b64:
        speedup = b64["sequential"]["wall_s"] / b64["stacked"]["wall_s"]
        target = f"Target stacked ≥ {TARGET_STACKED_SPEEDUP:g}× sequential at batch 64 on CPU"
        lines += ["", f"{target}: {speedup:.2f}× ({_met(speedup >= TARGET_STACKED_SPEEDUP)})."]
    return lines


def _probe_limit_text(gemm: dict[str, Any]) -> str:
    """How the throughput probe's GEMM limit was measured, with its figures."""
    start, end = gemm["start"], gemm["end"]
    figures = (
        f"{start['samples_per_s']:,.0f} / {end['samples_per_s']:,.0f} samples/s "
        f"({start['gflops']:.1f} / {end['gflops']:.1f} GFLOP/s)"
    )
    ways = "; ".join(
        f"{when}: {g['one_process_2_threads']:,.0f} at 2 threads in one process, "
        f"{g['two_processes_1_thread']:,.0f} in two 1-thread processes at once"
        for when, g in (("start", start), ("end", end))
    )
    return (
        f"GEMM limit measured in the same run at its start and end, each time both ways the rows train "
        f"(samples/s; {ways}); the fastest is the limit: {figures} at start / end."
    )


def _throughput_body(extra: dict[str, Any]) -> list[str]:
    gemm = extra["gemm"]
    limit = gemm["limit_samples_per_s"]
    engines: dict[str, dict[str, Any]] = extra["engines"]
    lines = [
        f"`benchmarks/throughput_probe.py`: the training loop alone (no validation, imports, retraining or "
        f"report), as the issue's reference table measured plain PyTorch. Each child process trains the 5 fold "
        f"models of the D2L MLP (784-{extra['width']}-10, SGD lr 0.1, batch {extra['batch']}) on their 48,000 "
        f"images for {extra['epochs']} epoch(s) with `train_models` (engine `pytorch`: the plain loop written by "
        "hand, `baselines.in_memory_epochs`, one fold model after another); the children of a row start "
        "together. Samples per second summed over the children, from the engines' epoch times, median of "
        f"{extra['rounds']} interleaved rounds. {_probe_limit_text(gemm)}",
        "",
        "| engine | processes × threads | samples/s | rounds | fraction of the GEMM limit |",
        "|---|---|---:|---|---:|",
    ]
    best: tuple[float, str] = (0.0, "")
    for engine, configs in engines.items():
        for config, figures in configs.items():
            rounds = ", ".join(f"{r:,}" for r in figures["rounds"])
            lines.append(
                f"| {engine} | {config} | {figures['samples_per_s']:,.0f} | {rounds} | "
                f"{figures['gemm_fraction']:.1%} |"
            )
            if engine != PLAIN_LOOP:  # the targets are modelsel's
                best = max(best, (figures["samples_per_s"], f"{engine}, {config}"))
    rate, where = best
    lines.append("")
    if rate > 0:
        lines.append(
            f"Target ≥ {TARGET_SAMPLES_PER_S:,} training samples/s in total: {rate:,.0f} "
            f"({where}; {_met(rate >= TARGET_SAMPLES_PER_S)}). Target ≥ {TARGET_GEMM_FRACTION:.0%} of the GEMM "
            f"limit: {rate / limit:.1%} ({_met(rate / limit >= TARGET_GEMM_FRACTION)})."
        )
    plain = engines.get(PLAIN_LOOP, {})
    if plain and rate > 0:
        plain_rate, plain_config = max((f["samples_per_s"], c) for c, f in plain.items())
        lines += [
            "",
            f"The hand-written loop at its best ({plain_config}) reaches {plain_rate:,.0f} samples/s, "
            f"{plain_rate / limit:.1%} of the same limit; modelsel's best row is {rate / plain_rate:.2f}× it.",
        ]
    return lines


def _accuracy_body(extra: dict[str, Any]) -> list[str]:
    ways = extra["ways"]
    lines = [
        f"`benchmarks/accuracy_probe.py`: the D2L MLP (784-{extra['width']}-10, SGD lr 0.1, batch 256) "
        f"trained {extra['seeds']} times, each with its own seed, on fold 0 of the benchmark's split "
        f"({extra['val_size']:,} validation images), by the plain PyTorch loop on in-memory tensors and by "
        "modelsel's two engines. Validation accuracy after each epoch, mean ± standard error over the seeds:",
        "",
        "| way | " + " | ".join(f"epoch {e + 1}" for e in range(extra["epochs"])) + " | sd of one model, last epoch |",
        "|---|" + "---:|" * (extra["epochs"] + 1),
    ]
    for way, figures in ways.items():
        cells = " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(figures["mean"], figures["se"], strict=True))
        lines.append(f"| {way} | {cells} | {figures['sd_last']:.4f} |")
    lines.append("")
    for way in ("sequential", "stacked"):
        if way in ways and "diff_last" in ways[way]:
            diff, se = ways[way]["diff_last"], ways[way]["diff_se"]
            lines.append(
                f"- modelsel {way} − PyTorch loop at the last epoch: {diff:+.4f} ± {se:.4f} "
                f"({diff / se:+.1f} standard errors)."
            )
    sd = ways["pytorch"]["sd_last"]
    lines += [
        f"- One model's accuracy has a standard deviation of about {sd:.3f} across seeds, so a 5-fold "
        f"mean has one of about {sd / math.sqrt(5):.3f}, and the "
        "grid's best-of-four CV accuracies and single refitted test accuracies above differ by that "
        "much between ways without any of them training worse.",
    ]
    return lines


#: Each probe entry's section in ``results.md``: its heading and the body of its JSON figures.
PROBE_SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "engines": ("Engines: the k fold models stacked vs one at a time", _engine_body),
    "throughput": ("Training-loop throughput against the GEMM limit", _throughput_body),
    "accuracy": ("Accuracy: how far one run's accuracy moves from seed to seed", _accuracy_body),
}


def _met(met: bool) -> str:
    return "met" if met else "**not met**"


def _tpe_lines(settings: Settings, outcomes: dict[str, Outcome]) -> list[str]:
    keys = [k for k in TPE_ENTRIES if k in outcomes]
    if not keys:
        return []
    space = ", ".join(
        f"{k} {v['type']} {v['low']:g}..{v['high']:g}{' log' if v.get('log') else ''}"
        for k, v in TPE_SEARCH.items()
    )
    lines = [
        f"## TPE search: {settings.tpe_trials} trials, without pruning and with pruners",
        "",
        f"Search space: {space}; {settings.folds} folds, up to {settings.epochs} epochs; "
        "modelsel `engine: auto`. Fold-epochs spent = Σ over finished trials of (epochs reported × folds).",
        "",
        "| search | wall s (process) | trials complete / pruned | fold-epochs spent | samples trained | "
        "best CV acc (± fold std) | best params | load before / others' CPU s |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for key in keys:
        o = outcomes[key]
        if not o.ok:
            error = (o.error or "").replace("|", "\\|")
            lines.append(f"| {o.label} | {error} | | | | | | {_contention(o)} |")
            continue
        lines.append(
            f"| {o.label} | {_fmt(o.process_s)} | {o.trials_complete} / {o.trials_pruned} | "
            f"{o.fold_epochs:,} | {o.samples_trained:,} | {_acc(o)} | {_params(o.best_params)} | "
            f"{_contention(o)} |"
        )
    plain = outcomes.get("tpe")
    for key in TPE_ENTRIES[1:]:
        pruned = outcomes.get(key)
        if not (plain and pruned and plain.ok and pruned.ok and plain.fold_epochs):
            continue
        saved = 1 - (pruned.fold_epochs or 0) / plain.fold_epochs
        delta = (pruned.best_cv_accuracy or 0.0) - (plain.best_cv_accuracy or 0.0)
        used = 1 - saved
        met = used <= TARGET_PRUNED_FRACTION and abs(delta) <= TARGET_PRUNED_ACC_DELTA
        lines += [
            "",
            f"{pruned.label}: pruning saved {saved:.0%} of the fold-epochs; best CV accuracy changed by "
            f"{delta:+.4f}. Target: the same best CV accuracy (± {TARGET_PRUNED_ACC_DELTA:g}) with ≤ "
            f"{TARGET_PRUNED_FRACTION:.0%} of the fold-epochs: {used:.0%} used, "
            f"{_met(met)}.",
        ]
        late = pruned.extra.get("pruned_after_all_epochs", 0)
        if late:
            lines.append(
                f"{late} of the {pruned.trials_pruned} pruned trials were pruned only after their last "
                "epoch, so pruning saved them nothing."
            )
    return [*lines, ""]


def _notes(settings: Settings, outcomes: dict[str, Outcome]) -> list[str]:
    lines = [
        "## How to read this",
        "",
        "- *wall s (process)*: the whole process, interpreter start, imports, data loading, training, "
        "evaluation and (for modelsel) its selection, held-out test and report included. *in-process s*: "
        "the baselines' own timer (from the entry's function, data loading included); for modelsel, first "
        "trial start to last trial end in the storage.",
        "- *fold-epochs/s*: configurations × folds × epochs over process wall time; *samples/s*: training "
        "samples passed through SGD (Σ training-fold sizes × epochs) over process wall time.",
        "- *× modelsel best*: this way's process wall time over modelsel's fastest grid entry's "
        "(how many times faster modelsel is). *fraction of GEMM limit*: the time the same training "
        "work takes at the measured `torch.mm` throughput, over the process wall time.",
        f"- Accuracies must agree within noise (here: within {settings.acc_tol:g} of the hand-written loop); "
        "the ± is the standard deviation over folds of the best configuration.",
        "- *test acc (refit)*: every way retrains its best configuration on the whole training sample "
        "(`GridSearchCV`'s default `refit=True`, modelsel's selection, the same loop by hand) and scores the "
        "10,000 test images once; modelsel also writes its HTML report, which the others do not.",
        "- sklearn's `alpha` is set to the grid's weight decay, but sklearn adds `alpha / batch_size · W` "
        "to the gradient where torch's `weight_decay` adds `weight_decay · W`: at batch 256 its penalty is "
        "256× weaker for the same number. sklearn also initializes with Glorot-uniform rather than torch's "
        "Kaiming-uniform.",
        "- *load before / others' CPU s*: the 1-minute load average when the entry started, and the CPU "
        "seconds that processes outside the entry used on the machine while it ran (from `/proc/stat` less "
        "the entry's own process tree). More than a few seconds means something else competed for the "
        "cores and that entry's timings are pessimistic; rerun it on a quiet machine. Each entry waits "
        f"(up to {settings.quiet_wait_s:g} s, `--quiet-wait`) for idle CPUs before it starts.",
    ]
    if settings.rounds > 1:
        lines.append(
            f"- *Rounds*: each grid entry ran {settings.rounds} times (`--rounds`), the grid entries one after "
            "another in every round and in reverse order every other round; the wall and in-process times "
            "are the medians of the rounds (each round's wall time in parentheses), and every ratio and "
            "target uses the medians. *others' CPU s* is the largest of the rounds'."
        )
    for o in outcomes.values():
        if o.extra.get("round_accuracies"):
            lines.append(f"- **{o.label}: its rounds' best CV accuracies differ**: {o.extra['round_accuracies']}.")
        if o.extra.get("round_errors"):
            lines.append(f"- {o.label}: {len(o.extra['round_errors'])} round(s) failed: {o.extra['round_errors']}.")
    cells = len(GRIDS[settings.grid]["width"]) * len(GRIDS[settings.grid]["weight_decay"])
    for key in MODELSEL_GRID:
        o = outcomes.get(key)
        if o is None or not o.ok:
            continue
        finished = (o.trials_complete or 0) + (o.trials_pruned or 0)
        missing, repeated = o.extra.get("grid_missing", []), o.extra.get("grid_repeated", [])
        if finished != cells or missing or repeated:
            lines.append(
                f"- **{o.label} did not run the grid exactly once**: {finished} trials for {cells} cells"
                + (f"; never ran (width, weight_decay) {', '.join(map(str, missing))}" if missing else "")
                + (f"; ran {', '.join(map(str, repeated))} more than once" if repeated else "")
                + ". Its fold-epochs, samples/s and GEMM fraction count the work it did; its best CV "
                "accuracy is over the cells it ran."
            )
    failed = [o for o in outcomes.values() if not o.ok]
    if failed:
        lines.append(
            "- Failed entries keep their last output line here; the full logs are in "
            f"`{settings.out_dir}/<entry>/stderr.log`."
        )
    return [*lines, ""]


# ------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: --train-size 6000, 2 epochs")
    parser.add_argument("--out", type=Path, default=HERE / "results.md", help="markdown file to write")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(ALL_ENTRIES)}")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="small")
    parser.add_argument("--epochs", type=int, default=None, help="default 5 (2 with --quick)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=None, help="default all 60k (6000 with --quick)")
    parser.add_argument("--tpe-trials", type=int, default=30)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="modelsel specs' seed (TPE sampler, initialisation, shuffles, folds); the baselines keep 0",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where modelsel's entries and the engine probe train (the baselines stay on the CPU)",
    )
    parser.add_argument(
        "--data-root", default=None, help="default $MODELSEL_DATA_ROOT, else /work/shared/data"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per entry (default 3600, 600 quick)"
    )
    parser.add_argument(
        "--acc-tol", type=float, default=None, help="accuracy agreement (default 0.01, 0.03 quick)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each entry, wait up to this many seconds for idle CPUs (0: don't wait)",
    )
    parser.add_argument("--log-dir", type=Path, default=HERE / "out", help="parent folder of the run's logs")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each grid entry this many times, interleaved (every other round in reverse order), "
        "and report the median wall time",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected entries one after another and write the results file."""
    args = build_parser().parse_args(argv)
    keys = ALL_ENTRIES if args.only is None else tuple(k.strip() for k in args.only.split(",") if k.strip())
    unknown = [k for k in keys if k not in ALL_ENTRIES]
    if unknown:
        print(f"error: unknown entries {unknown}; choose from {', '.join(ALL_ENTRIES)}", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print(f"error: --rounds {args.rounds}: give 1 or more", file=sys.stderr)
        return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    settings = Settings(
        grid=args.grid,
        epochs=args.epochs or (2 if args.quick else 5),
        folds=args.folds,
        train_size=args.train_size or (6000 if args.quick else None),
        tpe_trials=args.tpe_trials,
        threads=args.threads,
        root=str(Path(data_root(args.data_root)).resolve()),
        timeout_s=args.timeout or (600.0 if args.quick else 3600.0),
        quiet_wait_s=args.quiet_wait,
        out_dir=(args.log_dir / stamp).resolve(),
        acc_tol=args.acc_tol if args.acc_tol is not None else (0.03 if args.quick else 0.01),
        seed=args.seed,
        device=args.device,
        rounds=args.rounds,
    )
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    argv_text = shlex.join(sys.argv[1:] if argv is None else list(argv))
    command = f"python benchmarks/run_all.py {argv_text}".strip()
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    outcomes: dict[str, Outcome] = {}
    selected = [k for k in ALL_ENTRIES if k in keys]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if "gemm" in selected:
        # Measured again at the end: contention only lowers throughput, so the faster run is the limit.
        selected.append("gemm")
    order = run_order(selected, settings.rounds)
    rounds: dict[str, list[Outcome]] = {}
    for done, (key, round_number) in enumerate(order, start=1):
        outcome = run_entry(settings, key, round_number)
        if key == "gemm" and key in outcomes:
            outcome = merge_gemm(outcomes[key], outcome)
        elif settings.rounds > 1 and is_grid_entry(key):
            rounds.setdefault(key, []).append(outcome)
            outcome = merge_rounds(rounds[key])
        outcomes[key] = outcome
        latest = rounds[key][-1] if key in rounds else outcome
        status = latest.error or f"{latest.process_s:.1f} s, best CV acc {latest.best_cv_accuracy}"
        name = entry_name(settings, key, round_number)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {status}", file=sys.stderr, flush=True)
        # Written after every entry, so an interrupted run keeps what it measured.
        raw = {"settings": {**asdict(settings), "out_dir": str(settings.out_dir)}, "command": command}
        raw["outcomes"] = {k: asdict(o) for k, o in outcomes.items()}
        raw["rounds"] = {k: [asdict(o) for o in runs] for k, runs in rounds.items()}
        (settings.out_dir / "results.json").write_text(json.dumps(raw, indent=2, default=str))
        pending = [entry_name(settings, k, r) for k, r in order[done:]]
        args.out.write_text(render(settings, outcomes, command, started, pending=pending))
    print(f"wrote {args.out} (raw figures: {settings.out_dir / 'results.json'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
