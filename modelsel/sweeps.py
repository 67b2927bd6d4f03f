"""Sweeps: the tidy table, regime labels in context, plots and findings, from storage alone.

A sweep study's trials carry their grid values as parameters and everything else as
user attributes, and the study carries its spec (``spec_full``). From those alone this
module builds:

* ``sweep.csv``: one row per cell × seed with every axis, fold mean/std of the train
  and validation error, the gap, the trial's own ``regime`` and the ``sweep_regime``
  that uses its neighbours (:func:`modelsel.regimes.classify_in_context`);
* a validation curve per axis (a learning curve for ``train_size``), a regime map for
  two axes, training curves of selected cells, weight size against weight decay / L1;
* a plain-language finding per axis.

A spec whose ``sweep`` lists several grids runs one study per grid
(:func:`modelsel.study.run_sweep_maps`), named ``<name>-<axis>-x-<axis>``, in one storage, plus a
combined report.
"""

from __future__ import annotations

import base64
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.patches import Patch
from optuna.trial import TrialState

from modelsel.figures import Figure, Section, figure_to_base64, format_table, plot_training_curves
from modelsel.regimes import (
    REGIMES,
    Cell,
    Verdict,
    capacity_side,
    classify,
    classify_in_context,
    error_name,
    numbers_from_attrs,
    trial_blew_up,
    trial_gradient_flow,
)
from modelsel.results import stored_spec
from modelsel.spec import RegimeSpec, StudySpec, value_key, value_text

REGIME_COLORS = {"underfit": "#4C72B0", "good": "#55A868", "overfit": "#DD8452", "diverged": "#C44E52"}
SEED_COLUMN = "seed"
#: Whether the study's selection may pick the row's trial (completed, and its training did
#: not blow up: :func:`modelsel.regimes.trial_blew_up`); not written to ``sweep.csv``.
SELECTABLE = "_selectable"
#: Dataset fields that are model choices rather than a different data set.
_MODEL_LIKE_DATA_FIELDS = {"degree"}


# ------------------------------------------------------------------------- spec


def sweep_info(study: optuna.Study) -> tuple[list[str], list[str], RegimeSpec, dict[str, Any]] | None:
    """The study's sweep axes, which of them change the data, the regime thresholds and
    the stored spec; None when the study is not a (single-grid) sweep."""

    try:
        spec = stored_spec(study)
    except ValueError:
        return None
    sweep = spec.get("sweep")
    if not isinstance(sweep, dict) or not sweep.get("axes"):
        return None
    axes = list(sweep["axes"])
    ordered = study.user_attrs.get("sweep_axes")
    if isinstance(ordered, list) and sorted(ordered) == sorted(axes):
        axes = list(ordered)  # the spec's own axis order (stored specs sort their keys)
    dataset_fields = set(spec.get("dataset") or {})
    other_fields = set(spec.get("model") or {}) | set(spec.get("training") or {})
    data_axes = []
    for axis in axes:
        section, _, name = axis.rpartition(".")
        in_data = section == "dataset" or (not section and name in dataset_fields and name not in other_fields)
        if in_data and name not in _MODEL_LIKE_DATA_FIELDS:
            data_axes.append(axis)
    try:
        thresholds = RegimeSpec.model_validate(spec.get("regimes") or {})
    except ValueError:
        thresholds = RegimeSpec()
    return axes, data_axes, thresholds, spec


# ------------------------------------------------------------------------ table


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def sweep_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial (cell × seed): axes, seed, errors (fold mean/std), gap, regimes.

    Columns ``fold_train_errors``/``fold_val_errors`` (lists) are for plotting and are
    left out of ``sweep.csv``.
    """
    info = sweep_info(study)
    if info is None:
        return pd.DataFrame()
    axes, data_axes, thresholds, spec = info
    default_seed = spec.get("seed", 0)
    rows: list[dict[str, Any]] = []
    cells: list[Cell] = []
    cell_rows: list[int] = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        attrs = trial.user_attrs
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name.lower()}
        row.update({axis: trial.params.get(axis) for axis in axes})
        row[SEED_COLUMN] = trial.params.get(SEED_COLUMN, default_seed)
        row["n_params"] = attrs.get("n_params")
        row["n_train"] = attrs.get("n_train")
        row["error"] = error_name(attrs.get("metric_name", "accuracy"))
        # What the study's selection may pick (results.selectable_trials): completed, not blown up.
        row[SELECTABLE] = trial.state == TrialState.COMPLETE and not trial_blew_up(attrs)
        flow = trial_gradient_flow(attrs)
        row["gradient_flow"] = flow[0] if flow is not None else None
        numbers = numbers_from_attrs(attrs) if trial.state == TrialState.COMPLETE else None
        if numbers is not None:
            own = classify(numbers, thresholds=thresholds)
            row.update(
                train_error=numbers.train_error,
                train_error_std=_std(numbers.fold_train_errors),
                val_error=numbers.val_error,
                val_error_std=_std(numbers.fold_val_errors),
                gap=numbers.gap,
                train_loss=attrs.get("train_loss_mean"),
                val_loss=attrs.get("val_loss_mean"),
                val_loss_std=attrs.get("val_loss_std"),
                baseline_error=numbers.baseline_error,
                regime=attrs.get("regime", own.regime),
                regime_reason=attrs.get("regime_reason", own.reason),
                fold_train_errors=list(numbers.fold_train_errors),
                fold_val_errors=list(numbers.fold_val_errors),
            )
            cells.append(
                Cell(
                    axes={a: row[a] for a in axes},
                    numbers=numbers,
                    own=own,
                    seed=row[SEED_COLUMN],
                    data_key=tuple(row[a] for a in data_axes),
                )
            )
            cell_rows.append(len(rows))
        else:
            regime = attrs.get("regime")
            row.update(
                regime=regime,
                regime_reason=attrs.get("regime_reason") or attrs.get("fail_reason"),
                sweep_regime=regime,
                sweep_reason=attrs.get("regime_reason") or attrs.get("fail_reason"),
            )
        rows.append(row)
    for index, verdict in zip(cell_rows, classify_in_context(cells, thresholds=thresholds), strict=True):
        rows[index]["sweep_regime"] = verdict.regime
        rows[index]["sweep_reason"] = verdict.reason
        rows[index]["excess_from"] = verdict.evidence.get("excess_from")
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    _keep_nulls(frame, rows, axes)
    grids = spec["sweep"]["axes"]
    positions = {a: {value_key(v): i for i, v in enumerate(_axis_order(grids.get(a, [])))} for a in axes}
    frame.attrs[AXIS_ORDER] = {a: list(positions[a]) for a in axes}  # the plots' order of each axis
    frame["_order"] = frame.apply(
        lambda r: tuple(positions[a].get(value_key(r[a]), len(positions[a])) for a in axes), axis=1
    )
    frame = frame.sort_values(["_order", SEED_COLUMN, "trial"], kind="stable").drop(columns="_order")
    frame = frame.reset_index(drop=True)
    for column in ("val_error", "sweep_regime", "sweep_reason", "regime", "excess_from"):
        if column not in frame:
            frame[column] = None
    # The best cell of each data setting: lowest validation error averaged over repeats,
    # among cells with a seed that did not blow up, ties to the cell of the earliest trial:
    # the study's selection's rules (which ranks by the first objective: the same cell for
    # val_accuracy, not always for val_loss).
    cell_keys, data_keys = _cell_keys(frame, axes), _cell_keys(frame, data_axes)
    selectable = _selectable_cells(frame, axes) or set()
    sums: dict[tuple[str, ...], list[float]] = {}
    first_trial: dict[tuple[str, ...], int] = {}
    for key, value, number in zip(cell_keys, frame["val_error"], frame["trial"], strict=True):
        if isinstance(value, (int, float)) and math.isfinite(value):
            sums.setdefault(key, []).append(float(value))
            first_trial[key] = min(first_trial.get(key, int(number)), int(number))
    best: dict[tuple[str, ...], tuple[str, ...]] = {}
    rank = {key: (statistics.fmean(values), first_trial[key]) for key, values in sums.items() if key in selectable}
    for key in sorted(rank, key=rank.__getitem__):
        best.setdefault(tuple(key[axes.index(a)] for a in data_axes), key)
    frame["best_cell"] = [best.get(d) == c for c, d in zip(cell_keys, data_keys, strict=True)]
    return frame


def _cell_keys(frame: pd.DataFrame, axes: Sequence[str]) -> list[tuple[str, ...]]:
    """Each row's values of ``axes`` as a comparable key (its grid cell, by ``value_key``)."""
    columns = [frame[a].tolist() for a in axes]
    return [tuple(value_key(column[i]) for column in columns) for i in range(len(frame))]


def _selectable_cells(frame: pd.DataFrame, axes: Sequence[str]) -> set[tuple[str, ...]] | None:
    """The cells with a row the study's selection may pick (:data:`SELECTABLE`); None for
    a frame that does not say."""
    if SELECTABLE not in frame:
        return None
    return {key for key, ok in zip(_cell_keys(frame, axes), frame[SELECTABLE], strict=True) if ok}


def _keep_nulls(frame: pd.DataFrame, rows: Sequence[dict[str, Any]], axes: Sequence[str]) -> None:
    """Put back a null grid value that pandas turned into NaN (shown as "nan", ordered
    last) in the axis columns of ``frame``, built from ``rows``."""
    for axis in axes:
        if any(row[axis] is None for row in rows):
            frame[axis] = pd.Series([row[axis] for row in rows], dtype=object)


#: ``DataFrame.attrs`` key of a sweep frame (and its cell summary): each axis's value keys
#: in the grid's order (:func:`_axis_order`), whatever cells have run.
AXIS_ORDER = "axis_order"


def _in_grid_order(frame: pd.DataFrame, axis: str) -> dict[str, Any]:
    """``value_key -> value`` of the axis values in ``frame``, in the grid's order (a
    partly run sweep's rows would give them in the order their cells happen to appear)."""
    labels = dict(zip(frame[axis].map(value_key), frame[axis], strict=True))
    position = {key: i for i, key in enumerate(frame.attrs.get(AXIS_ORDER, {}).get(axis, []))}
    return dict(sorted(labels.items(), key=lambda item: position.get(item[0], len(position))))


def _axis_order(values: Sequence[Any]) -> list[Any]:
    """An axis's values in the order the report shows them: ascending when they are all
    numbers (the findings' "below" and "above" and the curves' x axis read that way),
    else as the spec lists them (activations, booleans, a null)."""
    numbers = [_as_number(v) for v in values]
    if any(n is None for n in numbers):
        return list(values)
    order = sorted(range(len(values)), key=lambda i: numbers[i] or 0.0)
    return [values[i] for i in order]


def _as_number(value: Any) -> float | None:
    """A grid value as a number: ints and floats, and strings such as '1e-3' (PyYAML reads
    an exponent without a dot as a string); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as written to ``sweep.csv`` (fold lists and bookkeeping left out)."""
    return frame.drop(columns=[c for c in ("fold_train_errors", "fold_val_errors", SELECTABLE) if c in frame])


def cell_summary(frame: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """One row per cell (repeats pooled): mean and fold std of the errors, gap and the
    most common regime labels."""
    done = frame[frame["val_error"].notna()] if "val_error" in frame else frame.iloc[0:0]
    rows = []
    for _, group in frame.groupby([frame[a].map(value_key) for a in axes], sort=False, dropna=False):
        first = group.iloc[0]
        row: dict[str, Any] = {a: first[a] for a in axes}
        finished = done.loc[done.index.intersection(group.index)]
        row["seeds"] = len(finished)  # those the means pool (a pruned or diverged seed is not one)
        if not finished.empty:
            folds_val = [v for lst in finished["fold_val_errors"] for v in lst]
            folds_train = [v for lst in finished["fold_train_errors"] for v in lst]
            row.update(
                train_error=float(finished["train_error"].mean()),
                train_error_std=_std(folds_train),
                val_error=float(finished["val_error"].mean()),
                val_error_std=_std(folds_val),
                gap=float(finished["gap"].mean()),
            )
        row["regime"] = _majority(group["regime"])
        row["sweep_regime"] = _majority(group["sweep_regime"])
        row["gradient_flow"] = _majority(group.get("gradient_flow", pd.Series(dtype=object)), order=_GRADIENT_FLOWS)
        row["best_cell"] = bool(group["best_cell"].any())
        rows.append(row)
    columns = [*axes, "seeds", *_CELL_NUMBERS, "regime", "sweep_regime", "gradient_flow", "best_cell"]
    # A fixed column order (a pruned first cell has no numbers); the axis order passes on.
    summary = pd.DataFrame(rows).reindex(columns=[c for c in columns if any(c in r for r in rows)])
    _keep_nulls(summary, rows, axes)
    summary.attrs = dict(frame.attrs)
    return summary


_CELL_NUMBERS = ("train_error", "train_error_std", "val_error", "val_error_std", "gap")


#: Gradient-flow labels, ties between seeds going to the earlier.
_GRADIENT_FLOWS = ("exploding", "vanishing", "healthy")


def _majority(values: pd.Series, *, order: Sequence[str] = REGIMES) -> Any:
    counts = Counter(v for v in values if isinstance(v, str))
    if not counts:
        return None
    return max(counts, key=lambda k: (counts[k], -order.index(k) if k in order else 0))


# ------------------------------------------------------------------------ plots


def _fmt(value: Any) -> str:
    return value_text(value, digits=6)


def _log_scale(values: Sequence[float]) -> bool:
    positive = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    return bool(positive) and len(positive) == len(values) and max(positive) / min(positive) > 30


def _regime_legend(ax: plt.Axes, regimes: Sequence[str]) -> list[Patch]:
    return [Patch(facecolor=REGIME_COLORS[r], alpha=0.25, label=r) for r in REGIMES if r in regimes]


def plot_validation_curve(
    summary: pd.DataFrame, axis: str, *, axes: Sequence[str], error: str
) -> plt.Figure | None:
    """Train and validation error against one axis (mean ± fold std), best value marked,
    background shaded by each cell's sweep regime; one panel per value of the other axis."""
    if summary.empty or "val_error" not in summary:
        return None
    others = [a for a in axes if a != axis]
    along = list(_in_grid_order(summary, axis))
    panels = [(None, summary)] if not others else list(summary.groupby(summary[others[0]].map(value_key), sort=False))
    if others:
        order = list(_in_grid_order(summary, others[0]))
        panels.sort(key=lambda item: order.index(str(item[0])))
    # Each panel's points in the grid's order along the axis.
    panels = [
        (key, panel.iloc[sorted(range(len(panel)), key=lambda i: along.index(value_key(panel[axis].iloc[i])))])
        for key, panel in panels
    ]
    # Every panel, four to a row (the first eight only used to be drawn, silently).
    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    fig, grid = plt.subplots(
        rows, columns, figsize=(min(4.2 * columns, 16), 3.6 * rows), sharey=True, squeeze=False
    )
    for spare in grid.flat[len(panels) :]:
        spare.set_visible(False)
    axs = list(grid.flat[: len(panels)])
    values_all = list(summary["val_error"].dropna()) + list(summary["train_error"].dropna())
    log = error != "error" and _log_scale(values_all)  # error rates stay linear
    seen: set[str] = set()
    for ax, (_, panel) in zip(axs, panels, strict=True):
        xs = list(range(len(panel)))
        labels = [_fmt(v) for v in panel[axis]]
        for x, regime in zip(xs, panel["sweep_regime"], strict=True):
            if isinstance(regime, str) and regime in REGIME_COLORS:
                ax.axvspan(x - 0.5, x + 0.5, color=REGIME_COLORS[regime], alpha=0.15, lw=0)
                seen.add(regime)
        for split, color in (("train", "#4C72B0"), ("val", "#DD8452")):
            mean = panel[f"{split}_error"].to_numpy(dtype=float)
            std = panel[f"{split}_error_std"].to_numpy(dtype=float)
            # An error rate or MSE is never below 0 (a bar to -1.7 said it could), and a log
            # axis cannot show 0 at all.
            lower = np.minimum(std, 0.9 * mean) if log else np.minimum(std, mean)
            ax.errorbar(
                xs,
                mean,
                yerr=np.vstack([lower, std]),
                marker="o",
                capsize=3,
                color=color,
                label=f"{split} {error}",
            )
        if panel["val_error"].notna().any():
            best = int(np.nanargmin(panel["val_error"].to_numpy(dtype=float)))
            ax.plot([best], [panel["val_error"].iloc[best]], marker="*", ms=16, color="black", ls="", label="best")
        ax.set_xticks(xs, labels, rotation=30 if max(len(s) for s in labels) > 5 else 0)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_xlabel(axis)
        if others:
            ax.set_title(f"{others[0]}={_fmt(panel[others[0]].iloc[0])}", fontsize=9)
        if log:
            ax.set_yscale("log")
    for row in grid:
        row[0].set_ylabel("error rate (1 − accuracy)" if error == "error" else error)
    handles, _ = axs[0].get_legend_handles_labels()
    axs[-1].legend(handles=handles + _regime_legend(axs[-1], sorted(seen)), fontsize=7, loc="best")
    sns.despine(fig)
    fig.tight_layout()
    return fig


def plot_regime_map(summary: pd.DataFrame, axes: Sequence[str], error: str) -> plt.Figure | None:
    """Heatmap of the validation error over two axes, each cell labelled by its regime
    (and by its gradient flow where that vanished or exploded)."""
    if len(axes) != 2 or summary.empty or "val_error" not in summary:
        return None
    rows_axis, cols_axis = axes
    row_labels = _in_grid_order(summary, rows_axis)
    col_labels = _in_grid_order(summary, cols_axis)
    row_values, col_values = list(row_labels), list(col_labels)
    grid = np.full((len(row_values), len(col_values)), np.nan)
    notes = np.full(grid.shape, "", dtype=object)
    for _, r in summary.iterrows():
        i, j = row_values.index(value_key(r[rows_axis])), col_values.index(value_key(r[cols_axis]))
        value = r.get("val_error")
        grid[i, j] = value if isinstance(value, (int, float)) else np.nan
        regime = r.get("sweep_regime")
        regime = regime if isinstance(regime, str) else "—"  # pruned or not run (NaN, not None, in pandas)
        star = " ★" if r.get("best_cell") else ""
        numeric = isinstance(value, (int, float)) and math.isfinite(value)
        notes[i, j] = f"{value:.3g}{star}\n{regime}" if numeric else regime
        flow = r.get("gradient_flow")
        if flow in ("vanishing", "exploding"):  # healthy goes without saying
            notes[i, j] += f"\n{flow} grads"
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if error != "error" and _log_scale(list(finite)) else None
    fig, ax = plt.subplots(figsize=(1.3 * len(col_values) + 2.5, 0.8 * len(row_values) + 1.6))
    sns.heatmap(
        pd.DataFrame(
            grid,
            index=[_fmt(v) for v in row_labels.values()],
            columns=[_fmt(v) for v in col_labels.values()],
        ),
        annot=notes,
        fmt="",
        cmap="viridis_r",
        norm=norm,
        cbar_kws={"label": f"validation {error}"},
        annot_kws={"fontsize": 8},
        ax=ax,
    )
    # seaborn leaves cells without a value (diverged, pruned, not run) unlabelled.
    for i, j in zip(*np.nonzero(~np.isfinite(grid)), strict=True):
        ax.text(j + 0.5, i + 0.5, notes[i, j], ha="center", va="center", fontsize=8, color="dimgray")
    ax.set_ylabel(rows_axis)
    ax.set_xlabel(cols_axis)
    return fig


def plot_weights(study: optuna.Study, frame: pd.DataFrame, axes: Sequence[str]) -> plt.Figure | None:
    """Squared L2 norm of the weights per layer and share of near-zero weights against
    the weight-decay / L1 axis (one line per layer, or per value of the other axis)."""
    reg_axes = [a for a in axes if a.rpartition(".")[2] in ("weight_decay", "l1")]
    if not reg_axes or frame.empty:
        return None
    axis = reg_axes[0]
    others = [a for a in axes if a != axis]
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    labels = _in_grid_order(frame, axis)
    order = list(labels)
    rows = []
    for _, r in frame.iterrows():
        trial = trials.get(int(r["trial"]))
        stats = trial.user_attrs.get("weight_stats") if trial is not None else None
        if not stats:
            continue
        position = order.index(value_key(r[axis]))
        if others:
            rows.append(
                {
                    "position": position,
                    "line": f"{others[0]}={_fmt(r[others[0]])}",
                    "sq_norm": sum(s["sq_norm"] for s in stats.values()),
                    "near_zero_share": statistics.fmean(s["near_zero_share"] for s in stats.values()),
                }
            )
        else:
            rows += [
                {"position": position, "line": layer, "sq_norm": s["sq_norm"], "near_zero_share": s["near_zero_share"]}
                for layer, s in stats.items()
            ]
    if not rows:
        return None
    data = pd.DataFrame(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    sns.lineplot(data=data, x="position", y="sq_norm", hue="line", marker="o", ax=left, errorbar=("pi", 100))
    sns.lineplot(data=data, x="position", y="near_zero_share", hue="line", marker="o", ax=right, errorbar=("pi", 100))
    if (data["sq_norm"] > 0).all():
        left.set_yscale("log")
    what = "total over layers" if others else "per layer"
    left.set_ylabel(f"‖W‖² ({what})")
    right.set_ylabel("share of |w| < 1e-3" + (" (mean over layers)" if others else ""))
    for ax in (left, right):
        ax.set_xticks(range(len(order)), [_fmt(v) for v in labels.values()])
        ax.set_xlabel(axis)
        ax.legend(fontsize=7, title=None)
    sns.despine(fig)
    fig.tight_layout()
    return fig


def selected_trials(frame: pd.DataFrame, axes: Sequence[str]) -> list[tuple[int, str]]:
    """Trials whose training curves the report shows: the best cell (its first finished
    seed), the most underfit (highest training error), the most overfit (largest gap)
    and a diverged one."""
    done = frame[frame["val_error"].notna()] if "val_error" in frame else frame.iloc[0:0]
    picks: list[tuple[int, str]] = []
    if not done.empty:
        # The cell with the lowest validation error averaged over its seeds, as sweep.csv's
        # best_cell and the regime map's star; not the single best seed of any cell.
        # Ties go to the cell of the earliest trial, as the study's selection breaks them.
        # The frame is in seed order within a cell, so "first" is the first finished seed;
        # a cell is shown by its first seed that did not blow up (the one it is retrained
        # from), and a cell whose every seed blew up is not the best (the selection's rules).
        ok = done[SELECTABLE].astype(bool) if SELECTABLE in done else pd.Series(True, index=done.index)
        cell = pd.Series([repr(key) for key in _cell_keys(done, axes)], index=done.index)  # tuples make .loc ambiguous
        cells = done.groupby(cell, sort=False).agg(val_error=("val_error", "mean"), first_trial=("trial", "min"))
        shown = done[ok].groupby(cell[ok], sort=False)["trial"].first()
        cells = cells[cells.index.isin(shown.index)]
        if not cells.empty:
            best_key = cells.sort_values(["val_error", "first_trial"]).index[0]
            picks.append((int(shown.loc[best_key]), "best cell"))
        for regime, column in (("underfit", "train_error"), ("overfit", "gap")):
            group = done[done["sweep_regime"] == regime]
            if not group.empty:
                row = group.iloc[int(np.argmax(group[column].to_numpy(dtype=float)))]
                picks.append((int(row["trial"]), f"most {regime}"))
    diverged = frame[frame["sweep_regime"] == "diverged"]
    if not diverged.empty:
        picks.append((int(diverged.iloc[0]["trial"]), "diverged"))
    unique: dict[int, str] = {}
    for number, why in picks:
        unique.setdefault(number, why)
    return list(unique.items())


# --------------------------------------------------------------------- findings


def _verb(regime: str) -> str:
    return {"underfit": "underfits", "overfit": "overfits", "diverged": "diverged"}.get(regime, f"is {regime}")


def _describe(row: pd.Series, error: str) -> str:
    regime = row.get("sweep_regime")
    if regime == "underfit":
        return f"underfits (train {error} {row['train_error']:.3g}, val {row['val_error']:.3g})"
    if regime == "overfit":
        text = f"overfits (gap {row['gap']:.3g}, val {error} {row['val_error']:.3g})"
        return text
    if regime == "good":
        return f"is as good within noise (val {error} {row['val_error']:.3g})"
    if regime == "diverged":
        return "diverged"
    return "has no result"


def axis_findings(frame: pd.DataFrame, axes: Sequence[str], data_axes: Sequence[str]) -> list[str]:
    """One plain-language sentence (or a few) per swept axis."""
    summary = cell_summary(frame, axes)
    if "val_error" not in summary:  # no trial finished (e.g. every one diverged)
        return ["No cell has finished yet."]
    done = summary[summary["val_error"].notna()]
    if done.empty:
        return ["No cell has finished yet."]
    error = str(frame["error"].dropna().iloc[0]) if "error" in frame and frame["error"].notna().any() else "error"
    # "Lowest" is said of a cell the selection could pick (a seed that did not blow up).
    ok_keys = _selectable_cells(frame, axes)

    def selectable(part: pd.DataFrame) -> pd.DataFrame:
        if ok_keys is None or part.empty:
            return part
        return part[[key in ok_keys for key in _cell_keys(part, axes)]]

    candidates = selectable(done)
    if candidates.empty:
        return [f"No cell finished without its training blowing up (validation {error} at chance or worse)."]
    best = candidates.iloc[int(np.argmin(candidates["val_error"].to_numpy(dtype=float)))]
    findings = []
    for axis in axes:
        others = [a for a in axes if a != axis]
        line = summary
        where = ""
        if others:
            line = summary[summary[others[0]].map(value_key) == value_key(best[others[0]])]
            where = f" (at {others[0]}={_fmt(best[others[0]])})"
        line = line.reset_index(drop=True)
        finished = line[line["val_error"].notna()]
        if finished.empty:
            continue
        if axis in data_axes:
            first, last = finished.iloc[0], finished.iloc[-1]
            labels = ", ".join(f"{_fmt(r[axis])}: {r['sweep_regime']}" for _, r in finished.iterrows())
            findings.append(
                f"Along {axis}{where}: validation {error} goes from {first['val_error']:.3g} at {axis}="
                f"{_fmt(first[axis])} to {last['val_error']:.3g} at {_fmt(last[axis])}, and the gap from "
                f"{first['gap']:.3g} to {last['gap']:.3g} (regimes: {labels})."
            )
            continue
        ranked = selectable(finished)
        if ranked.empty:
            continue
        b = int(ranked.index[int(np.argmin(ranked["val_error"].to_numpy(dtype=float)))])
        top = line.iloc[b]
        text = (
            f"Along {axis}{where}: validation {error} is lowest at {axis}={_fmt(top[axis])} "
            f"({top['val_error']:.3g} ± {top['val_error_std']:.2g}; train {top['train_error']:.3g}, "
            f"gap {top['gap']:.3g})"
        )
        if top["sweep_regime"] not in ("good", None):
            text += f", yet that cell itself {_verb(top['sweep_regime'])}"
        # Values without an order (activation, init, true/false, a null) have no "below" or
        # "above": as _axis_order, which leaves such an axis in the spec's order.
        ordered = all(_as_number(v) is not None for v in line[axis])
        sides = (("below it", line.loc[: b - 1]), ("above it", line.loc[b + 1 :])) if ordered else (
            ("elsewhere", line.drop(index=b)),
        )
        for side, part in sides:
            if part.empty:
                continue
            pieces = [f"at {axis}={_fmt(r[axis])} the model {_describe(r, error)}" for _, r in part.iterrows()]
            text += f"; {side} " + ", ".join(pieces)
        text += "."
        notes = _disagreements(frame, axis, line, top, error)
        findings.append(text + notes)
    return findings


def _disagreements(frame: pd.DataFrame, axis: str, line: pd.DataFrame, top: pd.Series, error: str) -> str:
    """A note where a cell's label (its side of the best on a capacity axis) and the
    source of its extra error (training error vs gap) disagree."""
    notes = []
    for _, r in line.iterrows():
        same_cell = value_key(r[axis]) == value_key(top[axis])
        side = 0 if same_cell else capacity_side({axis: r[axis]}, {axis: top[axis]})[0]
        # A cell's own label (from its own numbers) is kept in context; say where it sits
        # on the other side of the best cell than the label suggests.
        if r["sweep_regime"] == "overfit" and side < 0:
            mine, best_train = r["train_error"], top["train_error"]
            fit = (
                f"the best cell's training {error} is lower ({best_train:.3g} vs {mine:.3g})"
                if best_train < mine
                else f"its training {error} is lower than the best cell's too ({mine:.3g} vs {best_train:.3g})"
            )
            notes.append(
                f"at {axis}={_fmt(r[axis])} the model overfits by its own numbers (gap {r['gap']:.3g}) though it "
                f"has less capacity than the best cell; {fit}"
            )
            continue
        if r["sweep_regime"] == "underfit" and side > 0:
            notes.append(
                f"at {axis}={_fmt(r[axis])} the model underfits by its own numbers (train {error} "
                f"{r['train_error']:.3g}), though it has more capacity than the best cell"
            )
            continue
        same = frame[axis].map(value_key) == value_key(r[axis])
        rows = frame[same & frame["sweep_regime"].eq(r["sweep_regime"])]
        sources = {s for s in rows.get("excess_from", pd.Series(dtype=object)) if isinstance(s, str)}
        if r["sweep_regime"] == "overfit" and sources == {"training error"}:
            notes.append(
                f"at {axis}={_fmt(r[axis])} the training {error} is also higher than at the best "
                f"({r['train_error']:.3g} vs {top['train_error']:.3g}), so part of its extra validation "
                "error comes from fitting the training data less well, not from a larger gap"
            )
        elif r["sweep_regime"] == "underfit" and sources == {"gap"}:
            notes.append(
                f"at {axis}={_fmt(r[axis])} most of the extra validation {error} is a larger gap "
                f"({r['gap']:.3g} vs {top['gap']:.3g}), not a higher training error"
            )
    return (" Note: " + "; ".join(notes) + ".") if notes else ""


# --------------------------------------------------------------------- sections


def sweep_sections(study: optuna.Study) -> list[Section]:
    """Report sections of a sweep study (empty for other studies); the files beside a
    study's own report are :func:`sweep_report_parts`'s, written by
    :func:`modelsel.report.build_report`."""
    return sweep_report_parts(study)[0]


def sweep_report_parts(study: optuna.Study) -> tuple[list[Section], dict[str, bytes]]:
    """Report sections of a sweep study and the files that go beside the report
    (``sweep.csv`` and the plots as PNG, by file name); nothing is written here."""
    info = sweep_info(study)
    if info is None:
        return [], {}
    axes, data_axes, thresholds, _ = info
    frame = sweep_frame(study)
    files = {"sweep.csv": csv_frame(frame).to_csv(index=False).encode("utf-8")}
    findings = Section("Sweep findings", scroll_tables=True)
    plots = Section("Sweep plots")
    if frame.empty:
        findings.paragraphs.append("No cell of the sweep has finished yet.")
        return [findings], files
    error = str(frame["error"].dropna().iloc[0]) if frame["error"].notna().any() else "error"
    counts = Counter(r for r in frame["sweep_regime"] if isinstance(r, str))
    findings.paragraphs.append(
        f"Grid over {' × '.join(axes)}: {frame[axes].drop_duplicates().shape[0]} cells, {len(frame)} finished "
        f"trials. Regimes in context: " + ", ".join(f"{counts[r]} {r}" for r in REGIMES if counts[r]) + "."
    )
    findings.paragraphs += axis_findings(frame, axes, data_axes)
    findings.paragraphs.append(
        "Labels: 'regime' uses a trial's own numbers; 'sweep_regime' keeps that label when it is underfit, "
        "overfit or diverged, and otherwise compares the cell with the best cell trained on the same data "
        "(within noise: good; worse with more capacity: overfit; with less: underfit). "
        f"Thresholds: underfit at train {error} ≥ {thresholds.underfit_error:.0%} of the trivial predictor's, "
        f"overfit at a gap ≥ {thresholds.overfit_gap:.0%} of it or a validation loss {thresholds.val_rise:.0%} "
        f"above its minimum; good within {thresholds.tolerance_se:g} SE or {thresholds.tolerance_rel:.0%} of "
        "the best. Every row is in sweep.csv."
    )
    summary = cell_summary(frame, axes)
    shown = summary.drop(columns=["seeds"] if (summary["seeds"] <= 1).all() else [])  # one seed a cell
    findings.tables.append(format_table(shown))

    def add(fig: plt.Figure | None, title: str, filename: str, caption: str = "") -> None:
        if fig is not None:
            png = figure_to_base64(fig)
            files[filename] = base64.b64decode(png)
            plots.figures.append(Figure(title, png, caption))

    for axis in axes:
        is_learning = axis.rpartition(".")[2] == "train_size"
        add(
            plot_validation_curve(summary, axis, axes=axes, error=error),
            ("Learning curve" if is_learning else "Validation curve") + f": {axis}",
            f"{'learning' if is_learning else 'validation'}_curve_{axis.replace('.', '_')}.png",
            f"Train and validation {error} (fold mean ± std over folds and repeats); ★ marks the lowest "
            "validation error; the background shows each cell's regime in context.",
        )
    add(
        plot_regime_map(summary, axes, error),
        f"Regime map: {' × '.join(axes)}",
        "regime_map.png",
        f"Validation {error} per cell with its regime in context; ★ the best cell of each data setting.",
    )
    add(
        plot_weights(study, frame, axes),
        "Weight size against regularization",
        "weights.png",
        "Squared L2 norm of the weights and share of weights below 1e-3 in magnitude (fold mean; the band "
        "spans repeats). Weight decay shrinks ‖W‖²; L1 drives weights to zero.",
    )
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number, why in selected_trials(frame, axes):
        trial = trials[number]
        cell = ", ".join(f"{a}={_fmt(trial.params.get(a))}" for a in axes)
        figure = plot_training_curves(trial, title=f"Training curves, {why}: {cell} (trial {number})")
        if figure is not None:
            files[f"training_curves_trial{number}.png"] = base64.b64decode(figure.png_base64)
            plots.figures.append(replace(figure))
    return [findings, plots], files


# ------------------------------------------------------------- several grids


def map_name(name: str, axes: Sequence[str]) -> str:
    """Study name of one grid of the multi-grid sweep ``name``: ``<name>-<axis>-x-<axis>``."""
    return f"{name}-{'-x-'.join(a.replace('.', '_') for a in axes)}"


def map_specs(spec: StudySpec) -> list[StudySpec]:
    """One single-grid spec per grid of a multi-grid sweep (the spec itself otherwise)."""
    if not isinstance(spec.sweep, list):
        return [spec]
    return [
        spec.model_copy(update={"name": map_name(spec.name, list(grid.axes)), "sweep": grid})
        for grid in spec.sweep
    ]


def stored_maps(storage_url: str, name: str) -> tuple[StudySpec, list[optuna.Study]] | None:
    """The multi-grid sweep ``name`` as stored at ``storage_url``, or None when none is.

    Returns its spec, rebuilt from the specs its maps stored (each map's grid, its axes in
    the spec's order), and the maps' studies in the order they were created: what
    :func:`modelsel.report.build_maps_report` needs, from the storage alone.
    """
    from modelsel.spec import parse_spec
    from modelsel.storage import open_storage

    storage = open_storage(storage_url, heartbeat=False, must_exist=True)
    studies: list[optuna.Study] = []
    grids: list[dict[str, Any]] = []
    base: dict[str, Any] | None = None
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if not summary.study_name.startswith(f"{name}-"):
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        axes = study.user_attrs.get("sweep_axes")
        try:
            data = stored_spec(study)
        except ValueError:
            continue
        sweep = data.get("sweep")
        if not (isinstance(axes, list) and isinstance(sweep, dict) and isinstance(sweep.get("axes"), dict)):
            continue
        if summary.study_name != map_name(name, [str(a) for a in axes]):
            continue
        studies.append(study)
        grids.append({**sweep, "axes": {axis: sweep["axes"][axis] for axis in axes}})
        base = data
    if base is None:
        return None
    return parse_spec({**base, "name": name, "sweep": grids}, source=f"the stored spec of '{name}'"), studies


__all__ = [
    "REGIME_COLORS",
    "Verdict",
    "axis_findings",
    "cell_summary",
    "map_specs",
    "stored_maps",
    "sweep_frame",
    "sweep_info",
    "sweep_report_parts",
    "sweep_sections",
]
