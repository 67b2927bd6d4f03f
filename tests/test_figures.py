"""Tests of modelsel.figures: the training-curve plot and the HTML tables of the report."""

from __future__ import annotations

from typing import Any

import optuna
import pandas as pd
import pytest

import modelsel.figures as figures


def _captured(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import matplotlib.pyplot as plt

    axes: list[Any] = []

    def capture(fig: Any) -> str:
        ax = fig.axes[0]
        axes.append(
            {
                "points": [len(line.get_xdata()) for line in ax.lines if line.get_marker() not in (None, "None", "")],
                "xlim": ax.get_xlim(),
                "xticks": [float(t) for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]],
                "ylabel": ax.get_ylabel(),
            }
        )
        plt.close(fig)
        return ""

    monkeypatch.setattr(figures, "figure_to_base64", capture)
    return axes


def test_a_trial_of_one_epoch_still_shows_its_points(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lines alone drew nothing for one epoch, on an axis from 0.945 to 1.05 with fractional ticks.
    shown = _captured(monkeypatch)
    curves = {"train_loss": [[0.9], [1.1]], "val_loss": [[1.0], [1.2]]}
    trial = optuna.trial.create_trial(value=0.5, user_attrs={"fold_curves": curves, "metric_name": "accuracy"})
    assert figures.plot_training_curves(trial) is not None
    (ax,) = shown
    assert sorted(n for n in ax["points"] if n) == [1, 1]  # a marker per split
    assert ax["xlim"][0] <= 0.6 and ax["xlim"][1] >= 1.4
    assert ax["xticks"] == [1.0]
    assert ax["ylabel"] == "cross-entropy loss"


def test_a_regression_trial_says_its_loss_is_the_mse(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _captured(monkeypatch)
    curves = {"train_loss": [[3.0, 2.0, 1.0]], "val_loss": [[3.5, 2.5, 1.5]]}
    trial = optuna.trial.create_trial(value=0.5, user_attrs={"fold_curves": curves, "metric_name": "rmse"})
    assert figures.plot_training_curves(trial) is not None
    assert shown[0]["ylabel"] == "MSE loss"
    assert all(float(t).is_integer() for t in shown[0]["xticks"])


def test_a_table_shows_missing_values_blank() -> None:
    frame = pd.DataFrame({"a": [1.5, None], "b": pd.array([3, None], dtype="Int64"), "c": ["x", None]})
    html = figures.format_table(frame)
    assert "None" not in html and "NaN" not in html and "&lt;NA&gt;" not in html
    assert "1.5" in html and ">3<" in html


@pytest.mark.parametrize(
    ("curves", "scale"),
    [
        ({"train_loss": [[2.325, 2.31, 2.32]], "val_loss": [[2.314, 2.309, 2.306]]}, "linear"),  # a stuck trial
        ({"train_loss": [[2.1, 0.9, 0.25]], "val_loss": [[1.8, 0.9, 0.3]]}, "log"),
    ],
)
def test_loss_curves_get_plain_tick_labels(monkeypatch: pytest.MonkeyPatch, curves: Any, scale: str) -> None:
    # A log axis within one decade labelled its minor ticks "2.325×10⁰" (and a linear one
    # would put "+2.3" above the axis); a wide one read "6×10⁻¹".
    import matplotlib.pyplot as plt

    shown: list[tuple[str, list[str]]] = []

    def capture(fig: Any) -> str:
        ax = fig.axes[0]
        fig.canvas.draw()
        labels = [t.get_text() for t in [*ax.get_yticklabels(), *ax.get_yticklabels(minor=True)] if t.get_text()]
        shown.append((ax.get_yscale(), [*labels, ax.yaxis.get_offset_text().get_text()]))
        plt.close(fig)
        return ""

    monkeypatch.setattr(figures, "figure_to_base64", capture)
    trial = optuna.trial.create_trial(value=0.5, user_attrs={"fold_curves": curves, "metric_name": "accuracy"})
    assert figures.plot_training_curves(trial) is not None
    ((axis_scale, labels),) = shown
    assert axis_scale == scale
    assert len(labels) > 2 and not any("times" in label or "^" in label or "+" in label for label in labels), labels
