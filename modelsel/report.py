"""Tables, seaborn plots and one self-contained HTML report, built from the storage alone.

Everything here reads an Optuna study (its trials and user attributes) and nothing
else, so ``modelsel report build NAME`` reproduces the report from the database.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import optuna
import pandas as pd
import seaborn as sns
from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from modelsel import __version__
from modelsel.figures import Figure, Section, figure_to_base64, format_table, loss_axis, plot_training_curves
from modelsel.regimes import (
    BLOWUP_RATIO,
    GRADIENT_FLOW_RATIO,
    THRASH_CROSS_ENTROPY,
    trial_blew_up,
    trial_gradient_flow,
)
from modelsel.results import (
    best_of_selections,
    best_trial,
    cell_score,
    cell_trials,
    objective_names,
    objective_text,
    pareto_front,
    pruned_causes,
    selected_params,
    selection_and_value,
    stored_fold_epochs,
    stored_folds,
    stored_spec,
    trial_fold_epochs,
)
from modelsel.spec import StudySpec, value_text
from modelsel.sweeps import sweep_report_parts, sweep_sections

_SUMMARY_ATTRS = (
    "val_metric_mean",
    "val_metric_std",
    "val_loss_mean",
    "val_loss_std",
    "train_metric_mean",
    "train_loss_mean",
    "n_params",
    "n_train",
    "fit_seconds",
    "fold_epochs",
    "regime",
    "pruned_at_epoch",
    "fail_reason",
)
#: The columns of :data:`_SUMMARY_ATTRS` that count something.
_COUNT_ATTRS = ("n_params", "n_train", "fold_epochs", "pruned_at_epoch")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, parameters, objective values, fold mean/std, timings;
    for several objectives also ``pareto``, whether the trial is on the Pareto front the
    selection picks from (:func:`~modelsel.results.pareto_front`)."""

    objectives = objective_names(study)
    several = len(study.directions) > 1
    front = {t.number for t in pareto_front(study)}
    folds = stored_folds(stored_spec(study))
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name.lower()}
        row.update({f"param_{k}": v for k, v in trial.params.items()})
        # Optuna keeps a pruned trial's last reported value; only complete trials have objective values.
        complete = trial.state == TrialState.COMPLETE and trial.values is not None
        values = trial.values if complete else [math.nan] * len(objectives)
        row.update({name: value for name, value in zip(objectives, values, strict=False)})
        if several:
            row["pareto"] = trial.number in front
        for key in _SUMMARY_ATTRS:
            row[key] = trial.user_attrs.get(key)
        if trial.state == TrialState.FAIL:
            # Stopped mid-training (Ctrl-C, SIGTERM, a killed worker): counted as the summary counts it.
            row["fold_epochs"] = trial_fold_epochs(trial, folds)
            row["fail_reason"] = row["fail_reason"] or "stopped before it finished (interrupted, or its process ended)"
        flow = trial_gradient_flow(trial.user_attrs)
        row["gradient_flow"], row["grad_ratio"] = flow if flow is not None else (None, None)
        row["duration_s"] = trial.duration.total_seconds() if trial.duration is not None else None
        rows.append(row)
    if not rows:  # keep the columns, so that a study without trials still reports
        pareto = ["pareto"] if several else []
        columns = ["trial", "state", *objectives, *pareto, *_SUMMARY_ATTRS, "gradient_flow", "grad_ratio", "duration_s"]
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    for column in _COUNT_ATTRS:
        # Counts stay integers where some trials lack them (pandas would write 3.0).
        if column in frame:
            with contextlib.suppress(TypeError, ValueError):  # not whole numbers: left as they are
                frame[column] = frame[column].astype("Int64")
    return frame


def warm_up() -> None:
    """Load what :func:`build_report` would load on first use: Optuna's importance
    evaluator (scikit-learn's trees) and matplotlib's fonts and PNG
    writer (one tiny figure is rendered and dropped). A process with a spare core calls
    it ahead of time (``--workers``, while the last trials finish); about 1 s."""
    import optuna.importance  # noqa: F401

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.set_title("warm-up")
    figure_to_base64(fig)


def _objective_label(objective: str) -> str:
    """What an objective's values are, for an axis label."""
    if objective.startswith("val_"):
        return f"CV {objective} (fold mean)"
    if objective == "fit_seconds":
        return "fit_seconds (all folds' training)"
    if objective == "n_params":
        return "n_params (model parameters)"
    return objective


def plot_history(study: optuna.Study, frame: pd.DataFrame) -> Figure | None:
    """Optimization history: each finished trial's first objective and the best so far.

    A pruned trial is drawn at the last fold-mean value it reported (the epoch it was
    stopped at); a completed trial whose training blew up is drawn apart and left out of
    the best so far, as the selection leaves it out.
    """
    objectives = objective_names(study)
    primary = objectives[0]
    done = frame[frame["state"] == "complete"].sort_values("trial")
    if done.empty or primary not in done:
        return None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    blown = done["trial"].map(lambda n: n in trials and trial_blew_up(trials[n].user_attrs)).astype(bool)
    kept = done[~blown]
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.scatterplot(data=done, x="trial", y=primary, ax=ax, label="trial", color="#4C72B0")
    if not kept.empty:
        best = kept[primary].cummax() if maximize else kept[primary].cummin()
        # Drawn on to the last trial, so that a later blown-up trial does not end the line early.
        steps = pd.concat([kept["trial"], done["trial"].iloc[-1:]], ignore_index=True)
        ax.step(steps, [*best, best.iloc[-1]], where="post", color="#DD8452", label="best so far")
    if blown.any():
        points = done.loc[blown]
        ax.scatter(points["trial"], points[primary], marker="D", color="#C44E52", label="blew up (not selected)")
    pruned = [
        (t.number, t.intermediate_values[t.last_step])
        for t in trials.values()
        if t.state == TrialState.PRUNED
        and t.last_step is not None
        # Diverged (its last value is from before the NaN) or stopped while blown up (a value
        # of 1e9 flattens every other): trial_blew_up says both.
        and not trial_blew_up(t.user_attrs)
        and math.isfinite(t.intermediate_values[t.last_step])
    ]
    caption = ""
    if pruned and len(study.directions) == 1 and primary.startswith("val_"):
        numbers, values = zip(*pruned, strict=True)
        ax.scatter(numbers, values, marker="x", color="grey", label="pruned (last reported)")
        caption = (
            "A pruned trial is drawn at the last fold-mean value it reported, at the epoch it was stopped "
            "(pruned trials that diverged or blew up are left out)."
        )
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers, not -0.04 ... 0.04
    ax.set_ylabel(_objective_label(primary))
    ax.legend(loc="best", fontsize=8)
    sns.despine(fig)
    return Figure("Optimization history", figure_to_base64(fig), caption)


def plot_pareto_front(study: optuna.Study) -> Figure | None:
    """For several objectives: the completed trials' first objective against their second,
    the Pareto front the selection picks from highlighted (a step line along the border of
    what it dominates, for two objectives) and the selected trial marked; None for one
    objective or before a trial completed."""
    if len(study.directions) < 2:
        return None
    objectives = objective_names(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    front = pareto_front(study)
    on_front = {t.number for t in front}
    blown = [t for t in complete if trial_blew_up(t.user_attrs)]
    blown_numbers = {t.number for t in blown}
    others = [t for t in complete if t.number not in on_front and t.number not in blown_numbers]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for trials, style in (
        (others, {"color": "#A0A0A0", "label": "dominated trial"}),
        (blown, {"marker": "D", "color": "#C44E52", "label": "blew up (not selected)"}),
        (front, {"color": "#4C72B0", "s": 40, "zorder": 3, "label": "Pareto front"}),
    ):
        if trials:
            ax.scatter([t.values[0] for t in trials], [t.values[1] for t in trials], **style)
    if len(objectives) == 2 and len(front) > 1:
        # In order of the first objective, best first: each step turns at the corner the two
        # neighbours both dominate, so the line bounds what the front dominates.
        ax.step([t.values[0] for t in front], [t.values[1] for t in front], where="post", color="#4C72B0", lw=1)
    if front:
        chosen = front[0]
        ax.scatter(
            [chosen.values[0]],
            [chosen.values[1]],
            marker="*",
            s=260,
            color="#DD8452",
            edgecolor="black",
            zorder=4,
            label=f"selected (trial {chosen.number})",
        )
    ax.set_xlabel(f"{_objective_label(objectives[0])}, {study.directions[0].name.lower()}d")
    ax.set_ylabel(f"{_objective_label(objectives[1])}, {study.directions[1].name.lower()}d")
    # Model sizes and times of a search can span orders of magnitude.
    ax.set_xscale(_spread_scale(objectives[0], [t.values[0] for t in complete]))
    ax.set_yscale(_spread_scale(objectives[1], [t.values[1] for t in complete]))
    ax.legend(loc="best", fontsize=8)
    sns.despine(fig)
    caption = (
        f"Each completed trial's {objectives[0]} against its {objectives[1]}. The Pareto front ({len(front)} "
        f"trial{'' if len(front) == 1 else 's'}; the pareto column of the trials table) holds the trials that no other "
        "completed trial matches or beats on every objective while beating on one; trials whose training blew up are "
        f"left out. The selected trial is the one on the front best on the first objective, {objectives[0]}."
    )
    if len(objectives) > 2:
        rest = ", ".join(objectives[2:])
        caption += (
            f" Only the first two of the {len(objectives)} objectives are plotted: a front trial that looks dominated "
            f"here is better on {rest}."
        )
    return Figure("Pareto front", figure_to_base64(fig), caption)


def _spread_scale(objective: str, values: Sequence[float]) -> str:
    """``log`` for a count or duration spanning two orders of magnitude or more, else ``linear``."""
    wide = min(values) > 0 and max(values) >= 100 * min(values)
    return "log" if objective in ("n_params", "fit_seconds") and wide else "linear"


def plot_importance(study: optuna.Study) -> Figure | str | None:
    """Parameter importances (Optuna's default evaluator) of the first objective; None when
    there is nothing to rank (under 3 complete trials, or no parameter varied), and a
    sentence saying why when the evaluator fails."""
    from modelsel.spec import SWEEP_SEED_PARAM

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = {k for t in complete for k in t.params if len({repr(u.params.get(k)) for u in complete}) > 1}
    varied.discard(SWEEP_SEED_PARAM)  # a sweep's repeat seed is noise, not a hyperparameter
    if len(complete) < 3 or not varied:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the evaluator warns on small studies; the plot says enough
            importances = optuna.importance.get_param_importances(
                study,
                params=sorted(varied),
                target=(lambda t: t.values[0]) if len(study.directions) > 1 else None,
            )
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        return f"Parameter importance could not be computed ({type(exc).__name__}: {exc})."
    if not importances:
        return None
    data = pd.DataFrame({"parameter": list(importances), "importance": list(importances.values())})
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(data) + 1.2))
    sns.barplot(data=data, y="parameter", x="importance", ax=ax, color="#4C72B0")
    ax.set_xlabel("importance for the first objective (Optuna's default evaluator)")
    ax.set_ylabel("")
    sns.despine(fig)
    return Figure(
        "Parameter importance",
        figure_to_base64(fig),
        "How much each searched parameter matters for the first objective over the completed trials "
        "(Optuna's default evaluator, PED-ANOVA: where the best trials' values concentrate); with few trials "
        "it says little.",
    )


def summary_section(study: optuna.Study, frame: pd.DataFrame) -> Section:
    """Counts, the selected trial, its CV score and the held-out test score."""
    section = Section("Summary")
    objectives = objective_names(study)
    counts = frame["state"].value_counts().to_dict() if not frame.empty else {}
    spent, cap = stored_fold_epochs(study)
    of_cap = f" of a budget of {cap}" if cap else ""
    compute = f" They trained {spent} fold-epochs (epochs × folds){of_cap}." if spent else ""
    diverged, invalid = pruned_causes(study.get_trials(deepcopy=False))
    kinds = [f"{diverged} of them diverged"] if diverged else []
    if invalid:
        kinds.append(f"{invalid} {'was an invalid configuration' if invalid == 1 else 'were invalid configurations'}")
    of_them = f" ({', '.join(kinds)})" if kinds else ""
    # Running: training now, or left so by a killed process (a later run marks it failed);
    # waiting: a grid cell queued again that a run has not taken yet.
    running = "".join(f", {counts[state]} {state}" for state in ("running", "waiting") if counts.get(state))
    section.paragraphs.append(
        f"{len(frame)} trial{'' if len(frame) == 1 else 's'}: "
        f"{counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned{of_them}, "
        f"{counts.get('fail', 0)} failed{running}.{compute} Objective{'s' if len(objectives) > 1 else ''}: "
        + ", ".join(f"{o} ({d.name.lower()})" for o, d in zip(objectives, study.directions, strict=False))
        + "."
    )
    selected = best_trial(study)
    if selected is None:
        blown = "Every completed trial blew up in training (regime diverged)"
        why = blown if counts.get("complete") else "No trial completed"
        section.paragraphs.append(f"{why}, so nothing was selected and the test split was not scored.")
        return section
    attrs = selected.user_attrs
    metric = attrs.get("metric_name", "accuracy")
    # A sweep cell with repeats is selected by its mean over seeds, and so is it scored here.
    cell = cell_trials(study, selected)
    pooled = f" over {len(cell)} seeds × folds" if len(cell) > 1 else ""
    objective_rows: list[tuple[str, Any]] = []
    if len(study.directions) > 1:
        objective_rows = [
            (f"objective {o}", objective_text(o, v)) for o, v in zip(objectives, selected.values, strict=True)
        ]
        front = pareto_front(study)
        section.paragraphs.append(
            f"With several objectives, the selected trial is the one on the Pareto front best on the first objective, "
            f"{objectives[0]}. The front holds the completed trials that no other completed trial matches or beats on "
            f"every objective while beating on one (trials whose training blew up left out): {len(front)} "
            f"trial{'' if len(front) == 1 else 's'} here (the Pareto front figure; the pareto column of the trials "
            "table)."
        )
    rows: list[tuple[str, Any]] = [
        ("selected trial", selected.number),
        *([("trials of the selected cell", ", ".join(str(t.number) for t in cell))] if len(cell) > 1 else []),
        *objective_rows,
        *[(f"param {k}", value_text(v)) for k, v in selected_params(study, selected).items()],
        (f"CV val {metric} (mean ± std{pooled})", _pm(*cell_score(cell, "val_metric"))),
        (f"CV val loss (mean ± std{pooled})", _pm(*cell_score(cell, "val_loss"))),
        (f"CV train {metric} (mean{pooled})", _num(cell_score(cell, "train_metric")[0])),
        ("parameters", attrs.get("n_params")),
        ("regime", attrs.get("regime", "")),
    ]
    test = study.user_attrs.get("test_result")
    if test and test.get("trial_number") == selected.number and "retrain_diverged" in test:
        why = f"not scored: the retrain on the whole training split diverged at {test['retrain_diverged']}"
        rows.append(("held-out test", why))
    elif test and test.get("trial_number") == selected.number and "test_not_finite" in test:
        rows.append(("held-out test", f"not finite: {test['test_not_finite']} (its training loss was finite)"))
    elif test and test.get("trial_number") == selected.number:
        rows += [
            (f"held-out test {test['metric_name']}", _num(test["test_metric"])),
            ("held-out test loss", _num(test["test_loss"])),
            ("retrained for epochs", test["epochs"]),
            ("test samples", test.get("n_test")),
        ]

    if test and test.get("trial_number") == selected.number and test.get("earlier_trials"):
        earlier = ", ".join(str(n) for n in test["earlier_trials"])
        rows.append(("test split also scored for", f"trials {earlier} (selected by earlier runs)"))
    section.tables.append(format_table(pd.DataFrame(rows, columns=["item", "value"]).astype({"value": str})))
    return section


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "—"


def _pm(mean: Any, std: Any) -> str:
    if not isinstance(mean, (int, float)):
        return "—"
    return f"{mean:.4f} ± {std:.4f}" if isinstance(std, (int, float)) else f"{mean:.4f}"


@dataclass
class ReportDraft:
    """A report without its summary, which holds the held-out test score: built from
    the finished trials alone, so that it can be drafted while the final retrain runs.
    Nothing is written until :func:`build_report`."""

    frame: pd.DataFrame
    #: The sections that follow the summary.
    sections: list[Section]
    #: The files beside ``report.html`` (``trials.csv``, a sweep's CSV and PNGs), by name.
    files: dict[str, bytes]


def draft_report(study: optuna.Study) -> ReportDraft:
    """Every part of a study's report but the summary (see :class:`ReportDraft`)."""

    frame = trials_frame(study)
    sections, files = sweep_report_parts(study)
    files["trials.csv"] = frame.to_csv(index=False).encode("utf-8")
    search = Section("Search")
    for figure in (plot_history(study, frame), plot_pareto_front(study), plot_importance(study)):
        if isinstance(figure, str):
            search.paragraphs.append(figure)
        elif figure is not None:
            search.figures.append(figure)
    selected = best_trial(study)
    if selected is not None:
        curves = plot_training_curves(selected, title=f"Training curves of the selected trial ({selected.number})")
        if curves is not None:
            search.figures.append(curves)
    if search.figures or search.paragraphs:
        sections.append(search)
    flow = gradient_flow_section(study, frame, selected=None if selected is None else selected.number)
    if flow is not None:
        sections.append(flow)
    table = Section("Trials", paragraphs=["Also written as trials.csv next to this report."], scroll_tables=True)
    table.tables.append(format_table(frame))
    sections.append(table)
    return ReportDraft(frame, sections, files)


def gradient_flow_section(study: optuna.Study, frame: pd.DataFrame, *, selected: int | None) -> Section | None:
    """Counts of vanishing, healthy and exploding gradients (:func:`modelsel.regimes.gradient_flow`)
    and the first epoch's gradient norm of each layer for the selected trial and the
    trials furthest either way; None when no trial has hidden layers and gradients."""
    labelled = frame[frame["gradient_flow"].notna()] if "gradient_flow" in frame else frame.iloc[0:0]
    if labelled.empty:
        return None
    counts = labelled["gradient_flow"].value_counts()
    ratio = f"{GRADIENT_FLOW_RATIO:g}"
    text = (
        f"At the first batch of the first epoch (fold mean), before any update, a first layer that receives a "
        f"gradient (the loss's gradient with respect to the layer's output) more than {ratio}× smaller than the "
        f"output layer's is labelled vanishing (it barely learns: deep sigmoid nets, or deep nets whose initial "
        f"weights shrink the signal layer by layer, as PyTorch's default init does for deep ReLU and tanh nets), "
        f"more than {ratio}× larger exploding: how the gradient flows back through the initialized net. (Trials "
        f"stored before modelsel recorded that signal are judged by their weight gradients.) A trial whose "
        f"training blew up (a NaN or inf loss, a cross-entropy above 1000 it did not recover from, or a training "
        f"loss that ended {BLOWUP_RATIO:g}× above its first epoch's), whose updates left it without any gradient "
        f"(every hidden layer's 0 at a later epoch: its ReLUs died), or that ended with a training cross-entropy above "
        f"{THRASH_CROSS_ENTROPY:g} is labelled exploding whatever that ratio: its updates exploded (a learning rate "
        f"too large; clipping or a smaller rate tames it). Of {len(labelled)} trials: "
        + ", ".join(f"{int(counts.get(label, 0))} {label}" for label in ("vanishing", "healthy", "exploding"))
        + ". trials.csv has each trial's label (gradient_flow) and first/output ratio (grad_ratio)."
    )
    section = Section("Gradient flow", paragraphs=[text])
    by_ratio = labelled.sort_values("grad_ratio", kind="stable")["trial"].astype(int).tolist()
    picks = {by_ratio[0]: "smallest ratio"}
    picks.setdefault(by_ratio[-1], "largest ratio")
    if selected is not None and selected in set(labelled["trial"]):
        picks = {selected: "selected", **{n: why for n, why in picks.items() if n != selected}}
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}

    def first_batch(number: int) -> tuple[tuple[str, Any], ...]:
        norms = _drawn_norms(trials[number].user_attrs)
        return tuple(sorted((layer, values[0] if values else None) for layer, values in norms.items()))

    if len(picks) > 1 and len({first_batch(n) for n in picks}) == 1:
        # One net at init for all (an lr or clipping sweep): one line, not several over each other.
        picks = dict([next(iter(picks.items()))])
        section.paragraphs[0] += (
            " The trials drawn start from the same initialized net (a sweep of the learning rate or clipping), so "
            "the figure draws one of them; where the updates exploded shows in the labels."
        )
    flows = dict(zip(labelled["trial"].astype(int), labelled["gradient_flow"], strict=True))
    names = {number: f"trial {number} ({why}, {flows[number]})" for number, why in picks.items()}
    panels = [("preactivation_grad_norms", "gradient at the layer's output"), ("grad_norms", "weight-gradient norm")]
    panels = [(attr, label) for attr, label in panels if any(attr in trials[n].user_attrs for n in picks)]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 if len(panels) == 1 else 10, 3.6), squeeze=False)
    handles: dict[int, Any] = {}
    for ax, (attr, label) in zip(axes[0], panels, strict=True):
        # One colour per trial in both panels (a trial stored before the backward signal
        # was recorded is missing from the left one).
        for colour, number in enumerate(picks):
            norms = trials[number].user_attrs.get(attr)
            if not norms:
                continue
            # From the input: hidden1, hidden2, ..., output (nets of different depths share the left end).
            hidden = sorted((k for k in norms if k != "output"), key=lambda k: int(k.removeprefix("hidden")))
            layers = [*hidden, "output"]
            values = [float(norms[layer][0]) for layer in layers]
            (handles[number],) = ax.plot(
                range(1, len(layers) + 1), values, marker="o", color=f"C{colour}", label=names[number]
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.set_xlabel("linear layer from the input (lines end at the output layer)")
        ax.set_ylabel(f"{label}, epoch 1")
    # One legend with every trial drawn in either panel, in the order of the picks.
    shown = [number for number in picks if number in handles]
    axes[0][-1].legend([handles[n] for n in shown], [names[n] for n in shown], loc="best", fontsize=8)
    sns.despine(fig)
    fig.tight_layout()
    caption = (
        "Left: the loss's gradient with respect to each linear layer's output, what the label compares; right: "
        "each layer's weight gradient, that signal times the layer's input."
        if len(panels) == 2
        else ""
    )
    section.figures.append(Figure("Gradient norm per layer", figure_to_base64(fig), caption))
    per_epoch = plot_first_layer_gradient_per_epoch(trials, flows, picks)
    if per_epoch is not None:
        section.figures.append(per_epoch)
    return section


#: Trials whose updates exploded that the per-epoch gradient figure adds to the picks.
_EXPLODED_SHOWN = 2


def _drawn_norms(attrs: dict[str, Any]) -> dict[str, list[Any]]:
    """The per-layer norms the gradient figures draw of a trial: its backward signal, or its
    weight gradients if it was stored before modelsel recorded that signal."""
    norms: dict[str, list[Any]] = attrs.get("preactivation_grad_norms") or attrs.get("grad_norms") or {}
    return norms


def plot_first_layer_gradient_per_epoch(
    trials: dict[int, FrozenTrial], flows: dict[int, str], picks: dict[int, str]
) -> Figure | None:
    """The gradient reaching the first hidden layer at the first batch of every epoch, for
    the picked trials and up to two whose updates exploded (whose first batch looks like
    any other's): a blow-up climbs, a net whose units died stops short (a norm of 0, or
    not finite, has no place on a log axis). ``flows``: each labelled trial's gradient
    flow. None when no trial trained two epochs."""
    shown = dict(picks)
    exploding = [number for number, flow in flows.items() if flow == "exploding" and number not in shown]
    for number in exploding[:_EXPLODED_SHOWN]:
        shown[number] = "updates exploded"
    curves = {n: [float(v) for v in _drawn_norms(trials[n].user_attrs).get("hidden1") or []] for n in shown}
    if max((len(curve) for curve in curves.values()), default=0) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    gone: list[tuple[int, str]] = []  # (epoch, colour) of each 0 or non-finite norm
    for colour, (number, why) in enumerate(shown.items()):
        curve = curves[number]
        if not curve:
            continue
        values = [v if math.isfinite(v) and v > 0 else math.nan for v in curve]
        gone += [(epoch, f"C{colour}") for epoch, v in enumerate(values, start=1) if math.isnan(v)]
        name = f"trial {number} ({why}, {flows[number]})"
        ax.plot(range(1, len(values) + 1), values, marker="o", color=f"C{colour}", label=name)
    finite = [v for curve in curves.values() for v in curve if math.isfinite(v) and v > 0]
    loss_axis(ax, pd.Series(finite or [1.0]))
    if gone:  # drawn on the axis's floor, where a log axis has no place for them
        floor = ax.get_ylim()[0]
        for epoch, colour_name in gone:
            ax.plot([epoch], [floor], marker="x", markersize=9, color=colour_name, clip_on=False, linestyle="none")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("gradient at the first layer")
    ax.legend(loc="best", fontsize=8)
    sns.despine(fig)
    return Figure(
        "Gradient at the first layer per epoch",
        figure_to_base64(fig),
        "At the first batch of each epoch (fold mean): the loss's gradient with respect to the first hidden layer's "
        "output (its weight gradient for trials stored before that was recorded). An × on the axis's floor: that "
        "epoch's gradient was 0 (no gradient: its units died) or not finite.",
    )


#: Figure files whose names depend on the trials or axes a build shows: one left by an
#: earlier build of the same folder is removed.
_NUMBERED_FIGURES = ("training_curves_trial*.png", "validation_curve_*.png", "learning_curve_*.png")


def build_report(study: optuna.Study, *, output_dir: str | Path, draft: ReportDraft | None = None) -> Path:
    """Write ``trials.csv`` and a self-contained ``report.html`` for a study.

    Parameters
    ----------
    study
        A study loaded from its storage.
    output_dir
        The study's report folder (created if missing).
    draft
        The report drafted from the same finished trials (:func:`draft_report`), when
        it was drafted earlier; drafted now when omitted.

    Returns
    -------
    Path
        The HTML report.
    """

    if draft is None:
        draft = draft_report(study)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for name, content in draft.files.items():
        (output / name).write_bytes(content)
    for pattern in _NUMBERED_FIGURES:  # an earlier build's, for another best trial or axis
        for stale in output.glob(pattern):
            if stale.name not in draft.files:
                stale.unlink()
    sections = [summary_section(study, draft.frame), *draft.sections]
    spec = stored_spec(study)
    environment = Environment(loader=PackageLoader("modelsel", "templates"), autoescape=select_autoescape())
    html = environment.get_template("report.html").render(
        study_name=study.study_name,
        description=spec.get("description", ""),
        sections=sections,
        spec_yaml=spec_yaml_text(spec),
        generated=time.strftime("%Y-%m-%d %H:%M"),
        version=__version__,
        devices=trained_on([study]),
    )
    path = output / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path


def trained_on(studies: Sequence[optuna.Study]) -> list[str]:
    """The devices the studies' trials trained on, for the report's header."""
    return sorted({str(t.user_attrs["device"]) for s in studies for t in s.trials if "device" in t.user_attrs})


def spec_yaml_text(spec: dict[str, Any]) -> str:
    """The spec as YAML for the report, the storage URL's password hidden."""
    import yaml

    from modelsel.storage import redact

    if not spec:
        return ""
    if isinstance(spec.get("storage"), str):
        spec = {**spec, "storage": redact(spec["storage"])}
    return yaml.safe_dump(spec, sort_keys=False)


def build_maps_report(spec: StudySpec, studies: Sequence[optuna.Study], *, output_dir: str | Path) -> Path:
    """One HTML report with the findings and plots of every grid of a multi-grid sweep."""
    import time

    from jinja2 import Environment, PackageLoader, select_autoescape

    from modelsel import __version__
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = Section(
        "Maps",
        paragraphs=[
            f"This sweep lists {len(studies)} grids; each ran as its own study in the same storage: "
            + ", ".join(s.study_name for s in studies)
            + ". Each study's own report (with sweep.csv) is in the folder of that name."
        ],
    )
    selections = [selection_and_value(s) for s in studies]
    objective = objective_names(studies[0])[0] if studies else "value_0"
    values = [None if s is None else s[1] for s in selections]
    best = best_of_selections(values, studies[0].directions[0]) if studies else None
    if best is not None:
        trial, value = selections[best]  # type: ignore[misc]
        params = ", ".join(f"{k}={value_text(v)}" for k, v in selected_params(studies[best], trial).items())
        maps.paragraphs.append(
            f"Across the maps the best selection is {studies[best].study_name}'s trial {trial.number} ({params}): "
            f"{objective} {objective_text(objective, value)}. Each map's summary below scores its own selection "
            "on the held-out test split; the maps may differ in what they hold fixed, so compare them with that "
            "in mind."
        )
    sections: list[Section] = [maps]
    for study in studies:
        frame = trials_frame(study)
        summary = summary_section(study, frame)
        summary.title = f"{study.study_name}: summary"
        sections.append(summary)
        for section in sweep_sections(study):
            section.title = f"{study.study_name}: {section.title.lower()}"
            sections.append(section)
        selected = best_trial(study)
        flow = gradient_flow_section(study, frame, selected=None if selected is None else selected.number)
        if flow is not None:
            flow.title = f"{study.study_name}: gradient flow"
            sections.append(flow)
    environment = Environment(loader=PackageLoader("modelsel", "templates"), autoescape=select_autoescape())
    html = environment.get_template("report.html").render(
        study_name=spec.name,
        description=spec.description,
        sections=sections,
        spec_yaml=spec_yaml_text(json.loads(spec.to_json())),
        generated=time.strftime("%Y-%m-%d %H:%M"),
        version=__version__,
        devices=trained_on(studies),
    )
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
