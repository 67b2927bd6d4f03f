"""The report's building blocks: sections, embedded figures and HTML tables.

Shared by the study report (:mod:`modelsel.report`) and the sweep sections
(:mod:`modelsel.sweeps`), which both render with them.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import LogFormatterSciNotation, MaxNLocator
from optuna.trial import FrozenTrial


@dataclass
class Figure:
    """One embedded plot of the report."""

    title: str
    png_base64: str
    caption: str = ""


@dataclass
class Section:
    """A titled part of the report: prose, tables (HTML from pandas) and figures."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    #: Long tables (e.g. one row per trial) scroll inside a box.
    scroll_tables: bool = False


def figure_to_base64(fig: plt.Figure) -> str:
    """Render a matplotlib figure as a base64 PNG and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class _PlainLogFormatter(LogFormatterSciNotation):
    """Labels the ticks matplotlib labels on a log axis, as plain numbers (``0.3``,
    ``2.31``) instead of ``3×10⁻¹`` and ``2.31×10⁰``; ``1e-05`` beyond four digits."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:.4g}" if super().__call__(x, pos) else ""


#: Loss curves spanning fewer times than this between their lowest and highest value are
#: drawn on a linear axis (a log axis within a decade labels only its minor ticks).
_LOG_SPAN = 3.0


def loss_axis(ax: plt.Axes, losses: pd.Series) -> None:
    """A log y axis for losses that span at least a factor of 3 (plain tick labels), else
    a linear one without an offset (``+2.3`` at the axis's top)."""
    low, high = float(losses.min()), float(losses.max())
    if low > 0 and high / low >= _LOG_SPAN:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PlainLogFormatter())
        ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    else:
        ax.set_yscale("linear")
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def plot_training_curves(trial: FrozenTrial, *, title: str | None = None) -> Figure | None:
    """Train/validation loss per epoch of one trial: fold mean with a min–max band."""
    fold_curves = trial.user_attrs.get("fold_curves")
    if not fold_curves:
        return None
    rows = []
    for split in ("train", "val"):
        for fold, curve in enumerate(fold_curves.get(f"{split}_loss", [])):
            rows += [
                {"epoch": epoch + 1, "loss": v, "split": split, "fold": fold}
                for epoch, v in enumerate(curve)
                if isinstance(v, (int, float))
            ]
    if not rows:
        return None
    data = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    # Markers, so that a trial of one epoch (a single point per split) still shows.
    sns.lineplot(data=data, x="epoch", y="loss", hue="split", errorbar=("pi", 100), marker="o", ax=ax)
    loss_axis(ax, data["loss"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    last_epoch = int(data["epoch"].max())
    if last_epoch == 1:  # MaxNLocator falls back to fractional ticks for a single integer
        ax.set_xlim(0.5, 1.5)
        ax.set_xticks([1])
    ax.set_ylabel("cross-entropy loss" if trial.user_attrs.get("metric_name", "accuracy") == "accuracy" else "MSE loss")
    sns.despine(fig)
    return Figure(
        title or f"Training curves of trial {trial.number}",
        figure_to_base64(fig),
        "Fold mean; the band spans the folds (min to max). Train loss is the running mean over batches.",
    )


def format_table(frame: pd.DataFrame) -> str:
    # na_rep covers NaN; a column of Nones (object dtype) would print "None".
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == "object":
            frame[column] = frame[column].map(lambda v: "" if v is None else v)
        elif isinstance(frame[column].dtype, pd.Int64Dtype):  # na_rep does not cover pd.NA
            frame[column] = frame[column].astype(object).where(frame[column].notna(), "")
    return frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0, classes="data")
