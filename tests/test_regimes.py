"""Tests of modelsel.regimes: the regime rule on constructed numbers and curves, in and
out of sweep context, and on the numbers of D2L's polynomial example."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from modelsel.errors import SpecError
from modelsel.regimes import (
    Cell,
    TrialNumbers,
    baseline_error,
    blew_up,
    capacity_side,
    classify,
    classify_in_context,
    gradient_flow,
    numbers_from_attrs,
    trial_blew_up,
    trial_gradient_flow,
)
from modelsel.spec import RegimeSpec, parse_spec

FALLING = [2.0, 1.0, 0.6, 0.4, 0.3, 0.25, 0.22, 0.2]


def numbers(train: float, val: float, *, baseline: float | None = 0.9, **kwargs: Any) -> TrialNumbers:
    kwargs.setdefault("train_loss_curve", FALLING)
    kwargs.setdefault("val_loss_curve", [v * 1.1 for v in FALLING])
    return TrialNumbers(train_error=train, val_error=val, baseline_error=baseline, **kwargs)


# ------------------------------------------------------------ own numbers only


def test_good_fits_and_generalizes() -> None:
    verdict = classify(numbers(0.01, 0.03))
    assert verdict.regime == "good"
    assert verdict.evidence["gap"] == pytest.approx(0.02)
    assert verdict.evidence["gap_share"] == pytest.approx(0.02 / 0.9)


def test_underfit_when_training_error_is_high() -> None:
    verdict = classify(numbers(0.4, 0.42))
    assert verdict.regime == "underfit"
    assert "training error" in verdict.reason
    assert verdict.evidence["train_share"] == pytest.approx(0.4 / 0.9)


def test_overfit_by_gap() -> None:
    verdict = classify(numbers(0.0, 0.12))
    assert verdict.regime == "overfit"
    assert "exceeds training error" in verdict.reason


def test_overfit_by_validation_loss_rising_while_training_loss_falls() -> None:
    val = [1.0, 0.6, 0.45, 0.4, 0.42, 0.47, 0.52, 0.6]  # min 0.4 at epoch 4, ends 50% above it
    verdict = classify(numbers(0.02, 0.04, val_loss_curve=val))
    assert verdict.regime == "overfit"
    assert verdict.evidence["val_rise"] == pytest.approx(0.5)
    assert verdict.evidence["val_loss_min_epoch"] == 4
    assert "rose" in verdict.reason


def test_rising_validation_loss_with_flat_training_loss_is_not_overfitting() -> None:
    train = [0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]
    val = [1.0, 0.4, 0.45, 0.5, 0.5, 0.5, 0.5, 0.5]
    train = [*train[:-1], 0.41]  # training loss did not fall after the validation minimum
    assert classify(numbers(0.02, 0.04, train_loss_curve=train, val_loss_curve=val)).regime == "good"


def test_early_stopping_weights_at_the_minimum_are_not_overfit() -> None:
    val = [1.0, 0.6, 0.4, 0.45, 0.5, 0.6]
    stopped = numbers(0.02, 0.04, train_loss_curve=FALLING[:6], val_loss_curve=val, final_epoch=2)
    assert classify(stopped).regime == "good"
    assert classify(numbers(0.02, 0.04, train_loss_curve=FALLING[:6], val_loss_curve=val)).regime == "overfit"


def test_diverged_on_non_finite_or_rising_training_loss() -> None:
    assert classify(numbers(0.1, math.nan)).regime == "diverged"
    assert classify(numbers(0.1, 0.1, train_loss_curve=[1.0, math.inf])).regime == "diverged"
    rising = classify(numbers(0.5, 0.5, train_loss_curve=[2.3, 5.0, 40.0]))
    assert rising.regime == "diverged"
    assert "above its first-epoch value" in rising.reason
    # A 16-layer GELU net stuck at chance: its loss wandered up by 0.001%, which is not divergence.
    stuck = classify(numbers(0.9, 0.9, train_loss_curve=[2.30436, 2.30421, 2.30439]))
    assert stuck.regime == "underfit"
    assert classify(numbers(0.9, 0.9, train_loss_curve=[0.6929, 0.6999])).regime == "diverged"  # 1%: still


def test_a_finite_blow_up_is_diverged_even_when_the_first_epoch_held_it() -> None:
    # Adam at lr 1e6: the first epoch's running loss already held the blow-up, so the
    # loss "fell" from 2.6e13 to 1.4e13, and the trial was labelled underfit.
    blown = classify(numbers(0.9, 0.9, train_loss_curve=[2.6e13, 1.4e13]))
    assert blown.regime == "diverged"
    assert "it blew up" in blown.reason
    # A poor but sane fit is not: chance-level cross-entropy is about ln(10) = 2.3.
    assert classify(numbers(0.9, 0.9, train_loss_curve=[2.4, 2.3])).regime == "underfit"
    # Nor is a slow regressor of targets far from zero (kelvins: an MSE near mean² ~ 9e4
    # that falls), whose baseline (the variance) is 1.4.
    slow = TrialNumbers(
        train_error=8.97e4, val_error=8.98e4, baseline_error=1.4,
        train_loss_curve=[89836.0, 89808.3, 89780.8], val_loss_curve=[89800.0, 89790.0, 89780.0],
        classification=False,
    )
    assert classify(slow).regime == "underfit"


def test_a_blow_up_the_model_never_recovered_from_is_diverged_not_underfit() -> None:
    # Adam at lr 1 on digits: the cross-entropy fell back from 4e6 to 32, a dead network
    # at chance, and was labelled underfit, as if it lacked capacity.
    dead = classify(numbers(0.899, 0.9, train_loss_curve=[4.21e6, 9933.0, 2818.0, 82.6, 32.3]))
    assert dead.regime == "diverged"
    assert "reached 4.21e+06 in epoch 1" in dead.reason and "never recovered" in dead.reason
    assert dead.evidence["train_loss_peak_epoch"] == 1
    # One that recovered is judged on where it ended.
    assert classify(numbers(0.01, 0.03, train_loss_curve=[5000.0, 0.5, 0.2])).regime == "good"
    assert classify(numbers(0.01, 0.2, train_loss_curve=[5000.0, 0.5, 0.2])).regime == "overfit"


def test_blew_up_tells_a_blow_up_from_a_loss_that_merely_rose() -> None:
    assert blew_up("diverged", None)  # pruned for a NaN loss: no evidence stored
    assert blew_up("diverged", {"train_error": 0.1})  # a loss that is not finite
    assert blew_up("diverged", {"train_loss_first": 4.2e6, "train_loss_last": 32.3, "train_loss_peak": 4.2e6})
    assert blew_up("diverged", {"train_loss_first": 2.3, "train_loss_last": 40.0})  # 17x its first epoch
    # Dropout's noise at a learning rate far too small: diverged by diverge_ratio 1.0, not blown up.
    assert not blew_up("diverged", {"train_loss_first": 0.6929, "train_loss_last": 0.6999})
    assert not blew_up("underfit", None)
    # Adam at lr 1e6 whose cross-entropy rose from 6e11 to 7e11: the diverge_ratio rule
    # labels it first, and its evidence still shows the blow-up.
    rising = classify(numbers(0.9, 0.9, train_loss_curve=[6.0e11, 6.9e11]))
    assert "above its first-epoch value" in rising.reason
    assert blew_up(rising.regime, rising.evidence)
    # Stored before the peak went into every diverged verdict: read from the stored curve.
    stored = {"regime": "diverged", "regime_evidence": {"train_loss_first": 2.3, "train_loss_last": 2.5},
              "metric_name": "accuracy", "curves": {"train_loss": [2.3, 5000.0, 2.5]}}
    assert trial_blew_up(stored) and not blew_up(stored["regime"], stored["regime_evidence"])
    assert not trial_blew_up({**stored, "metric_name": "rmse"})  # an MSE of 5000 may be a fine regression


def test_a_trial_the_pruner_stopped_is_judged_by_its_partial_training_curve() -> None:
    pruned = {"pruned_at_epoch": 2, "metric_name": "accuracy"}
    assert trial_blew_up({**pruned, "curves": {"train_loss": [1.2e18, 8.8e17]}})  # still blown when stopped
    assert trial_blew_up({**pruned, "curves": {"train_loss": [2.3, 45.0]}})  # 20x its first epoch
    assert not trial_blew_up({**pruned, "curves": {"train_loss": [5000.0, 0.9]}})  # recovering when stopped
    assert not trial_blew_up({**pruned, "curves": {"train_loss": [2.3, 1.9]}})
    # A regression's MSE may be large; only its rise counts. Without the task stored, the same.
    assert not trial_blew_up({**pruned, "metric_name": "rmse", "curves": {"train_loss": [5.0e4]}})
    assert trial_blew_up({**pruned, "metric_name": "rmse", "curves": {"train_loss": [5.0e4, 6.0e5]}})
    assert not trial_blew_up({"pruned_at_epoch": 1, "curves": {"train_loss": [1.0e18]}})
    assert not trial_blew_up({**pruned, "curves": {}})


def test_early_stopping_judges_the_epoch_whose_weights_were_kept() -> None:
    # Restored from epoch 2; the later epochs blew up, and the trial read diverged.
    kept = TrialNumbers(
        train_error=0.05, val_error=0.08, baseline_error=0.9, train_loss_curve=[0.7, 0.3, 5000.0, 8000.0],
        final_epoch=1, classification=True,
    )
    assert classify(kept).regime == "good"
    assert classify(TrialNumbers(**{**kept.__dict__, "final_epoch": None})).regime == "diverged"


def test_a_fold_that_blew_up_after_its_kept_epoch_does_not_make_the_trial_diverged() -> None:
    # The fold-mean curve carried fold 0's last value (3000, after the epoch it kept) on
    # to the end: "training loss ended at 1500", though both folds' kept weights are fine.
    fold0 = [2.3, 1.0, 0.5, 0.6, 3000.0]
    fold1 = [2.3, 1.0, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1]
    mean = [(fold0[min(e, 4)] + fold1[e]) / 2 for e in range(8)]
    attrs = {
        "metric_name": "accuracy", "baseline_error": 0.9, "train_metric_mean": 0.95, "val_metric_mean": 0.93,
        "fold_train_metric": [0.95, 0.95], "fold_val_metric": [0.93, 0.93], "final_epochs": [3, 8],
        "curves": {"train_loss": mean, "val_loss": [v * 1.1 for v in mean]},
        "fold_curves": {"train_loss": [fold0, fold1], "val_loss": [[v * 1.1 for v in fold0], [v * 1.1 for v in fold1]]},
    }
    numbers = numbers_from_attrs(attrs)
    assert numbers is not None
    assert numbers.train_loss_curve[-1] == pytest.approx((0.5 + 0.1) / 2)
    assert classify(numbers).regime == "good"


def test_precedence_diverged_then_underfit_then_overfit() -> None:
    both = numbers(0.4, 0.6)  # high training error and a large gap
    assert classify(both).regime == "underfit"
    assert classify(numbers(0.4, 0.6, train_loss_curve=[1.0, 2.0])).regime == "diverged"


def test_thresholds_are_options() -> None:
    assert classify(numbers(0.3, 0.31)).regime == "underfit"
    assert classify(numbers(0.3, 0.31), thresholds=RegimeSpec(underfit_error=0.5)).regime == "good"
    assert classify(numbers(0.0, 0.03), thresholds=RegimeSpec(overfit_gap=0.02)).regime == "overfit"
    rising = numbers(0.5, 0.5, train_loss_curve=[1.0, 1.05])
    assert classify(rising, thresholds=RegimeSpec(diverge_ratio=1.1)).regime != "diverged"


def test_without_a_baseline_only_curves_decide() -> None:
    assert classify(numbers(0.4, 0.6, baseline=None)).regime == "good"


def test_baseline_error() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    assert baseline_error(labels, "classification") == pytest.approx(0.5)
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert baseline_error(target, "regression") == pytest.approx(1.25)


def test_numbers_from_attrs_classification_and_regression() -> None:
    attrs = {
        "metric_name": "accuracy",
        "train_metric_mean": 0.99,
        "val_metric_mean": 0.9,
        "fold_train_metric": [1.0, 0.98],
        "fold_val_metric": [0.92, 0.88],
        "curves": {"train_loss": [1.0, 0.5], "val_loss": [1.1, "nan"]},
        "fold_curves": {"val_loss": [[1.1, 0.6], [1.1, 0.6]]},
        "final_epochs": [2, 2],
        "baseline_error": 0.5,
    }
    got = numbers_from_attrs(attrs)
    assert got is not None
    assert got.train_error == pytest.approx(0.01)
    assert got.val_error == pytest.approx(0.1)
    assert list(got.fold_val_errors) == pytest.approx([0.08, 0.12])
    assert math.isnan(got.val_loss_curve[1])  # stored as the string "nan"
    assert got.final_epoch is None
    regression = numbers_from_attrs(
        {"metric_name": "rmse", "train_loss_mean": 0.2, "val_loss_mean": 0.3, "final_epochs": [1, 2],
         "fold_curves": {"val_loss": [[1, 2], [1, 2]]}}
    )
    assert regression is not None and regression.val_error == 0.3 and regression.final_epoch == 1
    assert regression.baseline_error is None
    assert numbers_from_attrs({"metric_name": "accuracy"}) is None


# ------------------------------------------------------------- sweep context


def cell(axes: dict[str, Any], train: float, val: float, *, spread: float = 0.005, seed: int = 0,
         data_key: tuple[Any, ...] = (), baseline: float = 0.9) -> Cell:
    folds_val = [val - spread, val + spread, val - spread, val + spread]
    folds_train = [train] * 4
    n = numbers(train, val, baseline=baseline, fold_val_errors=folds_val, fold_train_errors=folds_train)
    return Cell(axes=axes, numbers=n, own=classify(n), seed=seed, data_key=data_key)


def labels(cells: list[Cell]) -> list[str]:
    return [v.regime for v in classify_in_context(cells)]


def test_capacity_side() -> None:
    assert capacity_side({"width": 256}, {"width": 64}) == (1, ["width"])
    assert capacity_side({"width": np.int64(16)}, {"width": np.int64(512)}) == (-1, ["width"])  # a frame's cells
    assert capacity_side({"weight_decay": 0.0}, {"weight_decay": 1e-4}) == (1, ["weight_decay"])
    assert capacity_side({"dropout": 0.8}, {"dropout": 0.2})[0] == -1
    assert capacity_side({"width": 256, "weight_decay": 1e-2}, {"width": 64, "weight_decay": 0})[0] == 0
    assert capacity_side({"width": 256, "weight_decay": 0}, {"width": 64, "weight_decay": 1e-2})[0] == 1
    assert capacity_side({"activation": "tanh"}, {"activation": "relu"})[0] == 0
    assert capacity_side({"width": [64, 64]}, {"width": [16, 16]})[0] == 1


def test_u_shaped_width_sweep() -> None:
    cells = [
        cell({"width": 4}, 0.30, 0.32),  # own numbers: underfit
        cell({"width": 16}, 0.10, 0.14),  # worse than the best, less capacity: underfit
        cell({"width": 64}, 0.04, 0.08),  # the best
        cell({"width": 256}, 0.04, 0.081),  # within noise of the best: good
        cell({"width": 1024}, 0.06, 0.10),  # worse with more capacity, gap below the own threshold: overfit
        cell({"width": 4096}, 0.0, 0.15),  # own numbers: overfit (gap 0.15 of 0.9)
    ]
    assert labels(cells) == ["underfit", "underfit", "good", "good", "overfit", "overfit"]
    verdicts = classify_in_context(cells)
    assert verdicts[2].reason == "lowest validation error of the sweep"
    assert verdicts[4].evidence["capacity_side"] == 1
    assert verdicts[4].evidence["best_cell"] == "width=64"


def test_weight_decay_sweep_reads_the_other_way() -> None:
    cells = [
        cell({"weight_decay": 0.0}, 0.02, 0.10),
        cell({"weight_decay": 1e-4}, 0.04, 0.07),
        cell({"weight_decay": 1e-1}, 0.12, 0.14),
    ]
    assert labels(cells) == ["overfit", "good", "underfit"]


def test_no_capacity_direction_uses_where_the_extra_error_comes_from() -> None:
    cells = [
        cell({"activation": "relu"}, 0.03, 0.05),
        cell({"activation": "tanh"}, 0.10, 0.13),  # extra error from a higher training error
        cell({"activation": "gelu"}, 0.00, 0.09),  # own numbers: overfit (gap share 0.1)
        cell({"activation": "elu"}, 0.035, 0.075),  # extra error from a larger gap, below the own threshold
    ]
    verdicts = classify_in_context(cells)
    assert [v.regime for v in verdicts] == ["good", "underfit", "overfit", "overfit"]
    assert verdicts[3].evidence["excess_from"] == "gap"
    assert "mostly from a larger gap" in verdicts[3].reason


def test_noise_tolerance_uses_paired_fold_differences() -> None:
    best = cell({"width": 64}, 0.04, 0.080, spread=0.02)
    steady = cell({"width": 256}, 0.055, 0.095, spread=0.02)  # every fold 0.015 worse: a real difference
    assert labels([best, steady]) == ["good", "overfit"]
    folds = [0.02, 0.17, 0.03, 0.16]  # same mean, but the per-fold differences scatter widely
    n = numbers(0.055, 0.095, fold_val_errors=folds, fold_train_errors=[0.055] * 4)
    wobbly = Cell(axes={"width": 256}, numbers=n, own=classify(n), seed=0)
    verdicts = classify_in_context([best, wobbly])
    assert [v.regime for v in verdicts] == ["good", "good"]
    assert verdicts[1].evidence["val_excess"] == pytest.approx(0.015)
    assert verdicts[1].evidence["val_excess_se"] > 0.015


def test_tolerance_options() -> None:
    cells = [cell({"width": 64}, 0.04, 0.080, spread=0.0), cell({"width": 256}, 0.04, 0.083, spread=0.0)]
    assert labels(cells) == ["good", "good"]  # within 5% of the best
    strict = classify_in_context(cells, thresholds=RegimeSpec(tolerance_rel=0.0))
    assert [v.regime for v in strict] == ["good", "overfit"]


def test_cells_are_compared_only_with_cells_on_the_same_data() -> None:
    cells = [
        cell({"width": 64, "train_size": 500}, 0.02, 0.06, data_key=(500,)),
        cell({"width": 256, "train_size": 500}, 0.02, 0.07, data_key=(500,)),
        cell({"width": 64, "train_size": 8000}, 0.02, 0.05, data_key=(8000,)),
        cell({"width": 256, "train_size": 8000}, 0.01, 0.03, data_key=(8000,)),
    ]
    # Within train_size 500 the smaller model is best; within 8000 the larger one.
    assert labels(cells) == ["good", "overfit", "underfit", "good"]


def test_repeats_pool_into_one_cell_and_diverged_cells_keep_their_label() -> None:
    cells = [
        cell({"lr": 0.01}, 0.05, 0.08, seed=0),
        cell({"lr": 0.01}, 0.05, 0.09, seed=1),  # alone 0.007 worse than its partner; the cell mean is close
        cell({"lr": 0.001}, 0.05, 0.082, seed=0),
        cell({"lr": 0.001}, 0.05, 0.083, seed=1),
    ]
    broken = numbers(0.9, 0.9, train_loss_curve=[1.0, 9.0])
    cells.append(Cell(axes={"lr": 1.0}, numbers=broken, own=classify(broken), seed=0))
    assert labels(cells) == ["good", "good", "good", "good", "diverged"]


def test_a_seed_that_blew_up_counts_in_its_cells_mean_as_in_the_selection() -> None:
    # Leaving its blown-up seed out made width 8 the yardstick on its one lucky seed, while
    # the study's selection and sweep.csv's best cell (every seed counts) chose width 4.
    blown = numbers(0.9, 0.55, train_loss_curve=[4.2e6, 32.3])
    cells = [
        cell({"width": 4}, 0.18, 0.20, seed=0),
        cell({"width": 4}, 0.18, 0.20, seed=1),
        Cell(axes={"width": 8}, numbers=blown, own=classify(blown), seed=0),
        cell({"width": 8}, 0.04, 0.05, seed=1),
    ]
    verdicts = classify_in_context(cells)
    assert [v.regime for v in verdicts] == ["good", "good", "diverged", "overfit"]
    assert verdicts[0].reason == "lowest validation error of the sweep"
    assert verdicts[3].evidence["best_cell"] == "width=4"
    # A cell whose every seed blew up is never the yardstick.
    lucky = numbers(0.9, 0.01, train_loss_curve=[4.2e6, 32.3])  # a lower validation error than width 4's
    only_blown = [Cell(axes={"width": 8}, numbers=lucky, own=classify(lucky), seed=0), cell({"width": 4}, 0.05, 0.07)]
    assert classify_in_context(only_blown)[1].reason == "lowest validation error of the sweep"


# ------------------------------------------------------ D2L's polynomial example

#: Fold values and curve samples measured on studies/polynomial_d2l.yaml (seed 0, 5-fold
#: CV on the 100 training points, SGD lr 0.01, batch 10, 400 epochs, MSE). The curves are
#: the fold-mean losses at epochs 1, 51, ..., 351 and 400.
POLYNOMIAL = {
    1: {
        "fold_train": [6.9489, 6.8212, 6.8258, 4.7737, 3.8481],
        "fold_val": [1.9452, 2.401, 2.4094, 10.8366, 14.5971],
        "train_curve": [24.2896, 5.8996, 5.8999, 5.9006, 5.9032, 5.8965, 5.8945, 5.8963, 5.8950],
        "val_curve": [19.6777, 6.4674, 6.4487, 6.4812, 6.453, 6.4594, 6.453, 6.4588, 6.4379],
    },
    3: {
        "fold_train": [0.0154, 0.0158, 0.0123, 0.0172, 0.0215],
        "fold_val": [0.011, 0.0051, 0.0186, 0.0281, 0.0467],
        "train_curve": [24.4885, 0.5673, 0.2489, 0.1312, 0.0728, 0.0434, 0.0283, 0.0206, 0.0166],
        "val_curve": [19.5948, 0.9468, 0.4014, 0.2121, 0.1184, 0.0695, 0.0434, 0.0294, 0.0219],
    },
    19: {
        "fold_train": [0.0315, 0.0297, 0.0234, 0.0271, 0.025],
        "fold_val": [0.0194, 0.0083, 0.0256, 0.0542, 0.0418],
        "train_curve": [23.3315, 0.456, 0.2049, 0.1132, 0.0692, 0.0476, 0.0367, 0.0309, 0.0275],
        "val_curve": [18.6106, 0.7424, 0.303, 0.1598, 0.0922, 0.0591, 0.0425, 0.0342, 0.0299],
    },
}
POLYNOMIAL_BASELINE = 14.2345  # variance of the 100 training targets (seed 0)


def polynomial_cells() -> list[Cell]:
    cells = []
    for degree, values in POLYNOMIAL.items():
        n = TrialNumbers(
            train_error=sum(values["fold_train"]) / 5,
            val_error=sum(values["fold_val"]) / 5,
            baseline_error=POLYNOMIAL_BASELINE,
            train_loss_curve=values["train_curve"],
            val_loss_curve=values["val_curve"],
            fold_train_errors=values["fold_train"],
            fold_val_errors=values["fold_val"],
        )
        cells.append(Cell(axes={"degree": degree}, numbers=n, own=classify(n), seed=0))
    return cells


def test_polynomial_own_numbers() -> None:
    own = [c.own.regime for c in polynomial_cells()]
    # Degree 1 leaves 41% of the target variance on its own training data; degrees 3 and
    # 19 fit it, and on their own numbers neither shows a large gap.
    assert own == ["underfit", "good", "good"]


def test_polynomial_in_sweep_context() -> None:
    verdicts = classify_in_context(polynomial_cells())
    assert [v.regime for v in verdicts] == ["underfit", "good", "overfit"]
    degree19 = verdicts[2].evidence
    assert degree19["val_excess"] > degree19["tolerance"]  # worse than degree 3 beyond noise
    assert degree19["capacity_side"] == 1
    # Honest note: at 400 epochs degree 19 also fits its training data less well than degree 3.
    assert degree19["excess_from"] == "training error"
    assert "note:" in verdicts[2].reason


# ------------------------------------------------------------------ the spec


def test_regimes_section_of_the_spec() -> None:
    spec = parse_spec({"name": "x", "regimes": {"underfit_error": 0.4, "tolerance_se": 2}})
    assert spec.regimes.underfit_error == 0.4
    assert spec.regimes.overfit_gap == RegimeSpec().overfit_gap
    with pytest.raises(SpecError, match=r"regimes\.overfit"):
        parse_spec({"name": "x", "regimes": {"overfit": 0.1}})
    with pytest.raises(SpecError, match=r"regimes\.val_rise"):
        parse_spec({"name": "x", "regimes": {"val_rise": -1}})


def test_sweep_may_list_several_grids() -> None:
    spec = parse_spec(
        {
            "name": "maps",
            "sweep": [{"width": [4, 64], "weight_decay": [0, 0.01]}, {"width": [4, 64], "train_size": [100, 400]}],
        }
    )
    assert [list(g.axes) for g in spec.sweep_list()] == [["width", "weight_decay"], ["width", "train_size"]]
    with pytest.raises(SpecError, match="same axes"):
        parse_spec({"name": "maps", "sweep": [{"width": [4]}, {"width": [8]}]})
    with pytest.raises(SpecError, match="at least one grid"):
        parse_spec({"name": "maps", "sweep": []})
    with pytest.raises(SpecError, match="sweep"):
        parse_spec({"name": "maps", "sweep": [{"width": [4], "dropuot": [0.1]}]})


def test_gradient_flow_compares_the_first_layer_with_the_output_layer() -> None:
    assert gradient_flow({"hidden1": [1e-7, 0.5], "hidden2": [1e-4], "output": [0.5]}) == ("vanishing", 2e-7)
    assert gradient_flow({"hidden1": [0.2], "output": [0.5]}) == ("healthy", 0.4)
    assert gradient_flow({"hidden1": [600.0], "output": [0.5]}) == ("exploding", 1200.0)
    assert gradient_flow({"hidden1": [600.0], "output": [0.5]}, ratio=1e4) == ("healthy", 1200.0)
    assert gradient_flow({"hidden1": ["nan"], "output": [0.5]}) == ("exploding", math.inf)  # as stored
    assert gradient_flow({"output": [0.5]}) is None  # a linear model has no first hidden layer
    assert gradient_flow({"hidden1": [0.0], "output": [0.0]}) is None
    assert gradient_flow({}) is None
    # Training that diverged blew its gradients up after the first batch measured them.
    assert gradient_flow({"hidden1": [0.2], "output": [0.5]}, exploded=True) == ("exploding", 0.4)
    assert gradient_flow({"hidden1": [1e-7], "output": [0.5]}, exploded=True) == ("exploding", 2e-7)
    assert gradient_flow({"hidden1": [0.2, "inf"], "output": [0.5, 0.7]}) == ("exploding", math.inf)


def test_gradient_flow_reads_the_backward_signal_where_it_is_stored() -> None:
    # The weight gradients of a deep ReLU net at PyTorch's default init: both ends small,
    # a healthy-looking ratio; the gradient reaching the first layer's output is 1e-4 of
    # the output layer's.
    weights = {"hidden1": [0.02], "output": [0.04]}
    assert gradient_flow(weights) == ("healthy", 0.5)  # a study stored before the signal was
    signal = {"hidden1": [1e-5, 0.1], "hidden2": [1e-3], "output": [0.1]}
    assert gradient_flow(weights, preactivation_grad_norms=signal) == ("vanishing", pytest.approx(1e-4))
    assert gradient_flow(weights, preactivation_grad_norms={"hidden1": [500.0], "output": [0.1]})[0] == "exploding"
    assert gradient_flow(weights, preactivation_grad_norms={"hidden1": ["nan"], "output": [0.1]}) == (
        "exploding",
        math.inf,
    )
    assert gradient_flow(weights, preactivation_grad_norms={}) == ("healthy", 0.5)



def test_updates_that_killed_or_blew_up_the_net_read_exploding_whatever_the_first_batch() -> None:
    # Measured before any update, the first batch looked healthy; then the learning rate
    # killed every ReLU (no gradient at all from epoch 2, loss back at chance: "underfit"),
    # or Adam at lr 7 thrashed with a cross-entropy of 110 (not above 1000).
    healthy = {"hidden1": [0.3, 0.2, 0.1], "output": [0.5, 0.4, 0.3]}
    dead = {"hidden1": [0.3, 0.0, 0.0], "output": [0.5, 0.0, 0.0]}
    at_chance = {"train_loss": [64.0, 2.48, 2.50]}
    task = {"metric_name": "accuracy"}
    assert trial_gradient_flow({**task, "grad_norms": healthy, "curves": at_chance}) == ("healthy", 0.6)
    assert trial_gradient_flow({**task, "grad_norms": dead, "curves": at_chance}) == ("exploding", 0.6)
    thrashing = {"train_loss": [112.0, 117.0, 109.0]}
    assert trial_gradient_flow({**task, "grad_norms": healthy, "curves": thrashing}) == ("exploding", 0.6)
    # A regression loss has no such scale, nor has a pruned trial stored before its task
    # was; one layer without gradient is not a dead net.
    assert trial_gradient_flow({"grad_norms": healthy, "curves": thrashing, "metric_name": "rmse"})[0] == "healthy"
    assert trial_gradient_flow({"grad_norms": healthy, "curves": thrashing})[0] == "healthy"
    partly = {"hidden1": [0.3, 0.0, 0.0], "output": [0.5, 0.1, 0.1]}
    assert trial_gradient_flow({**task, "grad_norms": partly, "curves": at_chance}) == ("healthy", 0.6)


def test_a_dead_net_reads_exploding_under_l1_too_and_early_stopping_counts_the_kept_epochs() -> None:
    # With L1, a dead net's weight gradients are l1 * sign(w), never 0; the backward signal is.
    weights = {"hidden1": [0.3, 6.4e-4, 6.4e-4], "hidden2": [0.2, 6.4e-4, 6.4e-4], "output": [0.5, 6.4e-4, 6.4e-4]}
    signal = {"hidden1": [0.05, 0.0, 0.0], "hidden2": [0.1, 0.0, 0.0], "output": [0.2, 0.1, 0.1]}
    attrs = {"grad_norms": weights, "preactivation_grad_norms": signal, "metric_name": "accuracy"}
    assert trial_gradient_flow(attrs) == ("exploding", 0.25)
    # Early stopping kept epoch 2 of both folds: what blew up after it is not the trial's.
    blown_after = [2.0, 0.3, 40.0, 80.0]
    kept = {
        "metric_name": "accuracy",
        "train_metric_mean": 0.9,
        "val_metric_mean": 0.88,
        "baseline_error": 0.9,
        "final_epochs": [2, 2],
        "curves": {"train_loss": blown_after, "val_loss": [2.0, 0.35, 41.0, 85.0]},
        "fold_curves": {"train_loss": [blown_after] * 2, "val_loss": [[2.0, 0.35, 41.0, 85.0]] * 2},
        "grad_norms": {"hidden1": [0.3, 0.2, 0.0, 0.0], "output": [0.5, 0.4, 0.0, 0.0]},
    }
    assert trial_gradient_flow(kept) == ("healthy", 0.6)
    assert trial_gradient_flow({**kept, "final_epochs": [4, 4]})[0] == "exploding"


def test_a_diverge_ratio_below_one_still_labels_a_loss_that_did_not_fall_enough() -> None:
    too_slow = numbers(0.5, 0.5, train_loss_curve=[2.3, 2.0])
    assert classify(too_slow, thresholds=RegimeSpec(diverge_ratio=0.5)).regime == "diverged"

