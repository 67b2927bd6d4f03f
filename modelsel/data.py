"""Datasets: decode once into tensors, cache per process, subsample nested and stratified.

Every dataset named by a spec's ``dataset.name`` is decoded once per process into
float32 feature tensors and int64 (classification) or float32 (regression) targets,
split into a training split and a held-out test split, and cached with
:func:`functools.lru_cache`. :func:`load_dataset` then applies the cheap, per-call
steps on top of the cached tensors: the ``train_size`` subset of the training split
and, for ``polynomial``, the ``degree`` column selection. A trial never re-reads files.

The tensors of a cached dataset are shared between calls: treat them as read-only
(standardize into new tensors, never in place).

Datasets
--------
``fashion-mnist``
    60,000 training and 10,000 test 28×28 images, pixels scaled to [0, 1]; the
    official test images are the held-out set. Read from the layout torchvision's
    ``FashionMNIST`` uses, ``<root>/FashionMNIST/raw/`` (plain or ``.gz`` IDX files),
    where ``root`` is ``dataset.root``, else ``$MODELSEL_DATA_ROOT``, else
    ``~/.cache/modelsel/data``. The IDX files are decoded here, to the same tensors
    torchvision builds: importing torchvision alone costs seconds, so it is imported
    only to download (``dataset.download: true``).
``digits``
    scikit-learn's embedded 8×8 digits, pixels scaled to [0, 1]; a fixed stratified
    test split (``random_state=0``, the same for every study seed).
``polynomial``
    D2L's synthetic regression problem, generated from the study seed.
``csv``
    A user's table: numeric features as they are, non-numeric features one-hot
    encoded, a fixed stratified (classification) test split.
``synthetic-classification``
    scikit-learn's ``make_classification`` from the study seed.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import math
import os
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from modelsel.errors import DataError
from modelsel.spec import (
    CSVSpec,
    DatasetSpec,
    DigitsSpec,
    FashionMNISTSpec,
    PolynomialSpec,
    SyntheticClassificationSpec,
)

__all__ = [
    "CSV_CLASSIFICATION_MAX_CLASSES",
    "DATA_ROOT_ENV",
    "FASHION_MNIST_FILES",
    "SPLIT_RANDOM_STATE",
    "Dataset",
    "clear_dataset_cache",
    "default_data_root",
    "infer_task",
    "load_dataset",
    "nested_subset_indices",
    "resolve_data_root",
]

Task = Literal["classification", "regression"]

#: Environment variable naming the data root when the spec gives no ``dataset.root``.
DATA_ROOT_ENV = "MODELSEL_DATA_ROOT"

#: ``random_state`` of the held-out test split of ``digits`` and ``csv``: fixed, so the
#: test split does not change with the study seed.
SPLIT_RANDOM_STATE = 0

#: The four raw Fashion-MNIST files torchvision reads from ``<root>/FashionMNIST/raw/``.
FASHION_MNIST_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: An integer-valued numeric CSV target with at most this many distinct values (and at
#: least five rows per value on average) is inferred to be a class label.
CSV_CLASSIFICATION_MAX_CLASSES = 20
_CSV_MIN_ROWS_PER_CLASS = 5

#: Salt mixed into the study seed for the nested subset ordering, so that the ordering
#: is not drawn from the same random stream as seed-generated data.
_SUBSET_SALT = 0x5B5E7

#: Default of ``Dataset.standardize`` for each dataset when the spec leaves it unset.
_STANDARDIZE_DEFAULT: dict[str, bool] = {
    "fashion-mnist": False,
    "digits": False,
    "polynomial": False,
    "csv": True,
    "synthetic-classification": True,
}


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True, eq=False)
class Dataset:
    """A decoded dataset: training split and held-out test split as tensors.

    Attributes
    ----------
    name
        The spec's ``dataset.name``.
    task
        ``"classification"`` or ``"regression"``.
    X_train, X_test
        float32 features, ``[n, n_features]``, contiguous.
    y_train, y_test
        int64 class indices (classification) or float32 targets (regression), ``[n]``.
    n_classes
        Number of classes; ``None`` for regression.
    feature_names
        One name per feature column.
    class_names
        One name per class index; ``None`` for regression.
    standardize
        Whether cross-validation should standardize the features with statistics of
        the training folds.
    one_hot_columns
        Indices of the one-hot columns of categorical features (CSV). Their encoder saw
        the whole training split; cross-validation zeroes, in a validation fold, the
        levels its training fold lacks, as the encoder does for the test split.
    file_sha256, file_size
        The SHA-256 (hex) and size in bytes of the file the data was decoded from (CSV);
        ``None`` for the other datasets.
    """

    name: str
    task: Task
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int | None
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...] | None
    standardize: bool
    one_hot_columns: tuple[int, ...] = ()
    file_sha256: str | None = None
    file_size: int | None = None

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return int(self.X_train.shape[1])

    @property
    def n_outputs(self) -> int:
        """Number of model outputs: ``n_classes``, or 1 for regression."""
        return self.n_classes if self.n_classes is not None else 1

    def __repr__(self) -> str:
        classes = f", n_classes={self.n_classes}" if self.n_classes is not None else ""
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, n_train={len(self.y_train)}, "
            f"n_test={len(self.y_test)}, n_features={self.n_features}{classes}, "
            f"standardize={self.standardize})"
        )


# ----------------------------------------------------------------------- public API


def load_dataset(spec: DatasetSpec, *, seed: int) -> Dataset:
    """Load the dataset a spec names: decoded once per process, then subset per call.

    Parameters
    ----------
    spec
        The study's ``dataset`` section.
    seed
        The study seed. It generates ``polynomial`` and ``synthetic-classification``
        data and orders the training split for the nested ``train_size`` subsets; it
        never changes the held-out test split of ``digits``, ``csv`` or
        ``fashion-mnist``.

    Returns
    -------
    Dataset
        With ``train_size`` and (``polynomial``) ``degree`` applied. Without either,
        repeated calls return the same cached tensor objects: do not modify them.

    Raises
    ------
    DataError
        The data cannot be found, read or understood, or ``train_size`` exceeds the
        training split.
    """
    if isinstance(spec, FashionMNISTSpec):
        dataset = _load_fashion_mnist(spec)
    elif isinstance(spec, DigitsSpec):
        dataset = _decode_digits(spec.test_size)
    elif isinstance(spec, PolynomialSpec):
        dataset = _generate_polynomial(spec.max_degree, spec.n_train, spec.n_test, spec.noise, seed)
        dataset = _select_degree(dataset, spec.degree)
    elif isinstance(spec, CSVSpec):
        dataset = _load_csv(spec)
    elif isinstance(spec, SyntheticClassificationSpec):
        dataset = _generate_synthetic(
            spec.n_samples,
            spec.n_features,
            spec.n_informative,
            spec.n_redundant,
            spec.n_classes,
            spec.n_clusters_per_class,
            spec.class_sep,
            spec.flip_y,
            spec.test_size,
            seed,
        )
    else:  # pragma: no cover - the spec union is closed
        raise DataError(f"unknown dataset {getattr(spec, 'name', spec)!r}")

    if spec.standardize is not None and spec.standardize != dataset.standardize:
        dataset = replace(dataset, standardize=spec.standardize)
    if spec.train_size is not None:
        dataset = _subset_train(dataset, spec.train_size, seed=seed)
    return dataset


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``root`` if given, else ``$MODELSEL_DATA_ROOT``, else the user cache.

    Parameters
    ----------
    root
        The spec's ``dataset.root`` (``~`` is expanded).

    Returns
    -------
    Path
        The folder holding ``FashionMNIST/raw/``; it need not exist.
    """
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    return default_data_root()


def default_data_root() -> Path:
    """The data root when the spec gives none: ``$MODELSEL_DATA_ROOT``, else the user cache.

    The user cache is ``$XDG_CACHE_HOME/modelsel/data`` when ``XDG_CACHE_HOME`` is set
    to an absolute path, else ``~/.cache/modelsel/data``.

    Returns
    -------
    Path
        The folder holding ``FashionMNIST/raw/``; it need not exist.
    """
    env = os.environ.get(DATA_ROOT_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    cache = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return cache / "modelsel" / "data"


def nested_subset_indices(
    y: torch.Tensor | np.ndarray, size: int, *, seed: int, stratified: bool
) -> np.ndarray:
    """Indices of a seeded, nested (and optionally stratified) subset of ``size`` samples.

    One ordering of all samples is drawn from ``seed`` and the subset is its first
    ``size`` entries, so for a fixed seed a smaller subset is always inside a larger
    one. With ``stratified``, each class's samples are shuffled and the ``r``-th of
    the ``n_c`` samples of class ``c`` gets the key ``(r + u_c) / n_c`` with ``u_c``
    uniform in [0, 1); sorting by key interleaves the classes so that every prefix
    holds each class within about one sample of its proportional share (two at
    worst with many classes). A class-balanced ``y`` gives exactly balanced subsets
    whenever ``size`` is a multiple of the number of classes.
    Without ``stratified`` the ordering is a seeded permutation.

    Parameters
    ----------
    y
        Targets, one per sample (class labels when ``stratified``).
    size
        Number of samples to keep, ``1 <= size <= len(y)``.
    seed
        Seed of the ordering.
    stratified
        Keep class proportions in every prefix.

    Returns
    -------
    numpy.ndarray
        ``size`` distinct int64 indices into ``y``, in increasing order.

    Raises
    ------
    DataError
        ``size`` is below 1 or above ``len(y)``.
    """
    labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    n = int(labels.shape[0])
    if not 1 <= size <= n:
        raise DataError(f"train_size {size} is out of range: the training split has {n} samples (max {n})")
    order = _nested_order(labels, seed=seed, stratified=stratified)
    return np.sort(order[:size])


def infer_task(target: pd.Series) -> Task:
    """Infer a CSV target's task.

    Classification when the target is not numeric (text, categories, booleans), or
    when it is numeric, integer-valued, has at most
    :data:`CSV_CLASSIFICATION_MAX_CLASSES` (20) distinct values and at least 5 rows
    per distinct value on average; regression otherwise. Set ``dataset.task`` to
    override.

    Parameters
    ----------
    target
        The target column, without missing values.

    Returns
    -------
    str
        ``"classification"`` or ``"regression"``.
    """
    if pd.api.types.is_bool_dtype(target) or not pd.api.types.is_numeric_dtype(target):
        return "classification"
    values = target.to_numpy(dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        return "regression"
    n_unique = len(np.unique(values))
    if n_unique <= CSV_CLASSIFICATION_MAX_CLASSES and n_unique * _CSV_MIN_ROWS_PER_CLASS <= values.size:
        return "classification"
    return "regression"


def clear_dataset_cache() -> None:
    """Forget every decoded dataset of this process (the next load decodes again)."""
    for cached in (
        _decode_fashion_mnist,
        _decode_digits,
        _generate_polynomial,
        _decode_csv,
        _generate_synthetic,
    ):
        cached.cache_clear()


# ------------------------------------------------------------------ shared helpers


def _nested_order(labels: np.ndarray, *, seed: int, stratified: bool) -> np.ndarray:
    rng = np.random.default_rng([seed, _SUBSET_SALT])
    n = int(labels.shape[0])
    if not stratified:
        return rng.permutation(n)
    keys = np.empty(n, dtype=np.float64)
    classes, inverse = np.unique(labels, return_inverse=True)
    offsets = rng.random(len(classes))
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        members = members[rng.permutation(len(members))]
        keys[members] = (np.arange(len(members)) + offsets[c]) / len(members)
    return np.argsort(keys, kind="stable")


def _subset_train(dataset: Dataset, train_size: float, *, seed: int) -> Dataset:
    n = len(dataset.y_train)
    if isinstance(train_size, float):
        size = round(train_size * n)
        if size < 2:
            raise DataError(
                f"train_size {train_size} keeps {size} of the {n} training samples; "
                "use a larger fraction or a count of at least 2"
            )
    else:
        size = int(train_size)
        if size > n:
            raise DataError(
                f"train_size {size} is larger than the training split of '{dataset.name}' "
                f"({n} samples); use at most {n} or a fraction in (0, 1]"
            )
    if size == n:
        return dataset
    indices = torch.from_numpy(
        nested_subset_indices(dataset.y_train, size, seed=seed, stratified=dataset.task == "classification")
    )
    return replace(
        dataset,
        X_train=dataset.X_train.index_select(0, indices),
        y_train=dataset.y_train.index_select(0, indices),
    )


def _features(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _targets(array: np.ndarray, task: Task) -> torch.Tensor:
    dtype = np.int64 if task == "classification" else np.float32
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))


def _stratified_split(
    n: int, y: np.ndarray | None, test_size: float, random_state: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped,unused-ignore]

    try:
        train, test = train_test_split(
            np.arange(n), test_size=test_size, random_state=random_state, stratify=y
        )
    except ValueError as exc:
        raise DataError(f"{what}: cannot make the held-out test split: {_one_line(exc)}") from None
    return np.sort(train), np.sort(test)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------- Fashion-MNIST


def _load_fashion_mnist(spec: FashionMNISTSpec) -> Dataset:
    root = resolve_data_root(spec.root)
    raw = root / "FashionMNIST" / "raw"
    located = _locate_fashion_files(raw)
    if located is None:
        if spec.download:
            _download_fashion_mnist(root, raw)
            located = _locate_fashion_files(raw)
        if located is None:
            raise DataError(_fashion_missing_message(root, raw))
    return _decode_fashion_mnist(os.path.abspath(raw), located)


def _locate_fashion_files(raw: Path) -> tuple[str, ...] | None:
    """Each expected file's name (plain, else ``.gz``), or ``None`` if any is missing."""
    names = []
    for name in FASHION_MNIST_FILES:
        if (raw / name).is_file():
            names.append(name)
        elif (raw / f"{name}.gz").is_file():
            names.append(f"{name}.gz")
        else:
            return None
    return tuple(names)


def _fashion_missing_message(root: Path, raw: Path) -> str:
    missing = [n for n in FASHION_MNIST_FILES if not (raw / n).is_file() and not (raw / f"{n}.gz").is_file()]
    if len(missing) == len(FASHION_MNIST_FILES):
        what = f"{raw} has none of the expected files {', '.join(FASHION_MNIST_FILES)} (plain or .gz)"
    else:
        what = (
            f"{raw} lacks {', '.join(missing)} "
            f"(expected all of {', '.join(FASHION_MNIST_FILES)}, plain or .gz)"
        )
    hint = ""
    if _locate_fashion_files(root / "raw") is not None and root.name == "FashionMNIST":
        hint = f" (the files are in {root / 'raw'}: set the root to {root.parent}, the folder above FashionMNIST)"
    elif _locate_fashion_files(root) is not None:
        hint = f" (the files are in {root}: move them into {raw})"
    return (
        f"Fashion-MNIST not found: {what}{hint}; fix: set dataset.download: true to download them, "
        f"or put the four files in that folder, or point dataset.root (or ${DATA_ROOT_ENV}) at the "
        "folder that holds FashionMNIST/raw/"
    )


def _download_fashion_mnist(root: Path, raw: Path) -> None:
    from torchvision.datasets import FashionMNIST  # type: ignore[import-untyped,unused-ignore]

    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except (OSError, RuntimeError, ValueError) as exc:  # network, permission, checksum failures
        raise DataError(
            f"downloading Fashion-MNIST into {raw} failed: {type(exc).__name__}: {_one_line(exc)}; "
            f"fix: check the network and that the folder is writable, or put "
            f"{', '.join(FASHION_MNIST_FILES)} in {raw} yourself"
        ) from None


@functools.lru_cache(maxsize=2)
def _decode_fashion_mnist(raw_dir: str, files: tuple[str, ...]) -> Dataset:
    # The IDX files are read directly (the same bytes torchvision's FashionMNIST puts in
    # ``.data``/``.targets``): importing torchvision alone takes 2-5 s, the read ~0.1 s.
    raw = Path(raw_dir)
    X_train, y_train, X_test, y_test = (
        _read_idx(raw / name, ndim=ndim) for name, ndim in zip(files, (3, 1, 3, 1), strict=True)
    )
    for X, y, split in ((X_train, y_train, "train"), (X_test, y_test, "t10k")):
        if X.shape[0] != y.shape[0] or (len(y) and int(y.max()) >= len(_FASHION_CLASSES)):
            raise DataError(
                f"Fashion-MNIST in {raw}: {split} images {tuple(X.shape)} do not match labels "
                f"{tuple(y.shape)} or a label is above 9; fix: the files are corrupt, delete them and "
                "download again (dataset.download: true)"
            )
    if X_train.shape[1:] != X_test.shape[1:]:
        raise DataError(
            f"Fashion-MNIST in {raw}: train images are {tuple(X_train.shape[1:])} but t10k images "
            f"{tuple(X_test.shape[1:])}; fix: the files are corrupt, delete them and download again"
        )
    height, width = int(X_train.shape[1]), int(X_train.shape[2])
    return Dataset(
        name="fashion-mnist",
        task="classification",
        X_train=X_train.reshape(len(X_train), height * width).float().div_(255.0),
        y_train=y_train.to(torch.int64),
        X_test=X_test.reshape(len(X_test), height * width).float().div_(255.0),
        y_test=y_test.to(torch.int64),
        n_classes=len(_FASHION_CLASSES),
        feature_names=tuple(f"pixel_{r}_{c}" for r in range(height) for c in range(width)),
        class_names=_FASHION_CLASSES,
        standardize=_STANDARDIZE_DEFAULT["fashion-mnist"],
    )


def _read_idx(path: Path, *, ndim: int) -> torch.Tensor:
    """Decode an IDX file of unsigned bytes with ``ndim`` dimensions (plain or gzip).

    The ``.gz`` variant is decompressed in memory: the data folder may be read-only.
    """
    fix = "fix: delete it and download again (dataset.download: true)"
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
                raise DataError(
                    f"{path} is not an IDX file of {ndim}-d unsigned bytes (header {magic.hex()}); {fix}"
                )
            dims = handle.read(4 * ndim)
            shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(len(dims) // 4))
            if path.suffix == ".gz":
                array = np.frombuffer(handle.read(), dtype=np.uint8).copy()
            else:
                array = np.fromfile(handle, dtype=np.uint8)
    except (OSError, EOFError, zlib.error) as exc:  # zlib: corrupt compressed data in a .gz file
        raise DataError(f"cannot read {path}: {_one_line(exc)}; {fix}") from None
    expected = math.prod(shape)
    if len(shape) != ndim or array.size != expected:
        raise DataError(
            f"{path} is truncated or corrupt (header shape {shape} needs {expected} bytes of data, "
            f"found {array.size}); {fix}"
        )
    return torch.from_numpy(array.reshape(shape))


# -------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=8)
def _decode_digits(test_size: float) -> Dataset:
    from sklearn.datasets import load_digits  # type: ignore[import-untyped,unused-ignore]

    bunch = load_digits()
    X = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    train, test = _stratified_split(len(y), y, test_size, SPLIT_RANDOM_STATE, "digits")
    return Dataset(
        name="digits",
        task="classification",
        X_train=_features(X[train]),
        y_train=_targets(y[train], "classification"),
        X_test=_features(X[test]),
        y_test=_targets(y[test], "classification"),
        n_classes=10,
        feature_names=tuple(str(name) for name in bunch.feature_names),
        class_names=tuple(str(c) for c in range(10)),
        standardize=_STANDARDIZE_DEFAULT["digits"],
    )


# ---------------------------------------------------------------------- polynomial

#: Coefficients of D2L's polynomial on the features x^i / i!.
POLYNOMIAL_TRUE_WEIGHTS: tuple[float, ...] = (5.0, 1.2, -3.4, 5.6)


@functools.lru_cache(maxsize=32)
def _generate_polynomial(max_degree: int, n_train: int, n_test: int, noise: float, seed: int) -> Dataset:
    # D2L 3.3: y = 5 + 1.2 x - 3.4 x^2/2! + 5.6 x^3/3! + eps, features x^i / i!.
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = rng.normal(size=n)
    eps = rng.normal(scale=noise, size=n) if noise > 0 else np.zeros(n)
    # The target is always the cubic: with max_degree below 4 only the features stop
    # short of it (its higher terms used to vanish from y as well, another problem).
    n_terms = max(max_degree, len(POLYNOMIAL_TRUE_WEIGHTS))
    powers = np.arange(n_terms)
    factorials = np.array([math.factorial(int(i)) for i in powers], dtype=np.float64)
    features = np.power(x[:, None], powers[None, :]) / factorials[None, :]
    weights = np.zeros(n_terms)
    weights[: len(POLYNOMIAL_TRUE_WEIGHTS)] = POLYNOMIAL_TRUE_WEIGHTS
    y = features @ weights + eps
    features, powers = features[:, :max_degree], powers[:max_degree]
    return Dataset(
        name="polynomial",
        task="regression",
        X_train=_features(features[:n_train]),
        y_train=_targets(y[:n_train], "regression"),
        X_test=_features(features[n_train:]),
        y_test=_targets(y[n_train:], "regression"),
        n_classes=None,
        feature_names=tuple(f"x^{i}/{i}!" for i in powers),
        class_names=None,
        standardize=_STANDARDIZE_DEFAULT["polynomial"],
    )


def _select_degree(dataset: Dataset, degree: int | None) -> Dataset:
    if degree is None or degree + 1 >= dataset.n_features:
        return dataset
    keep = degree + 1
    return replace(
        dataset,
        X_train=dataset.X_train[:, :keep].contiguous(),
        X_test=dataset.X_test[:, :keep].contiguous(),
        feature_names=dataset.feature_names[:keep],
    )


# ------------------------------------------------------- synthetic classification


@functools.lru_cache(maxsize=32)
def _generate_synthetic(
    n_samples: int,
    n_features: int,
    n_informative: int,
    n_redundant: int,
    n_classes: int,
    n_clusters_per_class: int,
    class_sep: float,
    flip_y: float,
    test_size: float,
    seed: int,
) -> Dataset:
    from sklearn.datasets import make_classification  # type: ignore[import-untyped,unused-ignore]

    try:
        X, y = make_classification(
            n_samples=n_samples,
            n_features=n_features,
            n_informative=n_informative,
            n_redundant=n_redundant,
            n_classes=n_classes,
            n_clusters_per_class=n_clusters_per_class,
            class_sep=class_sep,
            flip_y=flip_y,
            random_state=seed,
        )
    except ValueError as exc:
        raise DataError(
            f"synthetic-classification: {_one_line(exc)}; fix the dataset's n_features, n_informative, "
            "n_redundant, n_classes or n_clusters_per_class"
        ) from None
    y = np.asarray(y, dtype=np.int64)
    train, test = _stratified_split(len(y), y, test_size, seed, "synthetic-classification")
    return Dataset(
        name="synthetic-classification",
        task="classification",
        X_train=_features(X[train]),
        y_train=_targets(y[train], "classification"),
        X_test=_features(X[test]),
        y_test=_targets(y[test], "classification"),
        n_classes=n_classes,
        feature_names=tuple(f"x{i}" for i in range(n_features)),
        class_names=tuple(str(c) for c in range(n_classes)),
        standardize=_STANDARDIZE_DEFAULT["synthetic-classification"],
    )


# ----------------------------------------------------------------------------- CSV

#: A text column whose distinct values exceed both this count and half the rows is
#: rejected as an identifier or free text (one-hot encoding it would explode).
_CSV_MAX_CATEGORIES = 20


def _load_csv(spec: CSVSpec) -> Dataset:
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(
            f"CSV file not found: {path} (resolved to {path.resolve()}); "
            "fix dataset.path (relative paths are relative to the working directory)"
        )
    if not path.is_file():
        raise DataError(f"dataset.path {path} is not a file; give the path of a CSV file")
    stat = path.stat()
    return _decode_csv(
        str(path.resolve()), stat.st_mtime_ns, stat.st_size, spec.target, spec.task, spec.test_size
    )


@functools.lru_cache(maxsize=16)
def _decode_csv(
    path: str, mtime_ns: int, size: int, target: str, task: Task | None, test_size: float
) -> Dataset:
    del mtime_ns, size  # part of the cache key only: an edited file is read again
    raw = _read_bytes(path)
    frame = _read_csv(path, raw)
    if target not in frame.columns:
        columns = ", ".join(repr(str(c)) for c in frame.columns)
        hint = ""
        if len(frame.columns) == 1 and any(sep in str(frame.columns[0]) for sep in (";", "\t", "|")):
            hint = " (one column only: is the file separated by something other than commas?)"
        raise DataError(
            f"{path}: no target column {target!r}; available columns: {columns}{hint}; fix dataset.target"
        )
    y_raw = frame[target]
    missing = y_raw.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"{path}: target column {target!r} has {int(missing.sum())} missing value(s) "
            f"(first on line {_line(int(np.flatnonzero(missing)[0]))}); fix: fill or drop those rows"
        )
    resolved_task = task if task is not None else infer_task(y_raw)

    feature_frame = frame.drop(columns=[target])
    if feature_frame.shape[1] == 0:
        raise DataError(f"{path}: no feature columns besides the target {target!r}; add feature columns")
    numeric, categorical = _split_columns(path, feature_frame)

    if resolved_task == "classification":
        y, class_names = _encode_labels(y_raw)
        counts = np.bincount(y, minlength=len(class_names))
        if len(class_names) < 2:
            raise DataError(
                f"{path}: target column {target!r} has a single class {class_names[0]!r}; "
                "a classification target needs at least two (or set dataset.task: regression)"
            )
        rare = int(np.argmin(counts))
        if counts[rare] < 2:
            raise DataError(
                f"{path}: class {class_names[rare]!r} of target {target!r} has only {int(counts[rare])} row; "
                "the stratified test split needs at least 2 rows per class: add rows, drop that class, "
                "or set dataset.task: regression"
            )
        stratify: np.ndarray | None = y
    else:
        y_numeric = pd.to_numeric(y_raw, errors="coerce") if not pd.api.types.is_bool_dtype(y_raw) else None
        if y_numeric is None or y_numeric.isna().any():
            bad = y_raw[y_numeric.isna()].iloc[0] if y_numeric is not None else y_raw.iloc[0]
            raise DataError(
                f"{path}: target column {target!r} is not numeric (e.g. {str(bad)!r}) but the task is "
                "regression; fix: set dataset.task: classification or clean the column"
            )
        y = y_numeric.to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(y)):
            raise DataError(f"{path}: target column {target!r} contains inf; fix: drop or fill those rows")
        _check_float32_range(path, f"target column {target!r}", y)
        class_names = None
        stratify = None

    train, test = _stratified_split(len(frame), stratify, test_size, SPLIT_RANDOM_STATE, path)
    X_train, X_test, feature_names = _encode_features(feature_frame, numeric, categorical, train, test)
    n_classes = len(class_names) if class_names is not None else None
    return Dataset(
        name="csv",
        task=resolved_task,
        X_train=_features(X_train),
        y_train=_targets(y[train], resolved_task),
        X_test=_features(X_test),
        y_test=_targets(y[test], resolved_task),
        n_classes=n_classes,
        feature_names=feature_names,
        class_names=class_names,
        standardize=_STANDARDIZE_DEFAULT["csv"],
        one_hot_columns=tuple(range(len(numeric), len(feature_names))),
        file_sha256=hashlib.sha256(raw).hexdigest(),
        file_size=len(raw),
    )


def _line(row: int) -> int:
    """Line number in the file of data row ``row`` (after one header line)."""
    return row + 2


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file: {_one_line(exc)}") from None


def _read_csv(path: str, raw: bytes) -> pd.DataFrame:
    """Parse the file's bytes ``raw`` after :func:`_check_header`."""
    if b"\x00" in raw[:1024]:  # no CSV text holds NUL; pandas read a file of zeros as a header alone
        raise DataError(
            f"{path}: not a text CSV file (it holds NUL bytes: a binary file, or text saved as UTF-16); "
            "give the path of a CSV file saved as UTF-8 text"
        )
    _check_header(path, raw)
    try:
        # By default pandas took the first field of rows longer than the header as a row index,
        # shifting each column's name onto the next column; index_col=False warns of them instead.
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(io.BytesIO(raw), low_memory=False, index_col=False)
    except pd.errors.ParserWarning:
        raise DataError(
            f"{path}: the data rows have more fields than the header has names; fix: name every column "
            "in the header (or drop the extra fields, such as a row index)"
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; give a CSV with a header row and data rows") from None
    except pd.errors.ParserError as exc:
        raise DataError(
            f"{path}: not a parseable CSV: {_one_line(exc)}; fix: every row needs the header's number "
            "of comma-separated fields (quote fields that contain commas)"
        ) from None
    except UnicodeDecodeError:
        raise DataError(_not_utf8(path)) from None
    if len(frame) == 0:
        raise DataError(f"{path}: the file has a header but no data rows; add rows")
    return frame


def _not_utf8(path: str) -> str:
    return f"{path}: not UTF-8 text; save the table as a UTF-8 CSV file"


def _check_header(path: str, raw: bytes) -> None:
    """Refuse header cells without a name and names given twice, read from the raw header:
    pandas names the former ``Unnamed: 0`` and renames the latter (``y``, ``y.1``), so a
    row index or a second copy of the target would become a feature."""
    reader = csv.reader(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig", newline=""))
    try:
        header = next((row for row in reader if row), None)  # pandas skips blank lines too
    except UnicodeDecodeError:
        raise DataError(_not_utf8(path)) from None
    except csv.Error:
        return  # pandas says what is wrong with the file
    if header is None:
        return
    unnamed = next((position for position, name in enumerate(header, start=1) if not name.strip()), None)
    if unnamed == 1:
        raise DataError(
            f"{path}: column 1 of the header has no name; it is probably a row index written by pandas' "
            "DataFrame.to_csv; fix: name the column or drop it (write the file with to_csv(..., index=False))"
        )
    if unnamed is not None:
        raise DataError(f"{path}: column {unnamed} of the header has no name; fix: name the column or drop it")
    positions: dict[str, list[int]] = {}
    for position, name in enumerate(header, start=1):
        positions.setdefault(name, []).append(position)
    for name, where in positions.items():
        if len(where) > 1:
            columns = ", ".join(str(p) for p in where)
            raise DataError(
                f"{path}: column name {name!r} appears {len(where)} times in the header (columns {columns}); "
                "fix: rename or drop all but one of them"
            )


def _split_columns(path: str, frame: pd.DataFrame) -> tuple[dict[str, np.ndarray], list[str]]:
    """Sort feature columns into numeric (as float64 arrays) and categorical; reject bad values."""
    numeric: dict[str, np.ndarray] = {}
    categorical: list[str] = []
    for column in frame.columns:
        name = str(column)
        values = frame[column]
        missing = values.isna().to_numpy()
        if missing.any():
            raise DataError(
                f"{path}: feature column {name!r} has {int(missing.sum())} missing value(s) "
                f"(first on line {_line(int(np.flatnonzero(missing)[0]))}); fix: fill them, "
                "drop those rows, or drop the column"
            )
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            numbers = values.to_numpy(dtype=np.float64)
        else:
            text = values.astype(str)
            parsed = pd.to_numeric(text, errors="coerce")
            bad = parsed.isna().to_numpy()
            if bad.any() and (~bad).sum() > bad.sum():  # mostly numbers: the rest is garbage
                first = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"{path}: column {name!r} is mostly numbers but line {_line(first)} holds "
                    f"{text.iloc[first]!r}; fix that value (or make the whole column text to treat it "
                    "as categorical)"
                )
            if bad.any():
                n_unique = int(text.nunique())
                if n_unique > _CSV_MAX_CATEGORIES and 2 * n_unique > len(text):
                    raise DataError(
                        f"{path}: text column {name!r} has {n_unique} distinct values in {len(text)} "
                        "rows, like an identifier or free text; fix: drop the column (one-hot encoding "
                        "would not generalize)"
                    )
                categorical.append(name)
                continue
            numbers = parsed.to_numpy(dtype=np.float64)
        finite = np.isfinite(numbers)
        if not finite.all():
            raise DataError(
                f"{path}: feature column {name!r} contains inf (line "
                f"{_line(int(np.flatnonzero(~finite)[0]))}); fix: replace it with a finite number"
            )
        _check_float32_range(path, f"feature column {name!r}", numbers)
        numeric[name] = numbers
    return numeric, categorical


def _check_float32_range(path: str, what: str, numbers: np.ndarray) -> None:
    """Refuse a value the float32 tensors cannot hold: the cast would make it inf."""
    beyond = np.abs(numbers) > np.finfo(np.float32).max
    if beyond.any():
        first = int(np.flatnonzero(beyond)[0])
        raise DataError(
            f"{path}: {what} holds {numbers[first]:g} on line {_line(first)}, beyond the float32 range "
            f"(±{np.finfo(np.float32).max:.4g}) the model trains in; fix: rescale the column (another unit, "
            "or a log) or drop that row"
        )


def _encode_labels(y_raw: pd.Series) -> tuple[np.ndarray, tuple[str, ...]]:
    from sklearn.preprocessing import LabelEncoder  # type: ignore[import-untyped,unused-ignore]

    values: Any = y_raw
    if pd.api.types.is_numeric_dtype(y_raw) and not pd.api.types.is_bool_dtype(y_raw):
        floats = y_raw.to_numpy(dtype=np.float64)
        values = floats.astype(np.int64) if np.all(floats == np.round(floats)) else floats
    else:
        values = y_raw.astype(str).to_numpy()
    encoder = LabelEncoder()
    y = np.asarray(encoder.fit_transform(values), dtype=np.int64)
    return y, tuple(str(c) for c in encoder.classes_)


def _encode_features(
    frame: pd.DataFrame,
    numeric: dict[str, np.ndarray],
    categorical: list[str],
    train: np.ndarray,
    test: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Numeric columns as they are, then the one-hot columns (encoder fit on the train split)."""
    from sklearn.preprocessing import OneHotEncoder  # type: ignore[import-untyped,unused-ignore]

    numbers = np.column_stack(list(numeric.values())) if numeric else np.empty((len(frame), 0))
    blocks_train = [numbers[train]]
    blocks_test = [numbers[test]]
    names = list(numeric)
    if categorical:
        text = frame[categorical].astype(str).to_numpy(dtype=object)
        encoder = OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float32)
        blocks_train.append(encoder.fit_transform(text[train]))
        blocks_test.append(encoder.transform(text[test]))
        names.extend(str(n) for n in encoder.get_feature_names_out(categorical))
    return np.hstack(blocks_train), np.hstack(blocks_test), tuple(names)
