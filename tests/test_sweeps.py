"""Tests of sweeps: grid coverage and resume, tables and plots from storage alone,
several grids in one spec, the image cases and D2L's polynomial example end to end."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import statistics
import time
import types
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import files_under
from optuna.trial import TrialState

from modelsel.cli import main
from modelsel.errors import UserError
from modelsel.regimes import classify, numbers_from_attrs
from modelsel.report import build_maps_report, build_report, draft_report, summary_section, trials_frame
from modelsel.results import FINISHED_STATES, best_trial
from modelsel.spec import load_spec, parse_spec
from modelsel.study import (
    StudyOutcome,
    _best_outcome,
    _open_study,
    _optimize,
    combine_map_outcomes,
    preflight,
    run_study,
    run_sweep_maps,
    summarize,
)
from modelsel.sweeps import (
    axis_findings,
    cell_summary,
    csv_frame,
    map_specs,
    plot_regime_map,
    plot_validation_curve,
    selected_trials,
    sweep_frame,
)

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]

#: 2 × 2 cells × 2 seeds = 8 trials of a tiny synthetic study (200 samples, 2 folds, 2 epochs).
GRID = {"width": [2, 8], "weight_decay": [0, 0.001], "repeats": 2}


def tiny_spec_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "dataset": {"name": "synthetic-classification", "n_samples": 200, "n_features": 8,
                    "n_informative": 4, "n_redundant": 0, "n_classes": 2},
        "model": {"depth": 1, "width": 8},
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.01},
        "cv": {"folds": 2},
    }
    data.update(changes)
    return data


def sweep_spec(name: str = "grid", **changes: Any) -> Any:
    return parse_spec(tiny_spec_data(name=name, sweep=GRID, **changes))


def cells(study: optuna.Study) -> list[tuple[Any, ...]]:
    trials = study.get_trials(deepcopy=False, states=FINISHED_STATES)
    return sorted((t.params["width"], t.params["weight_decay"], t.params["seed"]) for t in trials)


EXPECTED = sorted((w, d, s) for w in (2, 8) for d in (0, 0.001) for s in (0, 1))


def test_grid_covers_every_cell_once_and_resumes_without_redoing_cells(tmp_path: Path) -> None:
    spec = sweep_spec()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    task = preflight(spec)
    # An interrupted first run: 3 of the 8 cells finished.
    study = _open_study(spec, url, create_parent=False, task=task)
    _optimize(study, spec, target=3, timeout=None, device=CPU)
    first = cells(study)
    assert len(first) == 3 and len(set(first)) == 3
    outcome = run_study(spec, storage=url, output_dir=tmp_path, progress=False, build_report=False)
    assert outcome.n_trained_this_run == 5
    study = optuna.load_study(study_name="grid", storage=url)
    assert cells(study) == EXPECTED  # every cell × seed exactly once
    assert set(first) <= set(cells(study))
    again = run_study(spec, storage=url, output_dir=tmp_path, progress=False, build_report=False)
    assert again.n_trained_this_run == 0
    assert len(optuna.load_study(study_name="grid", storage=url).trials) == 8
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        assert trial.user_attrs["regime"] in ("underfit", "good", "overfit")
        assert trial.user_attrs["regime_reason"]
        assert "gap" in trial.user_attrs["regime_evidence"]
        assert trial.user_attrs["baseline_error"] == pytest.approx(0.5, abs=0.05)


def test_tables_and_plots_come_from_the_storage_alone(tmp_path: Path) -> None:
    spec = sweep_spec(name="alone")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run_study(spec, storage=url, output_dir=tmp_path / "run", progress=False, build_report=False)
    fresh = optuna.load_study(study_name="alone", storage=url)
    out = tmp_path / "rebuilt"
    report = build_report(fresh, output_dir=out)
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 8
    for column in ("width", "weight_decay", "seed", "train_error", "train_error_std", "val_error",
                   "val_error_std", "gap", "regime", "sweep_regime", "best_cell"):
        assert column in table
    assert table["sweep_regime"].isin(["underfit", "good", "overfit", "diverged"]).all()
    assert (table["gap"] == table["val_error"] - table["train_error"]).all() or \
        ((table["gap"] - (table["val_error"] - table["train_error"])).abs() < 1e-9).all()
    assert table.groupby(["width", "weight_decay"])["best_cell"].all().sum() == 1
    names = {p.name for p in out.iterdir()}
    assert {"validation_curve_width.png", "validation_curve_weight_decay.png", "regime_map.png",
            "weights.png"} <= names
    assert any(n.startswith("training_curves_trial") for n in names)
    html = report.read_text(encoding="utf-8")
    for text in ("Sweep findings", "Along width", "Along weight_decay", "Regime map", "Weight size"):
        assert text in html
    # The frame is the same however often it is rebuilt.
    again = sweep_frame(optuna.load_study(study_name="alone", storage=url))
    assert list(again["trial"]) == list(table["trial"])


def test_a_report_drafted_before_the_test_score_is_the_report_built_after(tmp_path: Path) -> None:
    # --workers drafts the report (all but its summary) while a worker still retrains,
    # before the test score is stored; the report must not depend on when it was drafted.
    spec = sweep_spec(name="draft")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run_study(spec, storage=url, output_dir=tmp_path / "run", progress=False, build_report=False)
    study = optuna.load_study(study_name="draft", storage=url)
    test_result = study.user_attrs["test_result"]
    study.set_user_attr("test_result", None)
    before = sorted(tmp_path.rglob("*"))
    draft = draft_report(study)
    assert sorted(tmp_path.rglob("*")) == before  # a draft writes nothing
    assert {"sweep.csv", "trials.csv", "regime_map.png"} <= set(draft.files)
    study.set_user_attr("test_result", test_result)
    drafted = build_report(study, output_dir=tmp_path / "drafted", draft=draft).parent
    built = build_report(study, output_dir=tmp_path / "built").parent
    assert sorted(p.name for p in drafted.iterdir()) == sorted(p.name for p in built.iterdir())
    for path in built.iterdir():
        other = drafted / path.name
        if path.name == "report.html":
            stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d"
            texts = [re.sub(stamp, "", p.read_text(encoding="utf-8")) for p in (path, other)]
            assert texts[0] == texts[1]
            assert f"{test_result['test_metric']:.4f}" in texts[0]
        else:
            assert path.read_bytes() == other.read_bytes(), path.name


def test_a_multi_grid_sweep_names_the_map_whose_best_cell_is_best_over_its_seeds() -> None:
    # Map "lucky"'s best cell has the better first seed (0.93 against 0.89) but averages
    # 0.86; map "steady"'s best cell averages 0.90, so steady is the sweep's best map.
    def stored(name: str, values: dict[tuple[int, int], float]) -> optuna.Study:
        study = optuna.create_study(study_name=name, direction="maximize")
        study.set_user_attr("objectives", ["val_accuracy"])
        distributions = {
            "width": optuna.distributions.CategoricalDistribution([2, 8]),
            "seed": optuna.distributions.CategoricalDistribution([0, 1]),
        }
        for (width, seed), value in values.items():
            params = {"width": width, "seed": seed}
            folds = {"fold_val_metric": [value - 0.01, value + 0.01], "metric_name": "accuracy"}
            study.add_trial(
                optuna.trial.create_trial(params=params, distributions=distributions, value=value, user_attrs=folds)
            )
        return study

    lucky = stored("lucky", {(2, 0): 0.80, (2, 1): 0.70, (8, 0): 0.93, (8, 1): 0.79})
    steady = stored("steady", {(2, 0): 0.89, (2, 1): 0.91, (8, 0): 0.70, (8, 1): 0.72})
    outcomes = [summarize(lucky, "memory"), summarize(steady, "memory")]
    assert outcomes[0].best_params == {"width": 8}  # the cell, not one seed of it
    assert outcomes[0].selection_value == pytest.approx(0.86)
    # Selected by the cell's mean over seeds, scored by it too: not seed 0's 0.93 ± 0.014.
    assert outcomes[0].cell_seeds == 2
    assert outcomes[0].cv_mean == pytest.approx(0.86)
    assert outcomes[0].cv_std == pytest.approx(statistics.stdev([0.92, 0.94, 0.78, 0.80]))
    summary = summary_section(lucky, trials_frame(lucky)).tables[0]
    assert "CV val accuracy (mean ± std over 2 seeds × folds)" in summary and "0.8600 ± 0.0816" in summary
    assert "param seed" not in summary
    assert outcomes[1].selection_value == pytest.approx(0.90)
    assert _best_outcome(outcomes).study_name == "steady"
    assert _best_outcome(outcomes[::-1]).study_name == "steady"


def test_maps_of_studies_without_stored_objectives_are_ranked_in_the_studies_direction(tmp_path: Path) -> None:
    # Without the "objectives" attribute the first objective is named value_0, and the
    # direction read from that name was always minimize: the worse map was named best.
    def stored(name: str, width: int, value: float) -> optuna.Study:
        study = optuna.create_study(study_name=name, direction="maximize")
        distributions = {"width": optuna.distributions.CategoricalDistribution([2, 8])}
        study.add_trial(optuna.trial.create_trial(params={"width": width}, distributions=distributions, value=value))
        return study

    studies = [stored("worse", 2, 0.6), stored("better", 8, 0.9)]
    combined = combine_map_outcomes("maps", [summarize(study, "memory") for study in studies])
    assert combined.study_name == "maps [2 maps; best: better]"
    assert combined.selection_value == 0.9
    spec = parse_spec(tiny_spec_data(name="maps", sweep=[{"width": [2, 8]}, {"lr": [0.01, 0.1]}]))
    html = build_maps_report(spec, studies, output_dir=tmp_path).read_text(encoding="utf-8")
    assert "Across the maps the best selection is better&#39;s trial 0 (width=8): value_0 0.9." in html


def test_parameter_importance_leaves_out_the_repeat_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    # The seed of a sweep's repeats ranked as the second most important "hyperparameter".
    from modelsel.report import plot_importance

    study = optuna.create_study(direction="maximize")
    distributions = {
        "width": optuna.distributions.CategoricalDistribution([2, 8]),
        "seed": optuna.distributions.CategoricalDistribution([0, 1]),
    }
    for (width, seed), value in {(2, 0): 0.8, (2, 1): 0.7, (8, 0): 0.9, (8, 1): 0.85}.items():
        params = {"width": width, "seed": seed}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    asked: list[Any] = []

    def importances(study: optuna.Study, *, params: Any = None, **options: Any) -> dict[str, float]:
        asked.append(params)
        return {"width": 1.0}

    monkeypatch.setattr(optuna, "importance", types.SimpleNamespace(get_param_importances=importances))
    assert plot_importance(study) is not None
    assert asked == [["width"]]


@pytest.mark.parametrize(
    "bad",
    [
        {"pruner": {"name": "median", "options": {"foo": 1}}},
        {"pruner": {"name": "hyperband", "options": {"max_resource": 0}}},
    ],
)
def test_bad_input_to_a_list_of_grids_writes_nothing(tmp_path: Path, bad: dict[str, Any]) -> None:
    data = tiny_spec_data(name="maps")
    data["sweep"] = [{"width": [2, 8]}, {"train_size": [60, 160]}]
    data.update(bad)
    with pytest.raises(UserError):
        run_study(parse_spec(data), output_dir=tmp_path / "reports", progress=False)
    assert files_under(tmp_path) == []


def test_a_changed_later_grid_fails_before_an_earlier_grid_trains(fast_tmp: Path) -> None:
    # The stored-spec check ran per grid: the first grid trained its remaining cells and
    # rewrote its report before the second grid's change was refused.
    data = tiny_spec_data(name="maps")
    data.pop("budget", None)
    data["sweep"] = [{"width": [2, 8]}, {"lr": [0.01, 0.1]}]
    reports = fast_tmp / "reports"
    run_study(parse_spec(data), output_dir=reports, n_trials=1, progress=False, build_report=False)
    data["sweep"][1] = {"lr": [0.01, 0.2]}
    with pytest.raises(UserError, match=r"study 'maps-lr' .* was created from a different spec \(differs in: sweep"):
        run_study(parse_spec(data), output_dir=reports, progress=False, build_report=False)
    storage = optuna.storages.RDBStorage(f"sqlite:///{reports}/maps/study.db")
    assert len(optuna.load_study(study_name="maps-width", storage=storage).trials) == 1


def test_the_grids_of_a_list_share_the_timeout_of_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelsel.study

    given: list[float] = []

    def a_grid_that_searches_half_a_second(spec: Any, **options: Any) -> StudyOutcome:
        given.append(options["timeout"])
        time.sleep(0.5)
        return StudyOutcome(spec.name, "sqlite://", ["val_accuracy"], 0, 0, 0)

    monkeypatch.setattr(modelsel.study, "run_study", a_grid_that_searches_half_a_second)
    data = tiny_spec_data(name="maps")
    data["sweep"] = [{"width": [2, 8]}, {"train_size": [60, 160]}, {"lr": [0.01, 0.1]}]
    run_sweep_maps(parse_spec(data), storage=None, output_dir=tmp_path, timeout=0.8, build_report=False)
    assert given[0] == pytest.approx(0.8, abs=0.05)
    assert 0 < given[1] <= 0.3  # what the first grid left
    assert 0 < given[2] < 1e-3  # none left: the grid starts no trial, and still reports what it holds


def test_a_multi_objective_sweep_map_is_ranked_by_the_value_its_selection_used() -> None:
    # Several objectives select the Pareto trial best on its own first value, not a cell mean.
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["val_accuracy", "n_params"])
    distributions = {
        "width": optuna.distributions.CategoricalDistribution([2, 8]),
        "seed": optuna.distributions.CategoricalDistribution([0, 1]),
    }
    for (width, seed), values in {(8, 0): [0.95, 80], (8, 1): [0.55, 80], (2, 0): [0.8, 20], (2, 1): [0.8, 20]}.items():
        params = {"width": width, "seed": seed}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=values))
    outcome = summarize(study, "memory")
    assert outcome.best_params == {"width": 8, "seed": 0}
    assert outcome.selection_value == 0.95


def test_a_list_of_grids_runs_one_resumable_study_per_grid(tmp_path: Path) -> None:
    data = tiny_spec_data(name="maps")
    data["sweep"] = [{"width": [2, 8], "weight_decay": [0, 0.01]}, {"width": [2, 8], "train_size": [60, 160]}]
    spec = parse_spec(data)
    assert [s.name for s in map_specs(spec)] == ["maps-width-x-weight_decay", "maps-width-x-train_size"]
    outcome = run_study(spec, output_dir=tmp_path, progress=False)
    assert outcome.n_complete == 8 and outcome.n_trained_this_run == 8
    assert outcome.fold_epochs == 8 * 2 * 2  # both maps' trials (2 epochs x 2 folds each), not one map's
    url = f"sqlite:///{(tmp_path / 'maps' / 'study.db').resolve()}"
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(url))
    assert names == ["maps-width-x-train_size", "maps-width-x-weight_decay"]
    assert outcome.report_path == tmp_path / "maps" / "report.html"
    html = outcome.report_path.read_text(encoding="utf-8")
    assert "maps-width-x-train_size: sweep findings" in html and "maps-width-x-weight_decay: sweep plots" in html
    # It names the selection the run printed, as the best across the maps.
    best_map = re.search(r"best: ([\w-]+)\]", outcome.study_name)
    assert best_map is not None
    expected = f"Across the maps the best selection is {best_map.group(1)}&#39;s trial {outcome.best_trial_number} ("
    assert expected in html
    assert (tmp_path / "maps-width-x-train_size" / "sweep.csv").exists()
    assert (tmp_path / "maps-width-x-train_size" / "learning_curve_train_size.png").exists()
    again = run_study(spec, output_dir=tmp_path, progress=False, build_report=False)
    assert again.n_trained_this_run == 0
    # The combined report is rebuilt from (a copy of) the storage alone.
    copy = tmp_path / "copy.db"
    source, target = sqlite3.connect(tmp_path / "maps" / "study.db"), sqlite3.connect(copy)
    with contextlib.closing(source), contextlib.closing(target):
        source.backup(target)  # with what is still in the write-ahead log
    command = ["report", "build", "maps", "--storage", f"sqlite:///{copy}", "--output", str(tmp_path / "rebuilt")]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    rebuilt = tmp_path / "rebuilt" / "maps" / "report.html"
    # Each map's folder first (its trials.csv and sweep.csv, which an upgrade may change), then all maps.
    maps = ("maps-width-x-weight_decay", "maps-width-x-train_size")
    map_reports = [tmp_path / "rebuilt" / name / "report.html" for name in maps]
    assert result.output == "".join(f"Report: {path}\n" for path in [*map_reports, rebuilt])
    assert (tmp_path / "rebuilt" / "maps-width-x-train_size" / "sweep.csv").is_file()
    assert "maps-width-x-train_size: gradient flow" in rebuilt.read_text(encoding="utf-8")

    def comparable(path: Path) -> str:  # without the time stamp
        return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d", "", path.read_text(encoding="utf-8"))

    # The same storage line (the run's spec said null, the rebuilt one the URL) and devices.
    assert comparable(rebuilt) == comparable(outcome.report_path)
    assert f"storage: {url}" in html and "trained on cpu" in html
    # `study show` names the sweep as `study run` printed it, the maps' counts summed.
    shown = CliRunner().invoke(main, ["study", "show", "maps", "--output", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert f"maps [2 maps; best: {outcome.study_name.split('best: ')[1]}" in shown.output
    assert "8 trials finished (8 complete" in shown.output


def test_the_best_cell_is_averaged_over_seeds_and_a_pruned_seed_is_not_counted() -> None:
    # Width 64's first seed is the best single trial; width 16 is better over its seeds.
    frame = pd.DataFrame(
        {
            "width": [16, 16, 64, 64, 256],
            "seed": [0, 1, 0, 1, 0],
            "trial": [3, 1, 0, 2, 4],
            "val_error": [0.10, 0.09, 0.05, 0.20, None],
            "train_error": [0.05, 0.05, 0.01, 0.01, None],
            "gap": [0.05, 0.04, 0.04, 0.19, None],
            "sweep_regime": ["good", "good", "good", "overfit", "diverged"],
        }
    )
    assert selected_trials(frame, ["width"])[0] == (3, "best cell")  # width 16, its first seed
    # A tie goes to the cell of the earliest trial (width 64 holds trial 0), as best_trial's does.
    tied = frame.assign(val_error=[0.125, 0.0625, 0.03125, 0.15625, None])  # exact means: 0.09375 each
    assert selected_trials(tied, ["width"])[0] == (0, "best cell")
    frame["fold_val_errors"] = [[v] for v in frame["val_error"]]
    frame["fold_train_errors"] = [[v] for v in frame["train_error"]]
    frame["regime"], frame["best_cell"] = frame["sweep_regime"], False
    assert cell_summary(frame, ["width"])["seeds"].tolist() == [2, 2, 0]


def test_a_kept_own_label_on_the_other_side_of_the_best_cell_is_explained() -> None:
    # Fashion-MNIST, 1,000 images: width 16 overfits by its own gap, yet it has less
    # capacity than the best cell (width 512); the finding listed it as "overfits" with
    # a closing sentence that said less capacity means underfit.
    frame = pd.DataFrame(
        {
            "width": [4, 16, 512],
            "trial": [0, 1, 2],
            "error": ["error"] * 3,
            "val_error": [0.40, 0.238, 0.188],
            "train_error": [0.35, 0.182, 0.042],
            "gap": [0.05, 0.056, 0.146],
            "regime": ["underfit", "overfit", "overfit"],
            "sweep_regime": ["underfit", "overfit", "overfit"],
            "excess_from": [None] * 3,
            "best_cell": [False, False, True],
        }
    )
    frame["fold_val_errors"] = [[v] for v in frame["val_error"]]
    frame["fold_train_errors"] = [[v] for v in frame["train_error"]]
    (finding,) = axis_findings(frame, ["width"], [])
    assert finding.endswith(
        "Note: at width=16 the model overfits by its own numbers (gap 0.056) though it has less capacity than "
        "the best cell; the best cell's training error is lower (0.042 vs 0.182)."
    )
    assert "width=4 the model underfits by its own" not in finding  # its label and side agree
    # A shallower net may fit its training data better than the best cell: say so, not the opposite.
    frame[["train_error", "gap"]] = [[0.35, 0.05], [0.01, 0.228], [0.042, 0.146]]
    (finding,) = axis_findings(frame, ["width"], [])
    assert finding.endswith(
        "at width=16 the model overfits by its own numbers (gap 0.228) though it has less capacity than "
        "the best cell; its training error is lower than the best cell's too (0.01 vs 0.042)."
    )


def _stored_sweep(trials: list[tuple[int, int, float, str]]) -> optuna.Study:
    """An in-memory sweep study over width (repeats 2): (width, seed, val accuracy, kind)
    per trial, kind ``fine``, ``blown`` (a cross-entropy blow-up at chance) or ``pruned``."""
    spec = parse_spec(tiny_spec_data(sweep={"width": [4, 8], "repeats": 2}))
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("spec_full", spec.to_json())
    distributions = {
        "width": optuna.distributions.CategoricalDistribution([4, 8]),
        "seed": optuna.distributions.CategoricalDistribution([0, 1]),
    }
    for width, seed, accuracy, kind in trials:
        params = {"width": width, "seed": seed}
        if kind == "pruned":
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.PRUNED, params=params, distributions=distributions, intermediate_values={1: accuracy}
            ))
            continue
        train = 0.1 if kind == "blown" else accuracy
        curve = [4.2e6, 32.3] if kind == "blown" else [0.7, 0.3]
        attrs = {
            "metric_name": "accuracy", "baseline_error": 0.9, "train_metric_mean": train, "val_metric_mean": accuracy,
            "fold_train_metric": [train, train], "fold_val_metric": [accuracy, accuracy],
            "curves": {"train_loss": curve, "val_loss": curve},
        }
        numbers = numbers_from_attrs(attrs)
        assert numbers is not None
        verdict = classify(numbers)
        attrs.update(regime=verdict.regime, regime_evidence=verdict.evidence)
        study.add_trial(optuna.trial.create_trial(
            value=accuracy, params=params, distributions=distributions, user_attrs=attrs
        ))
    return study


def test_the_best_cell_follows_the_selections_rules() -> None:
    # A blown-up seed counts in its cell's mean; the report's "best cell" curves show the
    # seed the cell is retrained from, not the blown-up one.
    study = _stored_sweep([(4, 0, 0.5, "fine"), (4, 1, 0.5, "fine"), (8, 0, 0.45, "blown"), (8, 1, 0.95, "fine")])
    frame = sweep_frame(study)
    chosen = best_trial(study)
    assert chosen is not None and chosen.params == {"width": 8, "seed": 1}
    assert set(frame.loc[frame["best_cell"], "width"]) == {8}
    assert selected_trials(frame, ["width"])[0] == (3, "best cell")
    assert "_selectable" not in csv_frame(frame)
    # A cell of a blown-up seed and a pruned one cannot be selected: no star for it.
    study = _stored_sweep([(4, 0, 0.3, "fine"), (8, 0, 0.45, "blown"), (8, 1, 0.95, "pruned")])
    frame = sweep_frame(study)
    assert set(frame.loc[frame["best_cell"], "width"]) == {4}
    # Ties go to the cell of the earliest trial, as the selection breaks them.
    study = _stored_sweep([(8, 0, 0.9, "fine"), (8, 1, 0.9, "fine"), (4, 0, 0.9, "fine"), (4, 1, 0.9, "fine")])
    frame = sweep_frame(study)
    chosen = best_trial(study)
    assert chosen is not None and chosen.params["width"] == 8
    assert set(frame.loc[frame["best_cell"], "width"]) == {8}


def test_the_findings_call_lowest_only_a_cell_the_selection_could_pick() -> None:
    # Every seed of width 8 blew up, at a lower validation error than width 4's fine seeds:
    # the finding called width 8 "lowest" while the star and the selection were width 4.
    study = _stored_sweep([(4, 0, 0.3, "fine"), (4, 1, 0.3, "fine"), (8, 0, 0.45, "blown"), (8, 1, 0.45, "blown")])
    (finding,) = axis_findings(sweep_frame(study), ["width"], [])
    assert finding.startswith("Along width: validation error is lowest at width=4 "), finding
    every = _stored_sweep([(4, 0, 0.3, "blown"), (8, 0, 0.45, "blown")])
    assert axis_findings(sweep_frame(every), ["width"], []) == [
        "No cell finished without its training blowing up (validation error at chance or worse)."
    ]


@pytest.mark.parametrize(
    ("axis", "values"),
    [("activation", ["sigmoid", "relu", "tanh"]), ("residual", [False, True]), ("grad_clip", [None, 1.0, 0.1])],
)
def test_the_findings_put_no_side_on_values_without_an_order(axis: str, values: list[Any]) -> None:
    # "below it at activation=sigmoid ... above it at activation=tanh": the grid's listing
    # order is no scale.
    n = len(values)
    frame = pd.DataFrame(
        {
            axis: values,
            "trial": list(range(n)),
            "error": ["error"] * n,
            "val_error": [0.9, 0.08, 0.1][:n],
            "train_error": [0.9, 0.05, 0.06][:n],
            "gap": [0.0, 0.03, 0.04][:n],
            "regime": ["underfit", "good", "good"][:n],
            "sweep_regime": ["underfit", "good", "good"][:n],
            "excess_from": [None] * n,
            "best_cell": [False, True, False][:n],
        }
    )
    frame[axis] = pd.Series(values, dtype=object)  # a null stays None, as sweep_frame keeps it
    frame["fold_val_errors"] = [[v] for v in frame["val_error"]]
    frame["fold_train_errors"] = [[v] for v in frame["train_error"]]
    (finding,) = axis_findings(frame, [axis], [])
    assert "below it" not in finding and "above it" not in finding
    # A null (no clipping: an infinite threshold) is not "below" 1.0 either.
    first = {"activation": "sigmoid", "residual": "False", "grad_clip": "None"}[axis]
    assert f"; elsewhere at {axis}={first} the model underfits" in finding, finding


def test_a_numeric_axis_is_shown_in_ascending_order(tmp_path: Path) -> None:
    # Listed as [0.01, 0.001, 0], the findings called 0.001 "below" a best cell at 0.01.
    sweep = {"weight_decay": [0.01, "1e-3", 0], "activation": ["tanh", "relu"]}  # PyYAML's "1e-3" is a string
    spec = parse_spec(tiny_spec_data(name="order", sweep=sweep))
    outcome = run_study(spec, output_dir=tmp_path, progress=False, build_report=False)
    study = optuna.load_study(study_name="order", storage=outcome.storage_url)
    frame = sweep_frame(study)
    assert frame["weight_decay"].drop_duplicates().tolist() == [0, "1e-3", 0.01]
    assert frame["activation"].drop_duplicates().tolist() == ["tanh", "relu"]  # as listed: not numbers


def test_the_regime_map_labels_cells_without_a_value() -> None:
    # seaborn draws no annotation on a NaN cell: diverged cells were left blank.
    import matplotlib.pyplot as plt

    summary = pd.DataFrame(
        {
            "width": [8, 8, 16, 16],
            "lr": [0.01, 1e5, 0.01, 1e5],
            "val_error": [0.1, None, 0.08, None],
            "sweep_regime": ["good", "diverged", "good", "diverged"],
            "best_cell": [False, False, True, False],
        }
    )
    figure = plot_regime_map(summary, ["width", "lr"], "error")
    assert figure is not None
    texts = [t.get_text() for t in figure.axes[0].texts]
    plt.close(figure)
    assert texts.count("diverged") == 2
    assert "0.08 ★\ngood" in texts


def test_the_regime_map_says_where_gradients_vanished_or_exploded_by_most_seeds() -> None:
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(
        {
            "trial": range(6),
            "activation": ["sigmoid", "sigmoid", "relu", "relu", "relu", "relu"],
            "depth": [8, 8, 8, 8, 1, 1],
            "val_error": [0.9, 0.9, 0.1, 0.12, 0.2, 0.2],
            "val_error_std": [0.01] * 6,
            "train_error": [0.9, 0.9, 0.05, 0.05, 0.1, 0.1],
            "train_error_std": [0.01] * 6,
            "gap": [0.0, 0.0, 0.05, 0.07, 0.1, 0.1],
            "regime": ["underfit", "underfit", "good", "good", "good", "good"],
            "sweep_regime": ["underfit", "underfit", "good", "good", "good", "good"],
            "gradient_flow": ["vanishing", "vanishing", "healthy", "exploding", "healthy", "healthy"],
            "best_cell": [False, False, True, True, False, False],
            "fold_val_errors": [[0.9]] * 2 + [[0.1], [0.12], [0.2], [0.2]],
            "fold_train_errors": [[0.9]] * 2 + [[0.05], [0.05], [0.1], [0.1]],
        }
    )
    summary = cell_summary(frame, ["activation", "depth"])
    assert summary["gradient_flow"].tolist() == ["vanishing", "exploding", "healthy"]  # a tie goes to the worse
    figure = plot_regime_map(summary, ["activation", "depth"], "error")
    assert figure is not None
    texts = [t.get_text() for t in figure.axes[0].texts]
    plt.close(figure)
    assert "0.9\nunderfit\nvanishing grads" in texts
    assert "0.11 ★\ngood\nexploding grads" in texts
    assert "0.2\ngood" in texts  # healthy goes without saying


def test_the_plots_of_a_partly_run_sweep_keep_the_grid_order_and_mark_pruned_cells() -> None:
    # The cells that ran, in the order a partly run sweep stores them: weight_decay read
    # 0.001, 0, 0.01 on the plots, and a pruned cell (regime NaN in pandas) said "nan".
    import matplotlib.pyplot as plt

    from modelsel.sweeps import AXIS_ORDER

    frame = pd.DataFrame(
        {
            "trial": [0, 1, 2],
            "width": [2, 16, 16],
            "weight_decay": [0.001, 0.0, 0.01],
            "val_error": [0.3, 0.2, float("nan")],
            "val_error_std": [0.01, 0.01, float("nan")],
            "train_error": [0.25, 0.1, float("nan")],
            "train_error_std": [0.01, 0.01, float("nan")],
            "gap": [0.05, 0.1, float("nan")],
            "regime": ["underfit", "good", float("nan")],
            "sweep_regime": ["underfit", "good", float("nan")],
            "best_cell": [False, True, False],
            "fold_val_errors": [[0.3], [0.2], []],
            "fold_train_errors": [[0.25], [0.1], []],
        }
    )
    frame.attrs[AXIS_ORDER] = {"width": ["2.0", "16.0"], "weight_decay": ["0.0", "0.001", "0.01"]}
    summary = cell_summary(frame, ["width", "weight_decay"])
    figure = plot_regime_map(summary, ["width", "weight_decay"], "error")
    assert figure is not None
    ticks = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    texts = [t.get_text() for t in figure.axes[0].texts]
    plt.close(figure)
    assert ticks == ["0", "0.001", "0.01"]
    assert "—" in texts and "nan" not in texts
    curve = plot_validation_curve(summary, "weight_decay", axes=["width", "weight_decay"], error="error")
    assert curve is not None
    labels = [[t.get_text() for t in ax.get_xticklabels()] for ax in curve.axes if ax.get_visible()]
    plt.close(curve)
    assert labels == [["0.001"], ["0", "0.01"]]


def test_a_null_grid_value_is_shown_as_none_in_the_spec_order(tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec_data(name="nul", sweep={"grad_clip": [None, 0.5], "width": [2, 4]}))
    run_study(spec, storage=f"sqlite:///{tmp_path}/s.db", output_dir=tmp_path, progress=False, build_report=False)
    study = optuna.load_study(study_name="nul", storage=f"sqlite:///{tmp_path}/s.db")
    frame = sweep_frame(study)
    assert frame["grad_clip"].tolist() == [None, None, 0.5, 0.5]  # not NaN, and first as listed
    summary = cell_summary(frame, ["grad_clip", "width"])
    assert summary["grad_clip"].tolist() == [None, None, 0.5, 0.5]


def test_the_validation_curve_draws_a_panel_for_every_value_of_the_other_axis() -> None:
    # Only the first eight were drawn, and nothing said so.
    import matplotlib.pyplot as plt

    widths = [2**i for i in range(1, 11)]
    summary = pd.DataFrame(
        [
            {"width": w, "weight_decay": d, "val_error": 0.1, "val_error_std": 0.01, "train_error": 0.05,
             "train_error_std": 0.01, "sweep_regime": "good"}
            for w in widths
            for d in (0.0, 0.001)
        ]
    )  # fmt: skip
    figure = plot_validation_curve(summary, "weight_decay", axes=["width", "weight_decay"], error="error")
    assert figure is not None
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    plt.close(figure)
    assert titles == [f"width={w}" for w in widths]


def test_the_validation_curve_never_draws_an_error_below_zero() -> None:
    # D2L's polynomial sweep: an MSE of 1.2 ± 2.9 over folds drew its bar down to -1.7.
    import matplotlib.pyplot as plt

    summary = pd.DataFrame(
        [
            {"degree": d, "val_error": v, "val_error_std": s, "train_error": 0.5 * v, "train_error_std": 0.1,
             "sweep_regime": "good"}
            for d, v, s in ((1, 1.2, 2.9), (3, 0.3, 0.05), (19, 0.8, 0.4))
        ]
    )  # fmt: skip
    figure = plot_validation_curve(summary, "degree", axes=["degree"], error="MSE")
    assert figure is not None
    (ax,) = [a for a in figure.axes if a.get_visible()]
    bottoms = [float(seg[0][1]) for c in ax.collections for seg in c.get_segments()]
    label = ax.get_ylabel()
    plt.close(figure)
    assert bottoms and min(bottoms) >= 0.0
    assert label == "MSE"


def test_a_sweep_whose_every_trial_diverged_still_gets_its_report(tmp_path: Path) -> None:
    # The findings read a column that only finished trials give, and the run ended in a KeyError.
    data = tiny_spec_data(name="blowup", sweep={"lr": [1e5, 1e7]})
    data["model"] = {"depth": 2, "width": 16}
    data["training"] = {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.1}
    outcome = run_study(parse_spec(data), output_dir=tmp_path, progress=False)
    assert (outcome.n_complete, outcome.n_pruned) == (0, 2)
    assert outcome.report_path is not None
    assert "No cell has finished yet." in outcome.report_path.read_text(encoding="utf-8")
    assert pd.read_csv(tmp_path / "blowup" / "sweep.csv")["regime"].tolist() == ["diverged", "diverged"]


def test_image_cases_tiny_model_underfits_huge_model_on_few_samples_overfits(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "name": "image",
            "dataset": {"name": "digits", "train_size": 200},
            "model": {"depth": 1},
            "training": {"epochs": 30, "batch_size": 32, "lr": 0.001, "weight_decay": 0.0},
            "cv": {"folds": 3},
            "sweep": {"width": [2, 512]},
        }
    )
    run_study(spec, storage=f"sqlite:///{tmp_path / 's.db'}", output_dir=tmp_path, progress=False)
    table = pd.read_csv(tmp_path / "image" / "sweep.csv").set_index("width")
    assert table.loc[2, "sweep_regime"] == "underfit"
    assert table.loc[2, "regime"] == "underfit"  # also on its own numbers
    assert table.loc[512, "sweep_regime"] == "overfit"
    assert table.loc[512, "train_error"] < 0.02 < 0.05 < table.loc[512, "gap"]


@pytest.mark.slow
def test_polynomial_d2l_end_to_end(tmp_path: Path) -> None:
    spec = load_spec(REPO / "studies" / "polynomial_d2l.yaml")
    run_study(spec, output_dir=tmp_path, progress=False)
    table = pd.read_csv(tmp_path / "polynomial_d2l" / "sweep.csv").set_index("degree")
    assert table.loc[1, "sweep_regime"] == "underfit"
    assert table.loc[3, "sweep_regime"] == "good"
    assert table.loc[3, "best_cell"]
    # Degree 19 generalizes worse than degree 3 and sits on the high-capacity side: overfit.
    assert table.loc[19, "val_error"] > table.loc[3, "val_error"]
    assert table.loc[19, "sweep_regime"] == "overfit"
    html = (tmp_path / "polynomial_d2l" / "report.html").read_text(encoding="utf-8")
    assert "Along degree: validation MSE is lowest at degree=3" in html
    spec_attrs = json.loads(optuna.load_study(
        study_name="polynomial_d2l", storage=f"sqlite:///{(tmp_path / 'polynomial_d2l' / 'study.db').resolve()}"
    ).user_attrs["spec_full"])
    assert spec_attrs["sweep"]["axes"] == {"degree": [1, 3, 19]}
