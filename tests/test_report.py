"""Tests of modelsel.report: trials.csv and a self-contained, escaped report.html from the storage alone."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from conftest import fast_folder, tiny_spec_data
from optuna.trial import TrialState

from modelsel.report import build_report, trials_frame
from modelsel.spec import load_spec, parse_spec
from modelsel.study import run_study
from modelsel.training import describe_device, resolve_device

DESCRIPTION = "Evil <script>alert('x')</script> & friends"


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A finished study with complete and pruned trials, in SQLite; its run built no report."""
    with fast_folder(tmp_path_factory.mktemp("report")) as folder:
        yield _run_stored(folder)


def _run_stored(folder: Path) -> tuple[str, Path]:
    url = f"sqlite:///{folder}/study.db"
    spec = parse_spec(
        tiny_spec_data(
            description=DESCRIPTION,
            training={"epochs": 3, "batch_size": 32},
            search={"lr": [0.05, 0.00001], "width": {"type": "int", "low": 4, "high": 16}},
            pruner={"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
            budget={"n_trials": 4},
        )
    )
    run_study(spec, storage=url, output_dir=folder / "unused", progress=False, build_report=False)
    return url, folder


@pytest.fixture(scope="module")
def built(stored: tuple[str, Path]) -> tuple[optuna.Study, Path, str]:
    url, folder = stored
    study = optuna.load_study(study_name="tiny", storage=url)  # the storage alone, in a fresh object
    path = build_report(study, output_dir=folder / "out" / "tiny")
    return study, path, path.read_text(encoding="utf-8")


def test_trials_csv_has_one_row_per_trial(built: tuple[optuna.Study, Path, str]) -> None:
    study, path, _ = built
    frame = pd.read_csv(path.parent / "trials.csv")
    assert len(frame) == len(study.trials) == 4
    assert frame["trial"].tolist() == [t.number for t in study.trials]
    assert frame["state"].tolist() == [t.state.name.lower() for t in study.trials]
    expected = {"param_lr", "param_width", "val_accuracy", "val_metric_mean", "val_metric_std", "state", "duration_s"}
    assert expected <= set(frame.columns)
    for row, trial in zip(frame.itertuples(), study.trials, strict=True):
        assert row.param_lr == pytest.approx(trial.params["lr"])
        assert row.param_width == trial.params["width"]
        assert row.duration_s == pytest.approx(trial.duration.total_seconds())
        if trial.state == TrialState.COMPLETE:
            assert row.val_metric_mean == pytest.approx(trial.user_attrs["val_metric_mean"])
            assert row.val_metric_std == pytest.approx(trial.user_attrs["val_metric_std"])
            assert row.val_accuracy == pytest.approx(trial.values[0])
        else:
            assert row.pruned_at_epoch == trial.user_attrs["pruned_at_epoch"]
            assert row.fold_epochs == 2 * row.pruned_at_epoch  # what it trained, 2 folds
            assert pd.isna(row.val_metric_mean)
            # Recorded before training, so that a pruned trial's loss can be read as a cross-entropy.
            assert trial.user_attrs["metric_name"] == "accuracy"


def test_the_study_has_complete_and_pruned_trials(built: tuple[optuna.Study, Path, str]) -> None:
    study, _, _ = built
    states = {t.state for t in study.trials}
    assert states == {TrialState.COMPLETE, TrialState.PRUNED}


def test_report_html_is_self_contained(built: tuple[optuna.Study, Path, str]) -> None:
    _, path, html = built
    assert path.name == "report.html"
    sources = re.findall(r"""\bsrc\s*=\s*["']?([^"' >]+)""", html, flags=re.IGNORECASE)
    assert sources, "the report should embed plots"
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:
        assert base64.b64decode(source.removeprefix("data:image/png;base64,")).startswith(b"\x89PNG\r\n\x1a\n")
    assert not re.search(r"\bhref\s*=", html, flags=re.IGNORECASE)
    assert not re.search(r"<link\b|@import|url\(", html, flags=re.IGNORECASE)
    assert not re.search(r"https?://", html)


def test_report_escapes_user_text(built: tuple[optuna.Study, Path, str]) -> None:
    _, _, html = built
    assert "<script" not in html.lower()
    assert "&lt;script&gt;" in html
    assert "&amp; friends" in html


def test_report_shows_the_study_selection_and_test_score(built: tuple[optuna.Study, Path, str]) -> None:
    study, _, html = built
    assert "<title>modelsel report: tiny</title>" in html
    assert "<h1>tiny</h1>" in html
    counts = f"{len(study.trials)} trials: "
    assert counts in html
    # Complete trials trained 3 epochs on 2 folds; pruned ones as many epochs as they ran.
    spent = sum(2 * t.user_attrs.get("pruned_at_epoch", 3) for t in study.trials)
    assert f"failed. They trained {spent} fold-epochs (epochs × folds). Objective" in html
    test = study.user_attrs["test_result"]
    assert f"held-out test {test['metric_name']}" in html
    assert f"{test['test_metric']:.4f}" in html
    assert "selected trial" in html
    # The tiny spec's device is "auto": the GPU where the tests run on one.
    assert f"trained on {describe_device(resolve_device('auto'))}</p>" in html


def test_report_rebuilt_twice_gives_the_same_table(stored: tuple[str, Path]) -> None:
    url, folder = stored
    first = build_report(optuna.load_study(study_name="tiny", storage=url), output_dir=folder / "a")
    second = build_report(optuna.load_study(study_name="tiny", storage=url), output_dir=folder / "b")
    assert (first.parent / "trials.csv").read_text() == (second.parent / "trials.csv").read_text()


def test_a_rebuild_leaves_no_figure_of_an_earlier_build(stored: tuple[str, Path]) -> None:
    # An earlier build's training curves of another best trial stayed beside the new ones.
    url, folder = stored
    out = folder / "rebuilt"
    out.mkdir()
    for name in ("training_curves_trial99.png", "validation_curve_old.png", "notes.png", "study.db"):
        (out / name).write_bytes(b"earlier")
    build_report(optuna.load_study(study_name="tiny", storage=url), output_dir=out)
    names = {p.name for p in out.iterdir()}
    assert not {"training_curves_trial99.png", "validation_curve_old.png"} & names
    assert {"notes.png", "study.db", "trials.csv", "report.html"} <= names  # not the report's own: kept


def test_a_column_without_values_is_blank_not_none(tmp_path: Path) -> None:
    # No trial was pruned: pruned_at_epoch is None throughout, and the table printed "None".
    spec = parse_spec(tiny_spec_data(budget={"n_trials": 1}))
    outcome = run_study(spec, storage=f"sqlite:///{tmp_path}/s.db", output_dir=tmp_path, progress=False)
    assert outcome.report_path is not None
    assert "<td>None</td>" not in outcome.report_path.read_text(encoding="utf-8")


def test_report_of_a_study_without_trials(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path}/e.db")
    path = build_report(study, output_dir=tmp_path / "out")
    html = path.read_text(encoding="utf-8")
    assert "No trial completed, so nothing was selected and the test split was not scored." in html
    assert ">Search<" not in html  # a heading with nothing under it
    assert trials_frame(study).empty
    assert pd.read_csv(tmp_path / "out" / "trials.csv").columns[:2].tolist() == ["trial", "state"]


def test_warm_up_leaves_no_figure_open() -> None:
    # --workers calls it while the last trials finish; a figure left open would leak
    # into the report process's pyplot state for the rest of the run.
    import matplotlib.pyplot as plt

    from modelsel.report import warm_up

    before = set(plt.get_fignums())
    warm_up()
    assert set(plt.get_fignums()) == before


@pytest.mark.parametrize(
    ("objective", "label"),
    [("val_accuracy", "CV val_accuracy (fold mean)"), ("fit_seconds", "fit_seconds (all folds' training)")],
)
def test_the_history_plot_says_what_its_values_are(
    objective: str, label: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.pyplot as plt

    import modelsel.report as report

    direction = "maximize" if objective == "val_accuracy" else "minimize"
    study = optuna.create_study(direction=direction)
    study.set_user_attr("objectives", [objective])
    for value in (0.5, 0.7):
        study.add_trial(optuna.trial.create_trial(value=value))
    labels: list[str] = []

    def capture(fig: Any) -> str:
        labels.append(fig.axes[0].get_ylabel())
        plt.close(fig)
        return ""

    monkeypatch.setattr(report, "figure_to_base64", capture)
    frame = pd.DataFrame({"trial": [0, 1], "state": ["complete"] * 2, objective: [0.5, 0.7]})
    assert report.plot_history(study, frame) is not None
    assert labels == [label]


def test_the_history_draws_pruned_trials_where_they_stopped_and_leaves_blow_ups_out_of_the_best(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import matplotlib.pyplot as plt

    import modelsel.report as report

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("objectives", ["val_accuracy"])
    evidence = {"train_loss_first": 2.6e13, "train_loss_last": 1.4e13, "train_loss_peak": 2.6e13}
    blown = {"regime": "diverged", "regime_evidence": evidence}
    study.add_trial(optuna.trial.create_trial(value=0.5))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.2, 2: 0.3}))
    study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs=blown))  # not selectable
    study.add_trial(optuna.trial.create_trial(value=0.7))
    blown_pruned = {"pruned_at_epoch": 1, "metric_name": "accuracy", "curves": {"train_loss": [5000.0]}}
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={1: 1e9}, user_attrs=blown_pruned)
    )
    diverged = {"regime": "diverged", "fail_reason": "diverged: fold 0 at epoch 2: loss is nan"}
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.8}, user_attrs=diverged)
    )
    shown: dict[str, Any] = {}

    def capture(fig: Any) -> str:
        ax = fig.axes[0]
        shown["best"] = [float(v) for v in ax.lines[0].get_ydata()]
        shown["points"] = {c.get_label(): [tuple(map(float, xy)) for xy in c.get_offsets()] for c in ax.collections}
        plt.close(fig)
        return ""

    monkeypatch.setattr(report, "figure_to_base64", capture)
    figure = report.plot_history(study, trials_frame(study))
    assert figure is not None and "last fold-mean value it reported" in figure.caption
    assert max(shown["best"]) == pytest.approx(0.7)  # the blown-up 0.9 is not the best so far
    assert shown["points"]["blew up (not selected)"] == [(2.0, 0.9)]
    assert shown["points"]["pruned (last reported)"] == [(1.0, 0.3)]  # not trial 0's value, nor the diverged one


def test_the_report_shows_where_gradients_vanish(tmp_path: Path) -> None:
    # D2L's picture: 8 sigmoid layers starve the first of gradient; 8 ReLU layers do not
    # (at He init: PyTorch's default init starves them too, see the next test).
    sweep = {"activation": ["sigmoid", "relu"], "depth": [1, 8]}
    data = tiny_spec_data(name="flow", search=None, sampler=None, sweep=sweep)
    data["model"] = {"width": 16, "init": "kaiming_normal"}
    data["training"] = {**data["training"], "epochs": 2}
    outcome = run_study(parse_spec(data), output_dir=tmp_path, progress=False)
    frame = pd.read_csv(tmp_path / "flow" / "trials.csv").set_index(["param_activation", "param_depth"])
    assert frame.loc[("sigmoid", 8), "gradient_flow"] == "vanishing"
    assert frame.loc[("sigmoid", 8), "grad_ratio"] < 1e-3
    assert frame.loc[("relu", 8), "gradient_flow"] == "healthy"
    assert outcome.report_path is not None
    html = outcome.report_path.read_text(encoding="utf-8")
    assert "Of 4 trials: 1 vanishing, 3 healthy, 0 exploding." in html
    assert "Gradient norm per layer" in html


def test_a_deep_relu_net_at_the_default_init_has_vanishing_gradients_and_he_init_does_not(fast_tmp: Path) -> None:
    # PyTorch's default init shrinks the signal about 2.4x per ReLU layer both ways, so the
    # first layer's weight gradient (backward signal x its input) and the output layer's
    # (backward signal x a shrunken input) shrank alike and their ratio read healthy.
    sweep = {"init": ["default", "kaiming_normal"]}
    data = tiny_spec_data(name="init", search=None, sampler=None, sweep=sweep)
    data["model"] = {"width": 16, "depth": 10, "activation": "relu"}
    data["training"] = {**data["training"], "epochs": 1}
    outcome = run_study(parse_spec(data), output_dir=fast_tmp, progress=False)
    frame = pd.read_csv(fast_tmp / "init" / "trials.csv").set_index("param_init")
    assert frame.loc["default", "gradient_flow"] == "vanishing"
    assert frame.loc["default", "grad_ratio"] < 1e-3
    assert frame.loc["kaiming_normal", "gradient_flow"] == "healthy"
    study = optuna.load_study(study_name="init", storage=outcome.storage_url)
    for trial in study.trials:  # the weight gradients are stored and plotted beside it
        assert set(trial.user_attrs["grad_norms"]) == set(trial.user_attrs["preactivation_grad_norms"])
    assert outcome.report_path is not None
    assert "Of 2 trials: 1 vanishing, 1 healthy, 0 exploding." in outcome.report_path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_gradients_example_study_shows_d2l_s_picture(fast_tmp: Path) -> None:
    """studies/gradients_digits.yaml, cut to 2 epochs (its labels come from the first
    batch, or from a blow-up within those epochs), says what its comments promise."""
    spec = load_spec(Path(__file__).resolve().parents[1] / "studies" / "gradients_digits.yaml")
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": 2})})
    run_study(spec, output_dir=fast_tmp, progress=False)

    def flow(axes: str) -> dict[tuple[Any, ...], str]:
        frame = pd.read_csv(fast_tmp / f"gradients_digits-{axes}" / "trials.csv")
        params = [c for c in frame.columns if c.startswith("param_")]
        return {tuple(row[params]): row["gradient_flow"] for _, row in frame.iterrows()}

    by_depth = flow("activation-x-depth")
    assert by_depth[("sigmoid", 8)] == "vanishing"
    assert by_depth[("relu", 8)] == by_depth[("tanh", 8)] == "healthy"
    by_init = flow("init-x-activation")
    assert by_init[("default", "relu")] == by_init[("xavier_uniform", "sigmoid")] == "vanishing"
    assert by_init[("kaiming_normal", "relu")] == "healthy"
    cells = pd.read_csv(fast_tmp / "gradients_digits-init-x-activation" / "sweep.csv").set_index(["init", "activation"])
    assert cells.loc[("default", "relu"), "gradient_flow"] == "vanishing"  # sweep.csv says it too
    assert flow("residual-x-activation")[(True, "sigmoid")] == "healthy"
    assert flow("batch_norm-x-activation")[(True, "sigmoid")] == "healthy"
    by_lr = {(lr, clip if clip == clip else None): label for (lr, clip), label in flow("lr-x-grad_clip").items()}
    assert by_lr[(1.0, None)] == by_lr[(10.0, None)] == "exploding"
    assert by_lr[(1.0, 1.0)] == by_lr[(0.1, None)] == "healthy"


def test_the_gradient_figure_keeps_one_colour_per_trial_in_a_study_older_trials_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A study resumed across versions: the selected trial has no backward signal stored, so
    # it is missing from the left panel; the colours shifted between the panels and the
    # only legend (left) did not name it.
    import matplotlib.pyplot as plt

    import modelsel.report as report

    signal = {"hidden1": [1e-4], "hidden2": [1e-2], "output": [0.1]}
    weights = {"hidden1": [0.01], "hidden2": [0.02], "output": [0.1]}
    study = optuna.create_study(direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(value=0.5, user_attrs={"grad_norms": weights, "preactivation_grad_norms": signal})
    )
    study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"grad_norms": weights}))  # selected, older
    healthy = {"hidden1": [0.5], "hidden2": [0.4], "output": [0.1]}
    study.add_trial(
        optuna.trial.create_trial(value=0.7, user_attrs={"grad_norms": weights, "preactivation_grad_norms": healthy})
    )
    shown: dict[str, Any] = {}

    def capture(fig: Any) -> str:
        shown["colours"] = [{line.get_label(): line.get_color() for line in ax.lines} for ax in fig.axes]
        shown["legend"] = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()]
        plt.close(fig)
        return ""

    monkeypatch.setattr(report, "figure_to_base64", capture)
    assert report.gradient_flow_section(study, trials_frame(study), selected=1) is not None
    left, right = shown["colours"]
    assert set(left) < set(right) and len(right) == 3
    assert all(right[name] == colour for name, colour in left.items())
    (legend,) = shown["legend"]
    assert sorted(legend) == sorted(right)  # every trial drawn, the selected one first
    assert legend[0].startswith("trial 1 (selected")


def test_the_gradient_figure_draws_one_line_for_trials_that_start_from_the_same_net(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The blown-up trial of an lr sweep has an infinite ratio (a "nan" norm at epoch 2), yet
    # its first batch is everyone's: it was drawn as "largest ratio" over the selected one.
    import matplotlib.pyplot as plt

    import modelsel.report as report

    same = {"hidden1": [0.05, 0.04], "output": [0.1, 0.1]}
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"preactivation_grad_norms": same}))
    blown = {"hidden1": [0.05, "nan"], "output": [0.1, "inf"]}
    study.add_trial(optuna.trial.create_trial(value=0.1, user_attrs={"preactivation_grad_norms": blown}))
    lines: list[int] = []

    def capture(fig: Any) -> str:
        lines.append(sum(len(ax.lines) for ax in fig.axes))
        plt.close(fig)
        return ""

    monkeypatch.setattr(report, "figure_to_base64", capture)
    section = report.gradient_flow_section(study, trials_frame(study), selected=0)
    assert section is not None and lines[0] == 1  # the per-layer figure (the per-epoch one follows)
    assert "start from the same initialized net" in section.paragraphs[0]
    # One trial alone says nothing of the kind.
    alone = optuna.create_study(direction="maximize")
    alone.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"preactivation_grad_norms": same}))
    section = report.gradient_flow_section(alone, trials_frame(alone), selected=0)
    assert section is not None and "same initialized net" not in section.paragraphs[0]


def test_the_gradient_section_follows_the_first_layer_over_the_epochs_of_trials_whose_updates_exploded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In an lr sweep every trial's first batch is the same net: the trial whose units the
    # updates killed was not drawn anywhere; its gradient per epoch shows it.
    import matplotlib.pyplot as plt

    import modelsel.report as report

    healthy = {"hidden1": [0.05, 0.04, 0.03], "output": [0.1, 0.1, 0.1]}
    dead = {"hidden1": [0.05, 0.0, 0.0], "output": [0.1, 0.2, 0.2]}
    study = optuna.create_study(direction="maximize")
    task = {"metric_name": "accuracy"}
    study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={**task, "preactivation_grad_norms": healthy}))
    study.add_trial(optuna.trial.create_trial(value=0.1, user_attrs={**task, "preactivation_grad_norms": dead}))
    drawn: list[dict[str, list[float]]] = []

    def capture(fig: Any) -> str:
        drawn.append({line.get_label(): list(line.get_ydata()) for ax in fig.axes for line in ax.lines})
        plt.close(fig)
        return ""

    monkeypatch.setattr(report, "figure_to_base64", capture)
    frame = trials_frame(study)
    assert frame["gradient_flow"].tolist() == ["healthy", "exploding"]
    section = report.gradient_flow_section(study, frame, selected=0)
    assert section is not None
    assert [f.title for f in section.figures] == ["Gradient norm per layer", "Gradient at the first layer per epoch"]
    per_layer, per_epoch = drawn
    assert list(per_layer) == ["trial 0 (selected, healthy)"]  # one net at init
    assert per_epoch["trial 0 (selected, healthy)"] == [0.05, 0.04, 0.03]
    died = per_epoch["trial 1 (updates exploded, exploding)"]
    assert died[0] == 0.05 and all(math.isnan(v) for v in died[1:])  # no gradient: off the log axis


def test_a_learning_rate_that_makes_training_diverge_counts_as_exploding(fast_tmp: Path) -> None:
    # Measured before any update, the first batch's ratio cannot see the learning rate:
    # every trial of an lr sweep read "healthy", the diverged ones too.
    data = tiny_spec_data(name="lr", search=None, sampler=None, sweep={"lr": [0.01, 1.0e12]})
    data["model"] = {"width": 16, "depth": 3}
    data["training"] = {**data["training"], "epochs": 2, "optimizer": "sgd"}
    outcome = run_study(parse_spec(data), output_dir=fast_tmp, progress=False)
    frame = pd.read_csv(fast_tmp / "lr" / "trials.csv").set_index("param_lr")
    assert frame.loc[1.0e12, "regime"] == "diverged"
    assert frame.loc[1.0e12, "gradient_flow"] == "exploding"
    assert frame.loc[0.01, "gradient_flow"] == "healthy"
    # The epoch it diverged at, written as a count (pandas wrote "1.0" beside a blank).
    with (fast_tmp / "lr" / "trials.csv").open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["pruned_at_epoch"] for row in rows) == ["", "1"]
    assert sorted(row["fold_epochs"] for row in rows) == ["2", "4"]  # 2 folds: 1 epoch, and all 2
    assert outcome.report_path is not None
    html = outcome.report_path.read_text(encoding="utf-8")
    assert "Of 2 trials: 0 vanishing, 1 healthy, 1 exploding." in html
    assert "is labelled exploding whatever that ratio" in html
    # Both start from the same net: one line, not a "smallest" and a "largest ratio" on top of each other.
    assert "so the figure draws one of them" in html


def test_a_trial_pruned_while_its_loss_was_blown_up_counts_as_exploding() -> None:
    # The median pruner stopped an lr-1000 trial whose cross-entropy was 1.5e18: finite, so
    # never labelled diverged, and its gradient flow read healthy.
    study = optuna.create_study(direction="maximize")
    norms = {"hidden1": [0.5], "output": [1.0]}
    pruned = {"pruned_at_epoch": 1, "metric_name": "accuracy", "grad_norms": norms}
    study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"grad_norms": norms}))
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.PRUNED, user_attrs={**pruned, "curves": {"train_loss": [1.5e18]}}
        )
    )
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={**pruned, "curves": {"train_loss": [2.3]}})
    )
    assert trials_frame(study)["gradient_flow"].tolist() == ["healthy", "exploding", "healthy"]


def test_a_study_whose_every_trial_diverged_says_so(fast_tmp: Path) -> None:
    spec = parse_spec(
        tiny_spec_data(training={"epochs": 2, "optimizer": "sgd", "lr": 1.0e12}, search=None, budget={"n_trials": 2})
    )
    outcome = run_study(spec, storage=f"sqlite:///{fast_tmp}/s.db", output_dir=fast_tmp, progress=False)
    assert outcome.report_path is not None and outcome.n_pruned == 2
    html = outcome.report_path.read_text(encoding="utf-8")
    assert "2 trials: 0 complete, 2 pruned (2 of them diverged), 0 failed." in html
    assert "No trial completed, so nothing was selected" in html
    assert ">Search<" not in html
    assert html.count("diverged: fold") == 2  # each trial's reason, in the trials table


def test_a_trial_stopped_mid_training_shows_its_fold_epochs_and_why_it_failed() -> None:
    # trials.csv left both blank, while the summary counted the trial's epochs: the two disagreed.
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("spec_full", json.dumps({"cv": {"folds": 3}}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, intermediate_values={1: 0.5, 2: 0.6}))
    study.add_trial(optuna.trial.create_trial(value=0.7, user_attrs={"fold_epochs": 9}))
    frame = trials_frame(study)
    assert frame["fold_epochs"].tolist() == [6, 9]
    assert frame.loc[0, "fail_reason"] == "stopped before it finished (interrupted, or its process ended)"
    assert pd.isna(frame.loc[1, "fail_reason"]) or frame.loc[1, "fail_reason"] is None


def test_the_summary_counts_one_trial_in_the_singular() -> None:
    from modelsel.report import summary_section

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    text = summary_section(study, trials_frame(study)).paragraphs[0]
    assert text.startswith("1 trial: 0 complete, 0 pruned, 1 failed.")  # was "1 trials"


def test_the_summary_counts_invalid_configurations_as_the_cli_does() -> None:
    from modelsel.report import summary_section

    study = optuna.create_study(direction="maximize")
    for reason in ("diverged: fold 0 at epoch 1: loss is nan", "invalid configuration: x", "pruned after epoch 1"):
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"fail_reason": reason}))
    text = summary_section(study, trials_frame(study)).paragraphs[0]
    assert "3 pruned (1 of them diverged, 1 was an invalid configuration)" in text


def test_a_report_of_failed_and_running_trials_without_a_pruned_one(tmp_path: Path) -> None:
    # What Ctrl-C leaves with pruner none: the report crashed (pandas 3 summed the empty
    # pruned trials' reasons to ""), in every later run and rebuild. A trial of a killed
    # process stays running until a later run fails it; the counts left it out.
    study = optuna.create_study(study_name="cut", storage=f"sqlite:///{tmp_path}/s.db", direction="maximize")
    study.set_user_attr("spec_full", json.dumps({"name": "cut", "cv": {"folds": 2}}))
    study.add_trial(optuna.trial.create_trial(value=0.7, user_attrs={"fold_epochs": 4}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, intermediate_values={1: 0.5}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING))
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))  # a grid cell queued again
    html = build_report(study, output_dir=tmp_path / "out").read_text(encoding="utf-8")
    assert "4 trials: 1 complete, 0 pruned, 1 failed, 1 running, 1 waiting." in html
    assert "&lt;NA&gt;" not in html  # counts missing from a trial are blank, as pd.NA (na_rep did not cover it)


def test_a_study_whose_completed_trials_all_diverged_selects_none(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="blown", storage=f"sqlite:///{tmp_path}/s.db", direction="maximize")
    study.set_user_attr("spec_full", json.dumps({"name": "blown", "cv": {"folds": 2}}))
    blown = {"regime": "diverged", "regime_evidence": {"train_loss_first": 2.6e13, "train_loss_last": 1.4e13,
                                                        "train_loss_peak": 2.6e13}}
    study.add_trial(optuna.trial.create_trial(value=0.1, user_attrs={**blown, "fold_epochs": 4}))
    html = build_report(study, output_dir=tmp_path / "out").read_text(encoding="utf-8")
    assert (
        "Every completed trial blew up in training (regime diverged), so nothing was selected and the test split "
        "was not scored." in html
    )


def test_an_importance_the_evaluator_cannot_compute_is_said_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna.importance

    import modelsel.report as report

    study = optuna.create_study(direction="maximize")
    lr = {"lr": optuna.distributions.FloatDistribution(0.01, 1)}
    for i, value in enumerate((0.5, 0.7, 0.6)):
        study.add_trial(optuna.trial.create_trial(value=value, params={"lr": 0.1 * (i + 1)}, distributions=lr))

    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the forest could not be fitted")

    monkeypatch.setattr(optuna.importance, "get_param_importances", failing)
    assert report.plot_importance(study) == (
        "Parameter importance could not be computed (RuntimeError: the forest could not be fitted)."
    )
    search = next(s for s in report.draft_report(study).sections if s.title == "Search")
    assert search.paragraphs == [report.plot_importance(study)]


def test_the_report_hides_the_storage_password(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="pw", storage=f"sqlite:///{tmp_path}/s.db")
    study.set_user_attr("spec_full", json.dumps({"name": "pw", "storage": "postgresql://u:secret@db.example/optuna"}))
    html = build_report(study, output_dir=tmp_path / "out").read_text(encoding="utf-8")
    assert "secret" not in html
    assert "postgresql://u:***@db.example/optuna" in html


_BLOWN_UP = {
    "regime": "diverged",
    "regime_evidence": {"train_loss_first": 2.6e13, "train_loss_last": 1.4e13, "train_loss_peak": 2.6e13},
}


def _two_objective_study(tmp_path: Path) -> optuna.Study:
    """Accuracy (maximize) against size (minimize): trials 0, 2 and 4 are the front; 1 and 3
    are dominated; 5 would dominate every trial but blew up, so it is on no front."""
    study = optuna.create_study(
        study_name="mo", storage=f"sqlite:///{tmp_path}/mo.db", directions=["maximize", "minimize"]
    )
    study.set_user_attr("objectives", ["val_accuracy", "n_params"])
    for values in ([0.9, 5000], [0.8, 6000], [0.85, 800], [0.7, 900], [0.6, 100]):
        study.add_trial(optuna.trial.create_trial(values=values))
    study.add_trial(optuna.trial.create_trial(values=[0.99, 10], user_attrs=_BLOWN_UP))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    return study


def test_a_multi_objective_report_shows_the_pareto_front_and_why_the_trial_was_selected(tmp_path: Path) -> None:
    study = _two_objective_study(tmp_path)
    path = build_report(study, output_dir=tmp_path / "out")
    frame = pd.read_csv(path.parent / "trials.csv")
    assert frame["pareto"].tolist() == [True, False, True, False, True, False, False]
    html = path.read_text(encoding="utf-8")
    assert '<img alt="Pareto front"' in html
    assert "The selected trial is the one on the front best on the first objective, val_accuracy." in html
    assert "Only the first two" not in html
    assert "the selected trial is the one on the Pareto front best on the first objective, val_accuracy" in html
    assert "(trials whose training blew up left out): 3 trials here" in html
    assert "<td>objective n_params</td>\n      <td>5000</td>" in html


def test_the_pareto_plot_highlights_the_front_and_marks_the_selected_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.pyplot as plt

    import modelsel.report as report

    shown: dict[str, Any] = {}

    def capture(fig: Any) -> str:
        ax = fig.axes[0]
        points = {c.get_label(): c.get_offsets() for c in ax.collections}
        shown["points"] = {label: sorted(tuple(map(float, xy)) for xy in xys) for label, xys in points.items()}
        shown["step"] = ax.lines[0].get_drawstyle(), [tuple(map(float, xy)) for xy in ax.lines[0].get_xydata()]
        shown["labels"] = ax.get_xlabel(), ax.get_ylabel()
        shown["scales"] = ax.get_xscale(), ax.get_yscale()
        plt.close(fig)
        return ""

    monkeypatch.setattr(report, "figure_to_base64", capture)
    figure = report.plot_pareto_front(_two_objective_study(tmp_path))
    assert figure is not None and figure.title == "Pareto front"
    assert shown["points"] == {
        "dominated trial": [(0.7, 900.0), (0.8, 6000.0)],
        "blew up (not selected)": [(0.99, 10.0)],
        "Pareto front": [(0.6, 100.0), (0.85, 800.0), (0.9, 5000.0)],
        "selected (trial 0)": [(0.9, 5000.0)],
    }
    # Best accuracy first, each step turning at the corner both neighbours dominate ((0.85, 5000), (0.6, 800)).
    assert shown["step"] == ("steps-post", [(0.9, 5000.0), (0.85, 800.0), (0.6, 100.0)])
    assert shown["labels"] == ("CV val_accuracy (fold mean), maximized", "n_params (model parameters), minimized")
    assert shown["scales"] == ("linear", "log")  # 10 to 6000 parameters


def test_with_three_objectives_the_pareto_plot_says_it_shows_two(tmp_path: Path) -> None:
    import modelsel.report as report

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("objectives", ["val_accuracy", "n_params", "fit_seconds"])
    for values in ([0.9, 5000, 3.0], [0.8, 6000, 1.0]):  # each best on something: both on the front
        study.add_trial(optuna.trial.create_trial(values=values))
    figure = report.plot_pareto_front(study)
    assert figure is not None
    assert "Only the first two of the 3 objectives are plotted" in figure.caption
    assert "better on fit_seconds" in figure.caption
    assert report.trials_frame(study)["pareto"].tolist() == [True, True]


def test_a_single_objective_report_has_no_pareto_column_or_plot(tmp_path: Path) -> None:
    import modelsel.report as report

    study = optuna.create_study(study_name="one", storage=f"sqlite:///{tmp_path}/one.db", direction="maximize")
    study.set_user_attr("objectives", ["val_accuracy"])
    for value in (0.5, 0.7):
        study.add_trial(optuna.trial.create_trial(value=value))
    assert report.plot_pareto_front(study) is None
    html = build_report(study, output_dir=tmp_path / "out").read_text(encoding="utf-8")
    assert "pareto" not in pd.read_csv(tmp_path / "out" / "trials.csv").columns
    assert "Pareto" not in html and "objective val_accuracy" not in html
