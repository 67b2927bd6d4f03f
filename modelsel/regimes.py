"""Regime labels: does a trained configuration underfit, fit well, overfit or diverge?

Two rules, both written out in plain words in the README ("Regimes"):

* :func:`classify` reads one trial's own numbers (train and validation error, the
  generalization gap, the loss curves) and is stored with every finished trial as the
  user attribute ``regime`` (with ``regime_reason`` and ``regime_evidence``).
* :func:`classify_in_context` relabels the cells of a sweep using their neighbours:
  the best cell trained on the same data is the yardstick, and a worse cell is
  underfit or overfit depending on which side of the best it lies on a capacity axis
  (the U-shaped validation curve), or else on whether its extra validation error comes
  from a higher training error or a larger gap. The report stores it as ``sweep_regime``.

Errors are the error rate (1 − accuracy) for classification and the MSE for
regression. Thresholds are shares of the *baseline error* (the training-split error of
the majority class or of the mean target), so one default serves every dataset.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelsel.spec import RegimeSpec, params_key, value_key

if TYPE_CHECKING:
    import torch

REGIMES = ("underfit", "good", "overfit", "diverged")

#: A classifier whose training cross-entropy went above this in some epoch has blown up,
#: and is labelled diverged unless it recovered, even when the loss stays finite (Adam at a
#: huge learning rate ends near 1e13, with a first epoch that already held the blow-up; at
#: lr 1 it falls back from 4e6 to 30, a dead network at chance). A trivial classifier's
#: cross-entropy is at most ln(classes), about 7 for 1000 classes. Regression has no such
#: scale: an untrained net's MSE is about mean(y)² + var(y), large for targets far from
#: zero (kelvins, years), so there only the ratio to the first epoch applies. A module
#: constant, not a ``regimes`` field: a new field would change every stored spec.
BLOWUP_CROSS_ENTROPY = 1e3

#: A training loss that ended this many times above its first epoch's blew up (the
#: ``diverge_ratio`` rule also labels a loss that rose a little diverged, e.g. by dropout's
#: noise at a learning rate too small to learn; :func:`blew_up` tells the two apart).
BLOWUP_RATIO = 10.0


def blew_up(regime: str | None, evidence: Mapping[str, Any] | None) -> bool:
    """Whether a trial labelled ``regime`` (with the ``regime_evidence`` :func:`classify`
    stored) blew up in training: diverged with a non-finite loss (pruned, or no loss curve
    in its evidence), a cross-entropy above :data:`BLOWUP_CROSS_ENTROPY`, or a training
    loss that ended :data:`BLOWUP_RATIO` times above its first epoch's. Such a trial is
    not selected, and its gradient flow reads exploding; a loss that merely rose is not."""
    if regime != "diverged":
        return False
    evidence = evidence or {}
    first, last = _number(evidence.get("train_loss_first")), _number(evidence.get("train_loss_last"))
    peak = _number(evidence.get("train_loss_peak"))
    if peak is not None and peak > BLOWUP_CROSS_ENTROPY:
        return True
    if first is None or last is None:  # a non-finite loss (pruned, or its numbers not finite)
        return True
    return first > 0 and last >= BLOWUP_RATIO * first


def trial_blew_up(attrs: Mapping[str, Any]) -> bool:
    """:func:`blew_up` for a stored trial's user attributes.

    A trial stored before the peak was recorded in every diverged verdict (the
    ``diverge_ratio`` rule fired first) is read from its stored training curve: a
    cross-entropy above :data:`BLOWUP_CROSS_ENTROPY` in any epoch. A trial the pruner
    stopped has no regime; its partial training curve tells: a cross-entropy still above
    :data:`BLOWUP_CROSS_ENTROPY` when it was stopped, or a loss :data:`BLOWUP_RATIO` times
    above its first epoch's (a trial stored before its task was recorded is judged by the
    ratio alone).
    """
    regime = attrs.get("regime")
    if blew_up(regime, attrs.get("regime_evidence")):
        return True
    curve = [float(v) for v in (attrs.get("curves") or {}).get("train_loss") or [] if _is_number(v)]
    if regime is None and attrs.get("pruned_at_epoch") is not None and curve:
        if attrs.get("metric_name") == "accuracy" and curve[-1] > BLOWUP_CROSS_ENTROPY:
            return True
        return len(curve) >= 2 and curve[0] > 0 and curve[-1] >= BLOWUP_RATIO * curve[0]
    if regime != "diverged" or attrs.get("metric_name", "accuracy") != "accuracy":
        return False
    return any(value > BLOWUP_CROSS_ENTROPY for value in curve)


#: How a larger value of a model/training field changes capacity: +1 more, -1 less.
CAPACITY_DIRECTION: dict[str, int] = {
    "width": 1,
    "depth": 1,
    "degree": 1,
    "epochs": 1,
    "weight_decay": -1,
    "l1": -1,
    "dropout": -1,
}


@dataclass(frozen=True)
class TrialNumbers:
    """What the regime rule reads about one trained configuration (fold means).

    ``*_error`` is the error rate for classification and the MSE for regression; the
    loss curves are fold means per epoch; ``final_epoch`` is the (0-based) epoch whose
    weights the folds ended with (early stopping restores an earlier one).
    """

    train_error: float
    val_error: float
    baseline_error: float | None = None
    train_loss_curve: Sequence[float] = ()
    val_loss_curve: Sequence[float] = ()
    final_epoch: int | None = None
    fold_train_errors: Sequence[float] = ()
    fold_val_errors: Sequence[float] = ()
    #: Whether the losses are cross-entropies (the errors error rates), else MSEs.
    classification: bool = True

    @property
    def gap(self) -> float:
        return self.val_error - self.train_error


@dataclass
class Verdict:
    """A regime label with the plain-words reason and the numbers behind it."""

    regime: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ from storage


def baseline_error(y_train: torch.Tensor, task: str) -> float:
    """Training-split error of a trivial predictor: the majority class's error rate
    (classification) or the variance of the target, i.e. the MSE of predicting its mean."""
    if task == "classification":
        counts = y_train.long().bincount()
        return 1.0 - float(counts.max()) / float(counts.sum())
    return float(y_train.double().var(unbiased=False))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def _kept_mean(fold_curves: Sequence[Sequence[Any]], final_epochs: Sequence[Any]) -> list[float]:
    """Per-epoch mean over folds of each fold's curve cut at the epoch it kept (its last
    kept value carried to later epochs); empty when the folds do not line up."""
    if len(fold_curves) != len(final_epochs) or not all(fold_curves):
        return []
    kept = [list(curve[: max(1, int(final))]) for curve, final in zip(fold_curves, final_epochs, strict=True)]
    means = []
    for epoch in range(max(len(curve) for curve in kept)):
        values = [_number(curve[min(epoch, len(curve) - 1)]) for curve in kept]
        numbers = [v for v in values if v is not None]
        means.append(statistics.fmean(numbers) if len(numbers) == len(values) else math.nan)
    return means


def numbers_from_attrs(attrs: Mapping[str, Any]) -> TrialNumbers | None:
    """The rule's inputs from a finished trial's user attributes (None if incomplete)."""
    classification = attrs.get("metric_name", "accuracy") == "accuracy"
    if classification:
        fold_train = [1.0 - v for v in attrs.get("fold_train_metric") or [] if _is_number(v)]
        fold_val = [1.0 - v for v in attrs.get("fold_val_metric") or [] if _is_number(v)]
        train_metric, val_metric = _number(attrs.get("train_metric_mean")), _number(attrs.get("val_metric_mean"))
        train = None if train_metric is None else 1.0 - train_metric
        val = None if val_metric is None else 1.0 - val_metric
    else:
        fold_train = [v for v in attrs.get("fold_train_loss") or [] if _is_number(v)]
        fold_val = [v for v in attrs.get("fold_val_loss") or [] if _is_number(v)]
        train, val = _number(attrs.get("train_loss_mean")), _number(attrs.get("val_loss_mean"))
    if train is None or val is None:
        return None
    curves = attrs.get("curves") or {}
    final_epochs = attrs.get("final_epochs") or []
    lengths = [len(c) for c in (attrs.get("fold_curves") or {}).get("val_loss", [])]
    # The epoch whose weights the folds ended with, on the fold-mean curve: the last one
    # unless early stopping restored earlier weights in every fold.
    final_epoch = None
    if final_epochs and lengths and any(f != n for f, n in zip(final_epochs, lengths, strict=False)):
        final_epoch = max(final_epochs) - 1
    baseline = _number(attrs.get("baseline_error"))
    fold_curves = attrs.get("fold_curves") or {}
    train_curve, val_curve = curves.get("train_loss", []), curves.get("val_loss", [])
    if final_epoch is not None:
        # Each fold up to the epoch whose weights it kept, its kept value carried on: a fold
        # that stopped early and blew up after its kept epoch no longer reads as a blow-up.
        train_curve = _kept_mean(fold_curves.get("train_loss") or [], final_epochs) or train_curve
        val_curve = _kept_mean(fold_curves.get("val_loss") or [], final_epochs) or val_curve
    return TrialNumbers(
        train_error=train,
        val_error=val,
        baseline_error=baseline if baseline is not None and baseline > 0 else None,
        train_loss_curve=[float(v) if _is_number(v) else math.nan for v in train_curve],
        val_loss_curve=[float(v) if _is_number(v) else math.nan for v in val_curve],
        final_epoch=final_epoch,
        fold_train_errors=fold_train,
        fold_val_errors=fold_val,
        classification=classification,
    )


def error_name(metric_name: str) -> str:
    """What 'error' means for a trial whose metric is ``metric_name``."""
    return "error" if metric_name == "accuracy" else "MSE"


# ------------------------------------------------------------- own numbers only


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def curve_shape(numbers: TrialNumbers) -> dict[str, Any]:
    """Validation-loss rise above its minimum, up to the epoch the weights come from,
    and whether the training loss fell over the same epochs."""
    val = list(numbers.val_loss_curve)
    train = list(numbers.train_loss_curve)
    if not val or not _finite(val):
        return {}
    end = len(val) - 1 if numbers.final_epoch is None else min(numbers.final_epoch, len(val) - 1)
    best_epoch = min(range(end + 1), key=lambda e: val[e])
    low = val[best_epoch]
    rise = (val[end] - low) / low if low > 0 else 0.0
    fell = bool(train) and len(train) > end and train[end] < train[best_epoch]
    return {
        "val_loss_min": low,
        "val_loss_min_epoch": best_epoch + 1,
        "val_loss_end": val[end],
        "val_rise": rise,
        "train_loss_fell_after_min": fell,
    }


#: The share of the first epoch's training loss that the ``diverge_ratio`` rule reads as
#: noise: dropout at a learning rate far too small rose 1.0% (diverged); a 16-layer GELU
#: net stuck at chance 0.001% (underfit, not diverged).
_LOSS_NOISE = 1e-3


def classify(numbers: TrialNumbers, *, thresholds: RegimeSpec | None = None) -> Verdict:
    """Label one trial from its own numbers.

    In order, the first that holds:

    1. ``diverged``: a non-finite error or loss, the last epoch's training loss above
       ``diverge_ratio`` × the first epoch's (by more than 0.1% of it), or (classification) an epoch's training
       cross-entropy above :data:`BLOWUP_CROSS_ENTROPY` that the model did not recover
       from (it ended there, or with a training error that the underfit rule would flag);
    2. ``underfit``: training error ≥ ``underfit_error`` × baseline error;
    3. ``overfit``: gap (val − train error) ≥ ``overfit_gap`` × baseline error, or the
       validation loss ended ≥ ``val_rise`` above its minimum while the training loss
       kept falling;
    4. ``good``.
    """
    t = thresholds or RegimeSpec()
    evidence: dict[str, Any] = {
        "train_error": numbers.train_error,
        "val_error": numbers.val_error,
        "gap": numbers.gap,
        "baseline_error": numbers.baseline_error,
    }
    values = [numbers.train_error, numbers.val_error, *numbers.train_loss_curve, *numbers.val_loss_curve]
    if not _finite(values):
        return Verdict("diverged", "a loss or error is not finite", evidence)
    train_curve = list(numbers.train_loss_curve)
    if numbers.final_epoch is not None:  # early stopping kept this epoch's weights: judge those
        train_curve = train_curve[: numbers.final_epoch + 1]
    peak = max(train_curve, default=0.0)
    blew = numbers.classification and peak > BLOWUP_CROSS_ENTROPY
    if blew:  # recorded before the rules below, so that blew_up() sees it whichever labels it
        evidence.update(train_loss_peak=peak, train_loss_peak_epoch=train_curve.index(peak) + 1)
    if len(train_curve) >= 2:
        first, last = train_curve[0], train_curve[-1]
        evidence.update(train_loss_first=first, train_loss_last=last)
        # Within _LOSS_NOISE of the first epoch's loss past the line is not divergence: a net
        # stuck at chance wanders by that much (2.30436 to 2.30439).
        if last - t.diverge_ratio * first > _LOSS_NOISE * abs(first):
            return Verdict(
                "diverged",
                f"training loss ended at {last:.4g}, above its first-epoch value {first:.4g}",
                evidence,
            )
    baseline = numbers.baseline_error
    if blew:
        peak_epoch = evidence["train_loss_peak_epoch"]
        blown = (
            f"training cross-entropy reached {peak:.4g} in epoch {peak_epoch}, above {BLOWUP_CROSS_ENTROPY:g} "
            "(a trivial classifier's is at most ln(classes)): it blew up"
        )
        if train_curve[-1] > BLOWUP_CROSS_ENTROPY:
            return Verdict("diverged", f"{blown}, and ended at {train_curve[-1]:.4g}", evidence)
        # A blow-up that the model recovered from (to within the underfit threshold) is
        # judged on where it ended; one it did not is the learning rate's doing, not a
        # lack of capacity, so it is not called underfit.
        if baseline and numbers.train_error / baseline >= t.underfit_error:
            return Verdict(
                "diverged",
                f"{blown}, and never recovered (training error {numbers.train_error:.4g}, "
                f"{numbers.train_error / baseline:.0%} of the trivial predictor's)",
                evidence,
            )
    if baseline:
        train_share = numbers.train_error / baseline
        gap_share = numbers.gap / baseline
        evidence.update(train_share=train_share, gap_share=gap_share)
        if train_share >= t.underfit_error:
            return Verdict(
                "underfit",
                f"training error {numbers.train_error:.4g} is {train_share:.0%} of the trivial "
                f"predictor's {baseline:.4g} (threshold {t.underfit_error:.0%})",
                evidence,
            )
        if gap_share >= t.overfit_gap:
            return Verdict(
                "overfit",
                f"validation error {numbers.val_error:.4g} exceeds training error {numbers.train_error:.4g} "
                f"by {numbers.gap:.4g}, {gap_share:.0%} of the trivial predictor's error "
                f"(threshold {t.overfit_gap:.0%})",
                evidence,
            )
    shape = curve_shape(numbers)
    evidence.update(shape)
    if shape and shape["val_rise"] >= t.val_rise and shape["train_loss_fell_after_min"]:
        return Verdict(
            "overfit",
            f"validation loss rose {shape['val_rise']:.0%} above its minimum (epoch "
            f"{shape['val_loss_min_epoch']}) while training loss kept falling",
            evidence,
        )
    return Verdict("good", "fits its training data and generalizes within the thresholds", evidence)


# --------------------------------------------------------------- sweep context


@dataclass
class Cell:
    """One finished trial of a sweep, for :func:`classify_in_context`.

    ``axes`` holds the swept values (without the repeat seed); ``data_key`` identifies
    the data the cell was trained on (values of swept dataset fields such as
    ``train_size``); cells are compared only with cells of the same data.
    """

    axes: dict[str, Any]
    numbers: TrialNumbers
    own: Verdict
    seed: Any = None
    data_key: tuple[Any, ...] = ()

    @property
    def cell_key(self) -> tuple[Any, ...]:
        """The cell's grid values as a comparable key (0 and 0.0, or a numpy scalar, agree)."""
        return params_key(self.axes)


def _capacity_value(value: Any) -> float | None:
    if hasattr(value, "item") and not isinstance(value, (list, tuple, str)):  # a numpy scalar (a frame's cell)
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if _is_number(value):
        return float(value)
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return float(sum(value))  # per-layer widths: total units
    return None


def capacity_side(axes: Mapping[str, Any], best: Mapping[str, Any]) -> tuple[int, list[str]]:
    """Whether ``axes`` has more (+1) or less (-1) capacity than ``best``; 0 when axes
    disagree or one that differs has no known direction. Also the differing axes."""
    signs: set[int] = set()
    differing: list[str] = []
    for axis, value in axes.items():
        if value_key(value) == value_key(best.get(axis)):
            continue
        differing.append(axis)
        field_name = axis.rpartition(".")[2]
        direction = CAPACITY_DIRECTION.get(field_name)
        here, there = _capacity_value(value), _capacity_value(best.get(axis))
        if direction is None or here is None or there is None or here == there:
            return 0, differing
        signs.add(direction * (1 if here > there else -1))
    return (signs.pop() if len(signs) == 1 else 0), differing


def _paired_difference(rows: Sequence[Cell], best_rows: Sequence[Cell]) -> tuple[float, float]:
    """Mean and standard error of a cell's validation error minus the best cell's.

    Folds are shared by cells trained with the same seed on the same data, so the
    per-fold differences are paired (pooled over repeats); when a row has no partner
    the best cell's own fold spread gives the standard error.
    """
    diffs: list[float] = []
    for row in rows:
        partner = next((b for b in best_rows if value_key(b.seed) == value_key(row.seed)), None)
        mine = list(row.numbers.fold_val_errors)
        if partner is None or not mine or len(partner.numbers.fold_val_errors) != len(mine):
            diffs = []
            break
        diffs += [a - b for a, b in zip(mine, partner.numbers.fold_val_errors, strict=True)]
    if diffs:
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
        return statistics.fmean(diffs), se
    best_val = statistics.fmean(b.numbers.val_error for b in best_rows)
    folds = [e for b in best_rows for e in b.numbers.fold_val_errors]
    se = statistics.stdev(folds) / math.sqrt(len(folds)) if len(folds) > 1 else 0.0
    return statistics.fmean(r.numbers.val_error for r in rows) - best_val, se


def _fmt_axes(axes: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in axes.items())


def classify_in_context(cells: Sequence[Cell], *, thresholds: RegimeSpec | None = None) -> list[Verdict]:
    """Relabel the cells of a sweep using their neighbours (same order as ``cells``).

    Within the cells trained on the same data, the best cell (lowest validation error,
    averaged over every repeat; not a cell whose every repeat blew up) is the yardstick:

    * a cell whose own numbers say ``diverged``, ``underfit`` or ``overfit`` keeps it;
    * a cell within ``tolerance_se`` standard errors (of the paired per-fold difference)
      or within ``tolerance_rel`` of the best validation error is ``good``;
    * a worse cell on a capacity axis is ``overfit`` when it has more capacity than the
      best cell (wider, deeper, higher degree, more epochs, less weight decay, L1 or
      dropout) and ``underfit`` when it has less: the two sides of the U-shaped
      validation curve;
    * when the axes disagree or have no capacity direction, the worse cell is
      ``underfit`` if its extra validation error over the best comes more from a higher
      training error, ``overfit`` if more from a larger gap.
    """
    t = thresholds or RegimeSpec()
    verdicts: list[Verdict | None] = [None] * len(cells)
    slices: dict[tuple[Any, ...], list[int]] = {}
    for index, cell in enumerate(cells):
        slices.setdefault(tuple(value_key(k) for k in cell.data_key), []).append(index)
    for members in slices.values():
        # Every seed counts in its cell's mean, and a cell whose every seed blew up cannot
        # be the best: the rules of the study's selection and of sweep.csv's best_cell.
        by_cell: dict[tuple[Any, ...], list[int]] = {}
        for index in members:
            by_cell.setdefault(cells[index].cell_key, []).append(index)
        candidates = [
            key
            for key, rows in by_cell.items()
            if any(not blew_up(cells[i].own.regime, cells[i].own.evidence) for i in rows)
        ]
        if not candidates:
            continue

        ranks = {
            key: (statistics.fmean(cells[i].numbers.val_error for i in by_cell[key]), min(by_cell[key]))
            for key in candidates
        }
        best_key = min(candidates, key=ranks.__getitem__)
        best_rows = [cells[i] for i in by_cell[best_key]]
        best = best_rows[0]
        best_val = statistics.fmean(b.numbers.val_error for b in best_rows)
        best_train = statistics.fmean(b.numbers.train_error for b in best_rows)
        best_gap = best_val - best_train
        for index in members:
            cell = cells[index]
            evidence: dict[str, Any] = {
                **cell.own.evidence,
                "best_cell": _fmt_axes(best.axes),
                "best_val_error": best_val,
                "own_regime": cell.own.regime,
            }
            if cell.own.regime != "good":
                verdicts[index] = Verdict(cell.own.regime, cell.own.reason, evidence)
                continue
            if cell.cell_key == best_key:
                verdicts[index] = Verdict("good", "lowest validation error of the sweep", evidence)
                continue
            # A cell is judged as a whole (its repeats pooled); its own-number labels stay per row.
            rows = [cells[i] for i in by_cell[cell.cell_key]]
            diff, se = _paired_difference(rows, best_rows)
            band = max(t.tolerance_se * se, t.tolerance_rel * best_val)
            d_train = statistics.fmean(r.numbers.train_error for r in rows) - best_train
            d_gap = statistics.fmean(r.numbers.gap for r in rows) - best_gap
            evidence.update(val_excess=diff, val_excess_se=se, tolerance=band, d_train=d_train, d_gap=d_gap)
            if diff <= band:
                verdicts[index] = Verdict(
                    "good",
                    f"validation error within {band:.3g} of the best cell ({_fmt_axes(best.axes)}); "
                    f"excess {diff:.3g} ± {se:.2g}",
                    evidence,
                )
                continue
            from_gap = d_gap > d_train
            side, differing = capacity_side(cell.axes, best.axes)
            evidence.update(capacity_side=side, excess_from="gap" if from_gap else "training error")
            where = f"validation error {diff:.3g} above the best cell ({_fmt_axes(best.axes)})"
            if side != 0:
                regime = "overfit" if side > 0 else "underfit"
                more = "more" if side > 0 else "less"
                reason = f"{more} capacity than the best cell ({', '.join(differing)}) and {where}"
                if from_gap != (side > 0):
                    reason += (
                        "; note: its extra error comes more from a "
                        + ("larger gap" if from_gap else "higher training error")
                        + f" (train {d_train:+.3g}, gap {d_gap:+.3g})"
                    )
            else:
                regime = "overfit" if from_gap else "underfit"
                reason = (
                    f"{where}, mostly from a "
                    + ("larger gap" if from_gap else "higher training error")
                    + f" (train {d_train:+.3g}, gap {d_gap:+.3g})"
                )
            verdicts[index] = Verdict(regime, reason, evidence)
    return [
        v if v is not None else Verdict(c.own.regime, c.own.reason, dict(c.own.evidence))
        for v, c in zip(verdicts, cells, strict=True)
    ]


#: How many times smaller (vanishing) or larger (exploding) than the output layer's the
#: first layer's gradient norm must be for :func:`gradient_flow` to say so. On digits
#: (width 64, SGD, 10 epochs) every net whose ratio was below 1/100 stayed at chance
#: (sigmoid at depth 4: 3e-3; 16 ReLU layers at Xavier init: 3e-3), and none that trained
#: was below 2e-2.
GRADIENT_FLOW_RATIO = 1e2

#: A training cross-entropy above this at the last epoch: confidently wrong far beyond a
#: trivial classifier (whose cross-entropy is at most ln(classes), 6.9 for 1,000 classes),
#: so the updates blew the logits up (Adam at lr 7 thrashed at 110 on Fashion-MNIST).
THRASH_CROSS_ENTROPY = 20.0


def gradient_flow(
    grad_norms: Mapping[str, Sequence[float | str]],
    *,
    preactivation_grad_norms: Mapping[str, Sequence[float | str]] | None = None,
    ratio: float = GRADIENT_FLOW_RATIO,
    exploded: bool = False,
) -> tuple[str, float] | None:
    """Label how a trial's gradient reached its first layer, from its stored gradient norms.

    Parameters
    ----------
    grad_norms
        Per linear layer (``hidden1`` … ``output``), the fold-mean L2 norm of the weight
        gradient at the first batch of each epoch (the trial attribute ``grad_norms``).
    preactivation_grad_norms
        Per linear layer, the fold-mean L2 norm of the loss's gradient with respect to the
        layer's output at the same batches (the trial attribute
        ``preactivation_grad_norms``; trials stored before modelsel recorded it have none).
        When given, the ratio is taken from it: it is the backward signal alone (D2L's
        product of layer Jacobians), where a weight gradient is that signal times the
        layer's input, so that a forward signal shrinking layer by layer (deep ReLU or
        tanh nets at PyTorch's default init) shrinks the output layer's weight gradient
        as much as the first layer's and hides the vanishing.
    ratio
        The factor between the first and the output layer's norms (first epoch) beyond
        which the gradient counts as vanishing or exploding.
    exploded
        The trial's updates exploded (:func:`updates_exploded`), which the first batch,
        measured before any update, cannot show.

    Returns
    -------
    tuple of (str, float), or None
        ``("vanishing" | "healthy" | "exploding", first / output)`` at the first batch;
        ``exploding`` whatever the ratio when the training blew up, and with an infinite
        ratio when a stored norm (any epoch) is not finite; None for a model without
        hidden layers, or with no gradient at the output layer.
    """
    norms = preactivation_grad_norms if preactivation_grad_norms else grad_norms
    first_layer, output = norms.get("hidden1"), norms.get("output")
    if not first_layer or not output:
        return None
    stored = [*grad_norms.values(), *(preactivation_grad_norms or {}).values()]
    if not all(math.isfinite(float(norm)) for per_epoch in stored for norm in per_epoch):
        return "exploding", math.inf
    first, last = float(first_layer[0]), float(output[0])
    if last == 0.0:
        return ("exploding", math.inf) if exploded else None
    flow = first / last
    if exploded:
        return "exploding", flow
    if flow < 1.0 / ratio:
        return "vanishing", flow
    if flow > ratio:
        return "exploding", flow
    return "healthy", flow


def trial_gradient_flow(attrs: Mapping[str, Any]) -> tuple[str, float] | None:
    """:func:`gradient_flow` of a stored trial, from its user attributes (``grad_norms``,
    ``preactivation_grad_norms``, and whether its updates exploded: :func:`updates_exploded`)."""
    return gradient_flow(
        attrs.get("grad_norms") or {},
        preactivation_grad_norms=attrs.get("preactivation_grad_norms"),
        exploded=updates_exploded(attrs),
    )


def updates_exploded(attrs: Mapping[str, Any]) -> bool:
    """Whether a stored trial's updates exploded during training, which its first batch,
    measured before any update, cannot show: its training blew up (:func:`trial_blew_up`),
    the updates left it without any gradient (the backward signal of every hidden layer
    exactly 0 at the first batch of a later epoch, after a non-zero first: a learning rate
    so large that every ReLU died; for trials stored before that signal, every layer's
    weight gradient), or (classification) it ended with a training cross-entropy above
    :data:`THRASH_CROSS_ENTROPY`. Under early stopping only the epochs up to the one whose
    weights the folds kept count, as for the regime."""
    if trial_blew_up(attrs):
        return True
    numbers = numbers_from_attrs(attrs)  # None for a pruned trial
    kept = None if numbers is None or numbers.final_epoch is None else numbers.final_epoch + 1
    signal = attrs.get("preactivation_grad_norms")
    if signal:  # an L1 penalty keeps a dead net's weight gradients from 0, not this
        stored = [norms for layer, norms in signal.items() if layer != "output" and norms]
    else:
        stored = [norms for norms in (attrs.get("grad_norms") or {}).values() if norms]
    per_layer = [[float(v) for v in norms][:kept] for norms in stored]
    epochs = min((len(norms) for norms in per_layer), default=0)
    died = any(all(norms[epoch] == 0.0 for norms in per_layer) for epoch in range(1, epochs))
    if died and any(norms[0] > 0 for norms in per_layer):
        return True
    if attrs.get("metric_name") != "accuracy":  # regression, or a pruned trial stored before its task was
        return False
    if numbers is not None:
        curve = list(numbers.train_loss_curve)
    else:
        curve = [float(v) for v in (attrs.get("curves") or {}).get("train_loss") or [] if _is_number(v)]
    return bool(curve) and curve[-1] > THRASH_CROSS_ENTROPY
