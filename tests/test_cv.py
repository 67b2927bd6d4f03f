"""Tests of modelsel.cv: splitters, fold tensors and standardization, aggregation, test scoring."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold, StratifiedKFold

from modelsel.cv import (
    CURVE_NAMES,
    cross_validate,
    fit_and_test,
    fold_indices,
    fold_mean_curve,
    make_fold_data,
    make_splitter,
    mean_std,
)
from modelsel.data import Dataset
from modelsel.errors import DataError
from modelsel.spec import CVSpec, parse_spec
from modelsel.training import History


def make_dataset(
    y_train: torch.Tensor,
    *,
    task: str = "classification",
    n_features: int = 3,
    standardize: bool = False,
    seed: int = 0,
    X_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    n = len(y_train)
    X = torch.randn(n, n_features, generator=gen) * torch.arange(1, n_features + 1) + 5.0
    if task == "classification":
        X = X + y_train[:, None].float() * 2.0
    n_classes = int(y_train.max()) + 1 if task == "classification" else None
    return Dataset(
        name="synthetic-classification" if task == "classification" else "polynomial",
        task=task,  # type: ignore[arg-type]
        X_train=X,
        y_train=y_train,
        X_test=X[:10].clone() if X_test is None else X_test,
        y_test=y_train[:10].clone() if y_test is None else y_test,
        n_classes=n_classes,
        feature_names=tuple(f"x{i}" for i in range(n_features)),
        class_names=tuple(str(c) for c in range(n_classes)) if n_classes else None,
        standardize=standardize,
    )


def imbalanced_labels() -> torch.Tensor:
    # 60 of class 0, 30 of class 1, 15 of class 2, interleaved.
    labels = [0] * 60 + [1] * 30 + [2] * 15
    rng = np.random.default_rng(0)
    return torch.as_tensor(rng.permutation(labels), dtype=torch.int64)


def tiny_study(**changes: Any) -> Any:
    data: dict[str, Any] = {
        "name": "cv",
        "dataset": {"name": "synthetic-classification", "n_samples": 120, "n_features": 6, "n_informative": 3},
        "model": {"depth": 1, "width": 8},
        "training": {"epochs": 3, "batch_size": 16, "lr": 0.02},
        "cv": {"folds": 2},
    }
    data.update(changes)
    return parse_spec(data)


# -------------------------------------------------------------------- splitters


def test_classification_splits_are_stratified() -> None:
    dataset = make_dataset(imbalanced_labels())
    splits = fold_indices(dataset, CVSpec(folds=3), seed=0)
    assert len(splits) == 3
    y = dataset.y_train.numpy()
    for train, val in splits:
        assert np.bincount(y[val], minlength=3).tolist() == [20, 10, 5]
        assert np.bincount(y[train], minlength=3).tolist() == [40, 20, 10]
        assert not set(train) & set(val)
    all_val = np.concatenate([val for _, val in splits])
    assert sorted(all_val.tolist()) == list(range(len(y)))


def test_make_splitter_picks_the_splitter_by_task() -> None:
    assert isinstance(make_splitter(CVSpec(folds=3), task="classification", seed=0), StratifiedKFold)
    assert isinstance(make_splitter(CVSpec(folds=3), task="regression", seed=0), KFold)
    unstratified = make_splitter(CVSpec(folds=3, stratified=False), task="classification", seed=0)
    assert isinstance(unstratified, KFold) and not isinstance(unstratified, StratifiedKFold)
    with pytest.raises(DataError, match=r"cv\.stratified: true needs a classification dataset"):
        make_splitter(CVSpec(folds=3, stratified=True), task="regression", seed=0)


def test_regression_uses_plain_kfold() -> None:
    dataset = make_dataset(torch.linspace(0, 1, 30), task="regression")
    ordered = fold_indices(dataset, CVSpec(folds=3, shuffle=False), seed=0)
    assert [val.tolist() for _, val in ordered] == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    shuffled = fold_indices(dataset, CVSpec(folds=3), seed=0)
    assert sorted(np.concatenate([val for _, val in shuffled]).tolist()) == list(range(30))
    assert [val.tolist() for _, val in shuffled] != [val.tolist() for _, val in ordered]


def test_splits_follow_the_seed() -> None:
    dataset = make_dataset(imbalanced_labels())
    first = fold_indices(dataset, CVSpec(folds=3), seed=0)
    again = fold_indices(dataset, CVSpec(folds=3), seed=0)
    other = fold_indices(dataset, CVSpec(folds=3), seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))


def test_too_many_folds_for_a_class() -> None:
    labels = torch.tensor([0] * 20 + [1] * 3)
    with pytest.raises(DataError) as info:
        fold_indices(make_dataset(labels), CVSpec(folds=4), seed=0)
    message = str(info.value)
    assert "cv.folds is 4 but a class has only 3 training samples" in message
    assert "lower cv.folds or add rows of that class" in message and "train_size" not in message
    assert "\n" not in message
    with pytest.raises(DataError, match=r"lower cv\.folds or raise dataset\.train_size$"):
        fold_indices(make_dataset(labels), CVSpec(folds=4), seed=0, train_size=0.5)  # only when it is set
    fold_indices(make_dataset(labels), CVSpec(folds=3), seed=0)  # 3 folds are fine


def test_more_folds_than_samples() -> None:
    dataset = make_dataset(torch.linspace(0, 1, 4), task="regression")
    with pytest.raises(DataError, match=r"cv\.folds is 5 but the training split has only 4 samples"):
        fold_indices(dataset, CVSpec(folds=5), seed=0)


# ------------------------------------------------------------ fold tensors


def test_standardization_uses_training_fold_statistics_only() -> None:
    dataset = make_dataset(imbalanced_labels(), standardize=True)
    X_before = dataset.X_train.clone()
    splits = fold_indices(dataset, CVSpec(folds=3), seed=0)
    folds = make_fold_data(dataset, splits, device=torch.device("cpu"))
    for fold, (train, val) in zip(folds, splits, strict=True):
        raw_train, raw_val = X_before[train], X_before[val]
        mean, std = raw_train.mean(dim=0), raw_train.std(dim=0)
        torch.testing.assert_close(fold.X_train, (raw_train - mean) / std)
        torch.testing.assert_close(fold.X_val, (raw_val - mean) / std)
        torch.testing.assert_close(fold.X_train.mean(dim=0), torch.zeros(3), atol=1e-5, rtol=0)
        # The validation fold was not standardized with its own statistics.
        assert float(fold.X_val.mean(dim=0).abs().max()) > 1e-3
        assert torch.equal(fold.y_train, dataset.y_train[train])
        assert torch.equal(fold.y_val, dataset.y_train[val])  # type: ignore[arg-type]
        assert fold.source is None  # standardized rows are not rows of the dataset
    assert torch.equal(dataset.X_train, X_before)  # never in place


def test_no_standardization_when_the_dataset_says_so() -> None:
    dataset = make_dataset(imbalanced_labels(), standardize=False)
    splits = fold_indices(dataset, CVSpec(folds=3), seed=0)
    for fold, (train, val) in zip(make_fold_data(dataset, splits, device=torch.device("cpu")), splits, strict=True):
        assert torch.equal(fold.X_train, dataset.X_train[train])
        assert torch.equal(fold.X_val, dataset.X_train[val])  # type: ignore[arg-type]
        # Unstandardized folds are rows of the dataset's tensors, not copies of them (the
        # engines gather from those; the stacked engine once for every member).
        assert fold.source is not None and fold.source.X is dataset.X_train
        X, y, rows = fold.training_rows()
        assert X is dataset.X_train and y is dataset.y_train and rows is fold.source.rows
        assert rows.tolist() == list(train)
        assert fold.n_train == len(train)


def test_constant_feature_does_not_divide_by_zero() -> None:
    dataset = make_dataset(imbalanced_labels(), standardize=True)
    dataset.X_train[:, 0] = 7.0
    splits = fold_indices(dataset, CVSpec(folds=3), seed=0)
    for fold in make_fold_data(dataset, splits, device=torch.device("cpu")):
        assert torch.isfinite(fold.X_train).all() and torch.isfinite(fold.X_val).all()  # type: ignore[arg-type]


def test_values_near_the_float32_limit_are_standardized_without_overflow() -> None:
    # float32 statistics summed two rows of 3e38 to inf: the whole column became -inf or nan.
    dataset = make_dataset(imbalanced_labels(), standardize=True)
    dataset.X_train[:3, 0] = 3e38
    dataset.X_train[3:, 1] = -3e38  # and Z - mean of the one row left is 3e38 + 3e38
    splits = fold_indices(dataset, CVSpec(folds=3), seed=0)
    for fold, (train, _) in zip(make_fold_data(dataset, splits, device=torch.device("cpu")), splits, strict=True):
        assert fold.X_train.dtype == torch.float32
        assert torch.isfinite(fold.X_train).all() and torch.isfinite(fold.X_val).all()  # type: ignore[arg-type]
        big = torch.as_tensor(train) < 3
        if big.any() and not big.all():
            assert fold.X_train[big, 0].min() > 0 > fold.X_train[~big, 0].max()  # type: ignore[index]


def test_a_feature_constant_in_the_training_rows_keeps_its_scale() -> None:
    # Blank in the training rows, set in one validation row (a rare one-hot level): it
    # used to be divided by 1e-8.
    dataset = make_dataset(imbalanced_labels(), standardize=True)
    splits = fold_indices(dataset, CVSpec(folds=3), seed=0)
    _, val_rows = splits[0]
    dataset.X_train[:, 0] = 0.0
    dataset.X_train[val_rows[0], 0] = 1.0
    fold = make_fold_data(dataset, splits, device=torch.device("cpu"))[0]
    assert fold.X_train[:, 0].abs().max() == 0.0  # type: ignore[index]
    assert sorted(set(fold.X_val[:, 0].tolist())) == [0.0, 1.0]  # type: ignore[index]
    # A column that varies, however little, is scaled as ever (as sklearn's StandardScaler does).
    dataset.X_train[:, 1] = 1e-7 * torch.randn(dataset.X_train.shape[0], generator=torch.Generator().manual_seed(0))
    fold = make_fold_data(dataset, splits, device=torch.device("cpu"))[0]
    assert float(fold.X_train[:, 1].std()) == pytest.approx(1.0, rel=1e-3)  # type: ignore[index]


# ------------------------------------------------------------- aggregation


def history(val_loss: list[float]) -> History:
    return History(train_loss=list(val_loss), val_loss=list(val_loss))


def test_fold_mean_curve_carries_early_stopped_members_forward() -> None:
    histories = [history([1.0, 2.0, 3.0]), history([5.0]), history([2.0, 4.0])]
    assert fold_mean_curve(histories, "val_loss") == pytest.approx([8 / 3, 11 / 3, 4.0])
    assert fold_mean_curve([], "val_loss") == []


def test_mean_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_cross_validate_aggregates_fold_values_at_each_fold_final_epoch() -> None:
    from modelsel.data import load_dataset

    spec = tiny_study(training={"epochs": 6, "batch_size": 16, "lr": 0.05, "early_stopping": {"patience": 1}})
    dataset = load_dataset(spec.dataset, seed=spec.seed)
    result = cross_validate(spec, dataset)
    assert len(result.members) == 2 and result.task == "classification"
    histories = result.histories
    assert result.fold_val_metric == [h.val_metric[h.final_epoch] for h in histories]
    assert result.fold_val_loss == [h.val_loss[h.final_epoch] for h in histories]
    assert result.fold_train_loss == [h.final_train_loss for h in histories]
    for h in histories:
        assert h.final_epoch == h.best_epoch
        assert h.val_loss[h.final_epoch] == min(h.val_loss)
    assert result.fit_seconds == pytest.approx(sum(h.fit_seconds for h in histories))
    assert result.fold_epochs == sum(h.epochs_run for h in histories)
    curves = result.curves()
    assert set(curves) == set(CURVE_NAMES)
    assert curves["val_loss"] == pytest.approx(fold_mean_curve(histories, "val_loss"))
    mean, std = mean_std(result.fold_val_metric)
    assert mean == pytest.approx(statistics.fmean(result.fold_val_metric))
    assert std == pytest.approx(statistics.stdev(result.fold_val_metric))


def test_cross_validate_is_reproducible_and_trains_one_model_per_fold() -> None:
    from modelsel.data import load_dataset

    spec = tiny_study(cv={"folds": 3})
    dataset = load_dataset(spec.dataset, seed=spec.seed)
    first = cross_validate(spec, dataset)
    second = cross_validate(spec, dataset)
    assert len(first.members) == 3
    assert first.fold_val_loss == second.fold_val_loss
    n_val = [len(h.val_loss) for h in first.histories]
    assert n_val == [3, 3, 3]


# ------------------------------------------------------------- test scoring


def test_fit_and_test_scores_the_test_split() -> None:
    labels = torch.arange(120) % 2
    base = make_dataset(labels, seed=1)
    X_test = base.X_train[:40].clone()
    y_test = labels[:40].clone()
    honest = make_dataset(labels, seed=1, standardize=True, X_test=X_test, y_test=y_test)
    flipped = make_dataset(labels, seed=1, standardize=True, X_test=X_test, y_test=1 - y_test)
    spec = tiny_study(training={"epochs": 3, "batch_size": 16, "lr": 0.05})
    right = fit_and_test(spec, honest)
    wrong = fit_and_test(spec, flipped)
    # Same training data and seed, so the same model: only the test labels differ.
    assert right.train_loss == wrong.train_loss
    assert right.test_metric + wrong.test_metric == pytest.approx(1.0)
    assert right.test_metric > 0.8
    assert wrong.test_loss > right.test_loss
    assert right.epochs == 3 and right.fit_seconds > 0


def test_fit_and_test_trains_the_requested_epochs_without_early_stopping() -> None:
    labels = torch.arange(60) % 2
    spec = tiny_study(training={"epochs": 9, "batch_size": 16, "early_stopping": {"patience": 1}})
    score = fit_and_test(spec, make_dataset(labels), epochs=2)
    assert score.epochs == 2
    assert fit_and_test(spec, make_dataset(labels)).epochs == 9


def test_fit_and_test_standardizes_the_test_split_with_training_statistics() -> None:
    labels = torch.arange(80) % 2
    raw = make_dataset(labels, seed=2, standardize=True)
    # The test split is the training split: with training statistics applied to both,
    # the test loss equals the final training loss.
    same = make_dataset(labels, seed=2, standardize=True, X_test=raw.X_train.clone(), y_test=labels.clone())
    score = fit_and_test(tiny_study(), same)
    assert score.test_loss == pytest.approx(score.train_loss, rel=1e-5)
    # A shifted copy of one half would look like the training data only under its own statistics.
    half = raw.X_train[:40] + 100.0
    shifted = make_dataset(labels, seed=2, standardize=True, X_test=half, y_test=labels[:40].clone())
    assert fit_and_test(tiny_study(), shifted).test_loss > 2 * score.test_loss


def test_a_category_level_missing_from_a_training_fold_is_zero_in_its_validation_fold(tmp_path: Any) -> None:
    # The encoder saw the whole training split, so a level only a validation fold has got
    # a column whose weights its model never trained; the test split zeroes unseen levels.
    import pandas as pd

    from modelsel.data import load_dataset

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=60), "c": ["a", "b"] * 30, "y": rng.integers(0, 2, 60)})
    frame.loc[5, "c"] = "rare"
    frame.to_csv(tmp_path / "t.csv", index=False)
    spec = parse_spec(
        {
            "name": "x",
            "dataset": {"name": "csv", "path": str(tmp_path / "t.csv"), "target": "y", "task": "classification"},
            "cv": {"folds": 3},
        }
    )
    dataset = load_dataset(spec.dataset, seed=0)
    rare = dataset.feature_names.index("c_rare")
    assert dataset.X_train[:, rare].sum() == 1  # the row is in the training split
    folds = make_fold_data(dataset, fold_indices(dataset, spec.cv, seed=0), device=torch.device("cpu"))
    # The fold that validates on the rare row has no "rare" in training: its column is
    # constant (all zero before standardizing), as in every other validation fold.
    for fold in folds:
        assert torch.unique(fold.X_val[:, rare]).numel() == 1
