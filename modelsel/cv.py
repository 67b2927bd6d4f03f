"""K-fold cross-validation with scikit-learn splitters, and the one-time test evaluation."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.model_selection import BaseCrossValidator, KFold, StratifiedKFold

from modelsel.engines import train_models
from modelsel.errors import DataError
from modelsel.spec import CVSpec, StudySpec
from modelsel.training import Callback, FoldData, History, TrainedMember, TrainSource, evaluate

if TYPE_CHECKING:
    from modelsel.data import Dataset

CURVE_NAMES = ("train_loss", "val_loss", "train_metric", "val_metric")


def make_splitter(cv: CVSpec, *, task: str, seed: int) -> BaseCrossValidator:
    """StratifiedKFold for classification (unless ``cv.stratified`` is False), else KFold."""
    stratified = cv.stratified if cv.stratified is not None else task == "classification"
    if stratified and task != "classification":
        raise DataError("cv.stratified: true needs a classification dataset; remove it for regression")
    random_state = seed if cv.shuffle else None
    if stratified:
        return StratifiedKFold(n_splits=cv.folds, shuffle=cv.shuffle, random_state=random_state)
    return KFold(n_splits=cv.folds, shuffle=cv.shuffle, random_state=random_state)


def fold_indices(
    dataset: Dataset, cv: CVSpec, *, seed: int, train_size: float | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/validation index pairs of each fold of the dataset's training split.

    Parameters
    ----------
    train_size
        The spec's ``dataset.train_size`` the training split was subsampled to, if any:
        an impossible split's message suggests raising it only when it is set.

    Raises
    ------
    DataError
        When the split is impossible (e.g. more folds than samples of a class).
    """
    splitter = make_splitter(cv, task=dataset.task, seed=seed)
    y = dataset.y_train.cpu().numpy()
    n = len(y)
    if n < cv.folds:
        raise DataError(f"cv.folds is {cv.folds} but the training split has only {n} samples; lower cv.folds")
    if dataset.task == "classification" and splitter.__class__ is StratifiedKFold:
        counts = np.bincount(y)
        smallest = int(counts[counts > 0].min())
        if smallest < cv.folds:
            more = "raise dataset.train_size" if train_size is not None else "add rows of that class"
            raise DataError(
                f"cv.folds is {cv.folds} but a class has only {smallest} training samples; lower cv.folds or {more}"
            )
    return [(train, val) for train, val in splitter.split(np.zeros(n), y)]


def _standardizer(X: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    # In float64: float32 sums and squares of values near float32's limit (3.4e38) overflow
    # to inf (two rows of 3e38 made a whole column inf), and so can a difference Z - mean.
    X64 = X.double()
    mean = X64.mean(dim=0, keepdim=True)
    var = X64.var(dim=0, keepdim=True, correction=0)
    std = X64.std(dim=0, keepdim=True)
    del X64
    # A column constant in the training rows keeps its scale, as scikit-learn's
    # StandardScaler does: divided by ~0, its values in validation or test rows reached
    # 1e7 and more (a rare one-hot level, a digits pixel that is blank in one fold).
    # Constant means a variance within rounding of zero (sklearn's _is_constant_feature).
    n, eps = X.shape[0], torch.finfo(torch.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    std = torch.where(constant, torch.ones_like(std), std)
    return lambda Z: ((Z.double() - mean) / std).to(Z.dtype)


def make_fold_data(
    dataset: Dataset,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    device: torch.device,
) -> list[FoldData]:
    """Each fold's tensors on ``device``; standardized with train-fold statistics.

    Without standardization a fold's training split is rows of the dataset's training
    tensors (:class:`~modelsel.training.FoldData` ``source``), not a copy of them; its
    validation split is copied (the k validation splits are one copy of the data).
    """
    X = dataset.X_train.to(device)
    y = dataset.y_train.to(device)
    folds = []
    for train_idx, val_idx in splits:
        train_index = torch.as_tensor(train_idx, device=device)
        val_index = torch.as_tensor(val_idx, device=device)
        X_va, y_va = X.index_select(0, val_index), y.index_select(0, val_index)
        if dataset.one_hot_columns:
            # A category level that no training row of this fold has is unknown to the fold's
            # model: zero it, as the encoder (fit on the training split) does on the test split.
            columns = torch.as_tensor(dataset.one_hot_columns, device=device)
            seen = X.index_select(0, train_index).index_select(1, columns).amax(dim=0) > 0
            X_va[:, columns] = X_va.index_select(1, columns) * seen
        if dataset.standardize:
            # Standardized rows are no longer rows of X: the fold gets its own copy.
            X_tr = X.index_select(0, train_index)
            transform = _standardizer(X_tr)
            fold = FoldData(transform(X_tr), y.index_select(0, train_index), transform(X_va), y_va)
        else:
            fold = FoldData(X_val=X_va, y_val=y_va, source=TrainSource(X, y, train_index))
        folds.append(fold)
    return folds


def fold_mean_curve(histories: Sequence[History], name: str) -> list[float]:
    """Per-epoch mean over members of curve ``name``; a member that stopped early
    contributes its last value to later epochs."""
    length = max((len(getattr(h, name)) for h in histories), default=0)
    return [statistics.fmean(fold_values_at(histories, name, epoch)) for epoch in range(length)]


def fold_values_at(histories: Sequence[History], name: str, epoch: int) -> list[float]:
    """Each member's value of curve ``name`` after ``epoch`` (0-based): a member that
    stopped early gives its last value, one without any value is left out."""
    curves = (getattr(h, name) for h in histories)
    return [c[min(epoch, len(c) - 1)] for c in curves if c]


@dataclass
class CVResult:
    """Outcome of one cross-validated configuration."""

    members: list[TrainedMember]
    task: str

    @property
    def histories(self) -> list[History]:
        return [m.history for m in self.members]

    def fold_values(self, name: str) -> list[float]:
        """Per-fold value of a curve at the epoch whose weights each fold model ended with."""
        return [getattr(h, name)[h.final_epoch] for h in self.histories]

    @property
    def fold_val_loss(self) -> list[float]:
        return self.fold_values("val_loss")

    @property
    def fold_val_metric(self) -> list[float]:
        return self.fold_values("val_metric")

    @property
    def fold_train_loss(self) -> list[float]:
        """Final training loss of each fold model, from a full eval-mode pass."""
        return [h.final_train_loss for h in self.histories]

    @property
    def fold_train_metric(self) -> list[float]:
        return [h.final_train_metric for h in self.histories]

    def curves(self) -> dict[str, list[float]]:
        """Fold-mean per-epoch curves (train/val loss and metric)."""
        return {name: fold_mean_curve(self.histories, name) for name in CURVE_NAMES}

    @property
    def fit_seconds(self) -> float:
        return sum(h.fit_seconds for h in self.histories)

    @property
    def fold_epochs(self) -> int:
        return sum(h.epochs_run for h in self.histories)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def cross_validate(
    spec: StudySpec,
    dataset: Dataset,
    *,
    folds: Sequence[FoldData] | None = None,
    callbacks: Sequence[Callback] = (),
    device: torch.device | str = "cpu",
) -> CVResult:
    """Train the spec's model on every CV fold of the dataset's training split.

    Parameters
    ----------
    spec
        A spec with every searched value already filled in (see :func:`modelsel.spec.with_params`).
    dataset
        The loaded dataset; only its training split is used.
    folds
        Pre-built fold tensors (to reuse across trials); built from ``spec.cv`` when omitted.
    callbacks
        Training callbacks (pruning, diagnostics).
    device
        Where to train.
    """
    device = torch.device(device)
    if folds is None:
        splits = fold_indices(dataset, spec.cv, seed=spec.seed, train_size=spec.dataset.train_size)
        folds = make_fold_data(dataset, splits, device=device)
    members = train_models(
        folds,
        model_spec=spec.model,
        training=spec.training,
        task=dataset.task,
        n_outputs=dataset.n_outputs,
        seed=spec.seed,
        callbacks=callbacks,
        device=device,
    )
    return CVResult(members=members, task=dataset.task)


@dataclass
class TestScore:
    """Held-out test evaluation of a configuration retrained on the whole training split."""

    test_loss: float
    test_metric: float
    train_loss: float
    train_metric: float
    epochs: int
    fit_seconds: float


def fit_final(
    spec: StudySpec,
    dataset: Dataset,
    *,
    epochs: int | None = None,
    device: torch.device | str = "cpu",
) -> TrainedMember:
    """Retrain a configuration on the whole training split; the test split is not touched.

    Parameters
    ----------
    spec
        The selected configuration (searched values filled in).
    dataset
        The dataset; only its training split is used.
    epochs
        Epochs to train (e.g. the folds' mean best epoch under early stopping);
        ``spec.training.epochs`` when omitted.
    device
        Where to train.

    Returns
    -------
    TrainedMember
        The retrained model and its history, for :func:`score_on_test`.
    """
    device = torch.device(device)
    X_train, y_train = dataset.X_train.to(device), dataset.y_train.to(device)
    if dataset.standardize:
        X_train = _standardizer(X_train)(X_train)
    training = spec.training.model_copy(
        update={"epochs": epochs or spec.training.epochs, "early_stopping": None}
    )
    (member,) = train_models(
        [FoldData(X_train=X_train, y_train=y_train)],
        model_spec=spec.model,
        training=training,
        task=dataset.task,
        n_outputs=dataset.n_outputs,
        seed=spec.seed,
        device=device,
    )
    return member


def score_on_test(member: TrainedMember, dataset: Dataset, *, device: torch.device | str = "cpu") -> TestScore:
    """Score a model retrained by :func:`fit_final` on the held-out test split, once.

    The test split is standardized with the whole training split's statistics, as the
    training data was.

    Raises
    ------
    ArithmeticError
        When the test loss is not finite (the retrained model diverged).
    """
    device = torch.device(device)
    X_test, y_test = dataset.X_test.to(device), dataset.y_test.to(device)
    if dataset.standardize:
        X_test = _standardizer(dataset.X_train.to(device))(X_test)
    test_loss, test_metric = evaluate(member.model.to(device), X_test, y_test, task=dataset.task)
    if not math.isfinite(test_loss):
        raise ArithmeticError(f"the retrained model's test loss is {test_loss}")
    history = member.history
    return TestScore(
        test_loss=test_loss,
        test_metric=test_metric,
        train_loss=history.final_train_loss,
        train_metric=history.final_train_metric,
        epochs=history.epochs_run,
        fit_seconds=history.fit_seconds,
    )


def fit_and_test(
    spec: StudySpec,
    dataset: Dataset,
    *,
    epochs: int | None = None,
    device: torch.device | str = "cpu",
) -> TestScore:
    """Retrain on the whole training split and score the held-out test split once:
    :func:`fit_final` (whose parameters these are), then :func:`score_on_test`."""
    member = fit_final(spec, dataset, epochs=epochs, device=device)
    return score_on_test(member, dataset, device=device)
