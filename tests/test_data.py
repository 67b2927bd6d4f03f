"""Tests of modelsel.data: every dataset, nested subsets, caching and every error message."""

from __future__ import annotations

import gzip
import math
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from modelsel import data as data_module
from modelsel.data import (
    FASHION_MNIST_FILES,
    Dataset,
    clear_dataset_cache,
    default_data_root,
    load_dataset,
    nested_subset_indices,
    resolve_data_root,
)
from modelsel.errors import DataError, UserError
from modelsel.spec import (
    CSVSpec,
    DigitsSpec,
    FashionMNISTSpec,
    PolynomialSpec,
    SyntheticClassificationSpec,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """The folder holding FashionMNIST/raw: $MODELSEL_DATA_ROOT, else <repo>/../shared/data."""
    env = os.environ.get("MODELSEL_DATA_ROOT", "").strip()
    root = Path(env) if env else REPO.parent / "shared" / "data"
    raw = root / "FashionMNIST" / "raw"
    if not raw.is_dir():
        pytest.skip(f"Fashion-MNIST raw files not available: {raw} does not exist (set MODELSEL_DATA_ROOT)")
    return root


def fashion(root: Path, **fields: Any) -> FashionMNISTSpec:
    return FashionMNISTSpec(name="fashion-mnist", root=str(root), **fields)


def raises_data_error(spec: Any, *, seed: int = 0) -> str:
    """Load ``spec`` expecting a DataError; return its message after checking it is one line."""
    with pytest.raises(DataError) as info:
        load_dataset(spec, seed=seed)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert isinstance(info.value, UserError)
    return message


def assert_well_formed(ds: Dataset) -> None:
    assert ds.X_train.dtype == torch.float32 and ds.X_test.dtype == torch.float32
    assert ds.X_train.is_contiguous() and ds.X_test.is_contiguous()
    assert ds.X_train.ndim == 2 and ds.X_test.shape[1] == ds.X_train.shape[1] == ds.n_features
    assert ds.y_train.shape == (ds.X_train.shape[0],) and ds.y_test.shape == (ds.X_test.shape[0],)
    assert len(ds.feature_names) == ds.n_features
    if ds.task == "classification":
        assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
        assert ds.n_classes is not None and ds.class_names is not None
        assert len(ds.class_names) == ds.n_classes == ds.n_outputs
        assert int(ds.y_train.min()) >= 0 and int(ds.y_train.max()) < ds.n_classes
    else:
        assert ds.y_train.dtype == torch.float32 and ds.y_test.dtype == torch.float32
        assert ds.n_classes is None and ds.class_names is None and ds.n_outputs == 1


# ------------------------------------------------------------------ Fashion-MNIST


def test_fashion_mnist_shapes_range_and_balance(fashion_root: Path) -> None:
    ds = load_dataset(fashion(fashion_root), seed=0)
    assert_well_formed(ds)
    assert ds.X_train.shape == (60000, 784) and ds.X_test.shape == (10000, 784)
    assert float(ds.X_train.min()) == 0.0 and float(ds.X_train.max()) == 1.0
    assert float(ds.X_test.min()) >= 0.0 and float(ds.X_test.max()) <= 1.0
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert (
        ds.class_names is not None
        and ds.class_names[0] == "T-shirt/top"
        and ds.class_names[9] == "Ankle boot"
    )
    assert ds.standardize is False and ds.name == "fashion-mnist"
    assert ds.feature_names[0] == "pixel_0_0" and ds.feature_names[-1] == "pixel_27_27"
    assert "n_train=60000" in repr(ds) and "tensor" not in repr(ds)


def test_fashion_mnist_matches_raw_bytes(fashion_root: Path) -> None:
    # The decoder reads the IDX files itself (no torchvision import on the load path);
    # check it against the bytes: 16-byte image header, 8-byte label header.
    ds = load_dataset(fashion(fashion_root), seed=0)
    raw = fashion_root / "FashionMNIST" / "raw"

    def raw_bytes(name: str, offset: int) -> np.ndarray:
        plain = raw / name  # the root may hold the files plain or gzipped
        data = plain.read_bytes() if plain.is_file() else gzip.decompress((raw / f"{name}.gz").read_bytes())
        return np.frombuffer(bytearray(data), dtype=np.uint8, offset=offset)

    images = raw_bytes("t10k-images-idx3-ubyte", 16).reshape(10000, 784)
    labels = raw_bytes("train-labels-idx1-ubyte", 8)
    assert torch.equal(ds.X_test, torch.from_numpy(images).float() / 255)
    assert torch.equal(ds.y_train, torch.from_numpy(labels.astype(np.int64)))


def test_fashion_mnist_is_cached(fashion_root: Path) -> None:
    first = load_dataset(fashion(fashion_root), seed=0)
    second = load_dataset(fashion(fashion_root), seed=5)
    assert second.X_train is first.X_train and second.y_test is first.y_test


def test_fashion_mnist_nested_stratified_subsets(fashion_root: Path) -> None:
    full = load_dataset(fashion(fashion_root), seed=0)
    small = load_dataset(fashion(fashion_root, train_size=500), seed=3)
    large = load_dataset(fashion(fashion_root, train_size=2000), seed=3)
    assert small.X_train.shape == (500, 784) and large.X_train.shape == (2000, 784)
    assert torch.bincount(small.y_train).tolist() == [50] * 10
    assert torch.bincount(large.y_train).tolist() == [200] * 10
    assert small.X_test is full.X_test  # the held-out set is never subsampled
    small_idx = nested_subset_indices(full.y_train, 500, seed=3, stratified=True)
    large_idx = nested_subset_indices(full.y_train, 2000, seed=3, stratified=True)
    assert set(small_idx.tolist()) <= set(large_idx.tolist())
    assert torch.equal(small.X_train, full.X_train[torch.from_numpy(small_idx)])
    assert torch.equal(large.y_train, full.y_train[torch.from_numpy(large_idx)])
    assert small.X_train.is_contiguous()
    other = load_dataset(fashion(fashion_root, train_size=500), seed=4)
    assert not torch.equal(other.X_train, small.X_train)
    again = load_dataset(fashion(fashion_root, train_size=500), seed=3)
    assert torch.equal(again.X_train, small.X_train)


def test_fashion_mnist_fraction_train_size(fashion_root: Path) -> None:
    ds = load_dataset(fashion(fashion_root, train_size=0.1), seed=0)
    assert ds.X_train.shape[0] == 6000
    assert torch.bincount(ds.y_train).tolist() == [600] * 10
    assert load_dataset(fashion(fashion_root, train_size=1.0), seed=0).X_train.shape[0] == 60000


def test_fashion_mnist_missing_files_message(tmp_path: Path) -> None:
    message = raises_data_error(fashion(tmp_path))
    raw = tmp_path / "FashionMNIST" / "raw"
    assert str(raw) in message
    for name in FASHION_MNIST_FILES:
        assert name in message
    assert "dataset.download: true" in message
    assert "dataset.root" in message and "MODELSEL_DATA_ROOT" in message


def test_fashion_mnist_partly_missing_names_the_missing_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    message = raises_data_error(fashion(tmp_path))
    assert "lacks t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in message
    assert "dataset.download: true" in message


def test_fashion_mnist_root_one_level_too_deep_gets_a_hint(fashion_root: Path) -> None:
    message = raises_data_error(fashion(fashion_root / "FashionMNIST"))
    assert f"set the root to {fashion_root}" in message


def _write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload, compresslevel=1))
    else:
        path.write_bytes(payload)


def _fake_fashion(root: Path, *, compress: bool, n_train: int = 30, n_test: int = 20) -> np.ndarray:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", train_images, compress=compress)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(n_train) % 10, compress=compress)
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), compress=compress)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, compress=compress)
    return train_images


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_fashion_mnist_reads_plain_and_gz_files(tmp_path: Path, compress: bool) -> None:
    images = _fake_fashion(tmp_path, compress=compress)
    ds = load_dataset(fashion(tmp_path), seed=0)
    assert_well_formed(ds)
    assert ds.X_train.shape == (30, 784) and ds.X_test.shape == (20, 784)
    expected = torch.from_numpy(images.reshape(30, 784)).float() / 255
    assert torch.equal(ds.X_train, expected)
    assert ds.y_train.tolist() == [i % 10 for i in range(30)]


def test_fashion_mnist_truncated_file(tmp_path: Path) -> None:
    _fake_fashion(tmp_path, compress=False)
    path = tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    message = raises_data_error(fashion(tmp_path))
    assert str(path) in message and "truncated or corrupt" in message and "download" in message


def test_fashion_mnist_corrupt_compressed_data(tmp_path: Path) -> None:
    # Damaged deflate data raised zlib.error, which was not caught: a traceback.
    _fake_fashion(tmp_path, compress=True)
    raw = tmp_path / "FashionMNIST" / "raw"
    # Compressible images, so that the flipped bytes hit deflate codes, not stored blocks.
    _write_idx(raw / "train-images-idx3-ubyte", (np.arange(30 * 784) % 7).reshape(30, 28, 28), compress=True)
    path = raw / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[20:60] = bytes(b ^ 0xFF for b in data[20:60])
    path.write_bytes(bytes(data))
    message = raises_data_error(fashion(tmp_path))
    assert f"cannot read {path}" in message and "download" in message


def test_fashion_mnist_not_an_idx_file(tmp_path: Path) -> None:
    _fake_fashion(tmp_path, compress=False)
    path = tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(b"<html>not found</html>")
    message = raises_data_error(fashion(tmp_path))
    assert str(path) in message and "not an IDX file" in message


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch, constructor: Any) -> list[tuple[str, bool]]:
    calls: list[tuple[str, bool]] = []

    def fashion_mnist(root: str, train: bool = True, download: bool = False) -> None:
        calls.append((root, download))
        constructor(Path(root), train)

    fake = types.ModuleType("torchvision.datasets")
    fake.FashionMNIST = fashion_mnist  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake)
    return calls


def test_fashion_mnist_download_failure_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(root: Path, train: bool) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://..., got: URLError")

    calls = _fake_torchvision(monkeypatch, offline)
    message = raises_data_error(fashion(tmp_path, download=True))
    assert calls == [(str(tmp_path), True)]
    assert "downloading Fashion-MNIST" in message and str(tmp_path / "FashionMNIST" / "raw") in message
    assert "RuntimeError" in message and "network" in message


def test_fashion_mnist_download_then_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def download(root: Path, train: bool) -> None:
        if train:
            _fake_fashion(root, compress=False, n_train=40)

    calls = _fake_torchvision(monkeypatch, download)
    ds = load_dataset(fashion(tmp_path, download=True), seed=0)
    assert len(calls) == 2 and ds.X_train.shape == (40, 784)
    load_dataset(fashion(tmp_path, download=True), seed=0)
    assert len(calls) == 2  # files present: no second download


def test_data_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSEL_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "spec")) == tmp_path / "spec"
    assert resolve_data_root(None) == tmp_path / "env" == default_data_root()
    monkeypatch.delenv("MODELSEL_DATA_ROOT")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert resolve_data_root(None) == Path.home() / ".cache" / "modelsel" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_root() == tmp_path / "xdg" / "modelsel" / "data"
    assert resolve_data_root("~/x") == Path.home() / "x"


def test_fashion_mnist_uses_env_root(fashion_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSEL_DATA_ROOT", str(fashion_root))
    ds = load_dataset(FashionMNISTSpec(name="fashion-mnist"), seed=0)
    assert ds.X_train.shape == (60000, 784)


# ------------------------------------------------------------------------- digits


def test_digits() -> None:
    ds = load_dataset(DigitsSpec(name="digits"), seed=0)
    assert_well_formed(ds)
    assert ds.X_train.shape == (1437, 64) and ds.X_test.shape == (360, 64)
    assert float(ds.X_train.min()) == 0.0 and float(ds.X_train.max()) == 1.0
    assert ds.class_names == tuple(str(i) for i in range(10)) and ds.standardize is False
    # stratified: each class's share of the test split is close to its share overall
    shares = torch.bincount(ds.y_test, minlength=10) / len(ds.y_test)
    overall = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10) / 1797
    assert float((shares - overall).abs().max()) < 0.01


def test_digits_test_split_does_not_depend_on_seed() -> None:
    a = load_dataset(DigitsSpec(name="digits"), seed=0)
    b = load_dataset(DigitsSpec(name="digits"), seed=123)
    assert torch.equal(a.X_test, b.X_test) and torch.equal(a.y_train, b.y_train)
    c = load_dataset(DigitsSpec(name="digits", test_size=0.5), seed=0)
    assert c.X_test.shape[0] == 899 or c.X_test.shape[0] == 898


def test_digits_subset_is_stratified_and_nested() -> None:
    full = load_dataset(DigitsSpec(name="digits"), seed=1)
    shares = torch.bincount(full.y_train, minlength=10).double() / len(full.y_train)
    previous: set[int] = set()
    for size in (20, 100, 333, 1000):
        idx = nested_subset_indices(full.y_train, size, seed=1, stratified=True)
        counts = torch.bincount(full.y_train[torch.from_numpy(idx)], minlength=10).double()
        assert float((counts - size * shares).abs().max()) <= 1.0
        assert previous <= set(idx.tolist())
        previous = set(idx.tolist())
    sub = load_dataset(DigitsSpec(name="digits", train_size=100), seed=1)
    assert sub.X_train.shape == (100, 64)


def test_train_size_larger_than_split() -> None:
    message = raises_data_error(DigitsSpec(name="digits", train_size=5000))
    assert "5000" in message and "1437" in message and "at most 1437" in message


def test_train_size_fraction_too_small() -> None:
    message = raises_data_error(PolynomialSpec(name="polynomial", n_train=10, train_size=0.01))
    assert "train_size 0.01" in message and "at least 2" in message


def test_standardize_override() -> None:
    assert load_dataset(DigitsSpec(name="digits", standardize=True), seed=0).standardize is True
    synthetic = SyntheticClassificationSpec(name="synthetic-classification", standardize=False)
    assert load_dataset(synthetic, seed=0).standardize is False


# --------------------------------------------------------------------- polynomial


def test_polynomial_matches_formula() -> None:
    ds = load_dataset(PolynomialSpec(name="polynomial", n_train=300, n_test=200), seed=0)
    assert_well_formed(ds)
    assert ds.X_train.shape == (300, 20) and ds.X_test.shape == (200, 20)
    X = torch.cat([ds.X_train, ds.X_test]).double()
    y = torch.cat([ds.y_train, ds.y_test]).double()
    x = X[:, 1]
    for i in range(20):
        assert torch.allclose(X[:, i], x**i / math.factorial(i), rtol=1e-5, atol=1e-6)
    clean = 5 + 1.2 * x - 3.4 * x**2 / 2 + 5.6 * x**3 / 6
    residual = y - clean
    assert abs(float(residual.mean())) < 0.03
    assert 0.085 < float(residual.std()) < 0.115
    assert 0.5 < float(x.std()) < 1.5 and ds.standardize is False
    assert ds.feature_names[:3] == ("x^0/0!", "x^1/1!", "x^2/2!")


def test_polynomial_noise_free_and_seeded() -> None:
    ds = load_dataset(PolynomialSpec(name="polynomial", noise=0.0), seed=2)
    x = ds.X_train[:, 1].double()
    clean = 5 + 1.2 * x - 3.4 * x**2 / 2 + 5.6 * x**3 / 6
    assert torch.allclose(ds.y_train.double(), clean, rtol=1e-5, atol=1e-5)
    again = load_dataset(PolynomialSpec(name="polynomial", noise=0.0), seed=2)
    assert torch.equal(again.X_train, ds.X_train)
    other = load_dataset(PolynomialSpec(name="polynomial", noise=0.0), seed=3)
    assert not torch.equal(other.X_train, ds.X_train)


@pytest.mark.parametrize("max_degree", [2, 3, 4, 20])
def test_the_polynomial_target_is_the_cubic_whatever_max_degree(max_degree: int) -> None:
    # With max_degree below 4 the cubic terms used to vanish from y, not only from X.
    ds = load_dataset(PolynomialSpec(name="polynomial", noise=0.0, max_degree=max_degree), seed=2)
    assert ds.X_train.shape[1] == max_degree
    x = ds.X_train[:, 1].double()
    clean = 5 + 1.2 * x - 3.4 * x**2 / 2 + 5.6 * x**3 / 6
    assert torch.allclose(ds.y_train.double(), clean, rtol=1e-5, atol=1e-5)
    assert ds.feature_names == tuple(f"x^{i}/{i}!" for i in range(max_degree))


def test_polynomial_degree_selects_first_columns() -> None:
    full = load_dataset(PolynomialSpec(name="polynomial"), seed=0)
    for degree, n_columns in ((0, 1), (1, 2), (3, 4), (19, 20), (None, 20)):
        ds = load_dataset(PolynomialSpec(name="polynomial", degree=degree), seed=0)
        assert ds.n_features == n_columns and ds.X_train.is_contiguous() and ds.X_test.is_contiguous()
        assert torch.equal(ds.X_train, full.X_train[:, :n_columns])
        assert torch.equal(ds.X_test, full.X_test[:, :n_columns])
        assert ds.y_train is full.y_train
        assert ds.feature_names == full.feature_names[:n_columns]


def test_polynomial_regression_subset_is_nested() -> None:
    spec = PolynomialSpec(name="polynomial", n_train=100, degree=3)
    small = load_dataset(spec.model_copy(update={"train_size": 20}), seed=0)
    large = load_dataset(spec.model_copy(update={"train_size": 60}), seed=0)
    assert small.X_train.shape == (20, 4) and small.y_train.dtype == torch.float32
    small_rows = {tuple(r) for r in small.X_train.tolist()}
    assert small_rows <= {tuple(r) for r in large.X_train.tolist()}


# ----------------------------------------------------------- synthetic classification


def test_synthetic_classification() -> None:
    spec = SyntheticClassificationSpec(name="synthetic-classification", n_samples=500, n_classes=3)
    ds = load_dataset(spec, seed=7)
    assert_well_formed(ds)
    assert ds.X_train.shape == (400, 20) and ds.X_test.shape == (100, 20)
    assert ds.standardize is True and ds.n_classes == 3
    counts = torch.bincount(ds.y_test, minlength=3)
    assert int(counts.max() - counts.min()) <= 3
    again = load_dataset(spec, seed=7)
    assert torch.equal(again.X_train, ds.X_train)
    assert not torch.equal(load_dataset(spec, seed=8).X_train, ds.X_train)


def test_synthetic_classification_bad_knobs() -> None:
    spec = SyntheticClassificationSpec(
        name="synthetic-classification", n_features=4, n_informative=3, n_redundant=2
    )
    message = raises_data_error(spec)
    assert message.startswith("synthetic-classification:") and "n_informative" in message


# ---------------------------------------------------------------------------- CSV


def write_csv(tmp_path: Path, text: str, name: str = "table.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def csv_spec(path: Path, target: str = "y", **fields: Any) -> CSVSpec:
    return CSVSpec(name="csv", path=str(path), target=target, **fields)


def _mixed_table(n: int = 60) -> str:
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue"]
    lines = ["height,color,count,y"]
    for i in range(n):
        lines.append(f"{rng.normal():.4f},{colors[i % 3]},{i % 7},{'cat' if i % 2 else 'dog'}")
    return "\n".join(lines) + "\n"


def test_csv_numeric_and_categorical_features(tmp_path: Path) -> None:
    ds = load_dataset(csv_spec(write_csv(tmp_path, _mixed_table())), seed=0)
    assert_well_formed(ds)
    assert ds.task == "classification" and ds.class_names == ("cat", "dog") and ds.n_classes == 2
    assert ds.feature_names == ("height", "count", "color_blue", "color_green", "color_red")
    assert ds.X_train.shape == (48, 5) and ds.X_test.shape == (12, 5)
    assert ds.standardize is True
    onehot = torch.cat([ds.X_train, ds.X_test])[:, 2:]
    assert torch.equal(onehot.sum(dim=1), torch.ones(60))
    assert torch.bincount(ds.y_test).tolist() == [6, 6]  # stratified held-out split
    # the test split is fixed, whatever the study seed
    assert torch.equal(load_dataset(csv_spec(tmp_path / "table.csv"), seed=9).X_test, ds.X_test)


def test_csv_unknown_test_category_is_ignored(tmp_path: Path) -> None:
    # 'purple' appears once; wherever the fixed split puts it, the encoder is fit on the train
    # split only, so a test row of an unseen category is all zeros in the one-hot block.
    lines = ["a,color,y"] + [f"{i},{['red', 'blue'][i % 2]},{i % 2}" for i in range(39)] + ["39,purple,1"]
    ds = load_dataset(csv_spec(write_csv(tmp_path, "\n".join(lines))), seed=0)
    fitted = [n for n in ds.feature_names if n.startswith("color_")]
    X = ds.X_train if "color_purple" in fitted else ds.X_test
    sums = X[:, 1:].sum(dim=1)
    assert set(sums.tolist()) <= {0.0, 1.0}
    if "color_purple" not in fitted:
        assert 0.0 in sums.tolist()


def test_csv_task_inference(tmp_path: Path) -> None:
    rows = [f"{i},{i % 3}" for i in range(30)]
    ds = load_dataset(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows), "int.csv")), seed=0)
    assert ds.task == "classification" and ds.class_names == ("0", "1", "2")
    rows = [f"{i},{i * 0.5 + 0.25}" for i in range(30)]
    ds = load_dataset(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows), "float.csv")), seed=0)
    assert ds.task == "regression" and ds.y_train.dtype == torch.float32 and ds.n_outputs == 1
    rows = [f"{i},{i}" for i in range(30)]  # integers, but one value per row: a quantity
    ds = load_dataset(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows), "many.csv")), seed=0)
    assert ds.task == "regression"
    explicit = csv_spec(tmp_path / "many.csv", task="classification", test_size=0.5)
    with pytest.raises(DataError, match="stratified"):
        load_dataset(explicit, seed=0)  # 30 classes of one row each cannot be stratified
    forced = load_dataset(csv_spec(tmp_path / "int.csv", task="regression"), seed=0)
    assert forced.task == "regression" and forced.y_train.dtype == torch.float32


def test_csv_missing_file(tmp_path: Path) -> None:
    message = raises_data_error(csv_spec(tmp_path / "nope.csv"))
    assert "not found" in message and str(tmp_path / "nope.csv") in message and "dataset.path" in message


def test_csv_directory(tmp_path: Path) -> None:
    message = raises_data_error(csv_spec(tmp_path))
    assert "is not a file" in message


def test_csv_empty_file(tmp_path: Path) -> None:
    message = raises_data_error(csv_spec(write_csv(tmp_path, "")))
    assert "empty" in message and "table.csv" in message
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x,y\n", "header.csv")))
    assert "no data rows" in message


def test_csv_unparseable(tmp_path: Path) -> None:
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x,y\n1,2\n3,4,5,6\n")))
    assert "not a parseable CSV" in message and "line 3" in message


def test_csv_rows_longer_than_the_header(tmp_path: Path) -> None:
    # pandas read the first field of each row as a row index: 'x' held the labels' neighbours.
    rows = [f"{i},{i % 5},{i % 2}" for i in range(20)]
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows))))
    assert "more fields than the header has names" in message and "name every column" in message


def test_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("x,y\ncafé,1\n".encode("latin-1"))
    message = raises_data_error(csv_spec(path))
    assert "UTF-8" in message


@pytest.mark.parametrize(
    "content",
    [b"\x00" * 100, gzip.compress(b"x,y\n1,0\n2,1\n"), "x,y\n1,0\n2,1\n".encode("utf-16")],
    ids=["zeros", "gzip", "utf-16"],
)
def test_csv_binary_file(tmp_path: Path, content: bytes) -> None:
    # A file of zeros was "a header but no data rows".
    path = tmp_path / "table.csv"
    path.write_bytes(content)
    message = raises_data_error(csv_spec(path))
    assert "not a text CSV file" in message and "UTF-8" in message


def test_csv_missing_target_column_lists_columns(tmp_path: Path) -> None:
    message = raises_data_error(csv_spec(write_csv(tmp_path, _mixed_table()), target="label"))
    assert "'label'" in message and "'height', 'color', 'count', 'y'" in message
    assert "dataset.target" in message


def test_csv_semicolon_hint(tmp_path: Path) -> None:
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x;y\n1;2\n3;4\n")))
    assert "other than commas" in message


def test_csv_garbage_in_numeric_column(tmp_path: Path) -> None:
    rows = [f"{i},{i % 2}" for i in range(20)]
    rows[7] = "twelve,1"
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows))))
    assert "'x'" in message and "'twelve'" in message and "line 9" in message


def test_csv_missing_values(tmp_path: Path) -> None:
    rows = [f"{i},{i % 2}" for i in range(20)]
    rows[4] = ",1"
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows), "feature.csv")))
    assert "feature column 'x'" in message and "1 missing" in message and "line 6" in message
    assert "fill" in message
    rows = [f"{i},{i % 2}" for i in range(20)]
    rows[2] = "2,"
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows), "target.csv")))
    assert "target column 'y'" in message and "line 4" in message


def test_csv_regression_with_text_target(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "x,y\n" + "\n".join(f"{i},{'ab'[i % 2]}" for i in range(20)))
    message = raises_data_error(csv_spec(path, task="regression"))
    assert "not numeric" in message and "task: classification" in message


def test_csv_single_class_and_rare_class(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "x,y\n" + "\n".join(f"{i},a" for i in range(20)), "one.csv")
    assert "single class" in raises_data_error(csv_spec(path))
    rows = [f"{i},{'ab'[i % 2]}" for i in range(20)] + ["20,c"]
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows), "rare.csv")))
    assert "class 'c'" in message and "at least 2 rows" in message


def test_csv_identifier_column(tmp_path: Path) -> None:
    rows = [f"id{i},{i},{i % 2}" for i in range(50)]
    message = raises_data_error(csv_spec(write_csv(tmp_path, "name,x,y\n" + "\n".join(rows))))
    assert "'name'" in message and "drop the column" in message


@pytest.mark.parametrize("bom", ["", "\ufeff"], ids=["plain", "bom"])
def test_csv_duplicated_column_names_are_refused(tmp_path: Path, bom: str) -> None:
    # pandas renamed the second 'y' to 'y.1': a copy of the target became a feature (CV accuracy 1.0).
    rows = [f"{i},{i % 2},{i % 2}" for i in range(20)]
    message = raises_data_error(csv_spec(write_csv(tmp_path, bom + "y,x,y\n" + "\n".join(rows))))
    assert "column name 'y' appears 2 times" in message and "(columns 1, 3)" in message
    assert "rename or drop" in message
    rows = [f"{i},{i},{i},{i % 2}" for i in range(20)]
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x,z,x,y\n" + "\n".join(rows), "feature.csv")))
    assert "'x'" in message and "(columns 1, 3)" in message


def test_csv_header_cell_without_a_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "indexed.csv"
    pd.DataFrame({"x": range(20), "y": [i % 2 for i in range(20)]}).to_csv(path)  # the index too
    message = raises_data_error(csv_spec(path))
    assert "column 1 of the header has no name" in message and "row index" in message
    assert "to_csv" in message and "index=False" in message
    rows = [f"{i},{i},{i % 2}" for i in range(20)]
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x, ,y\n" + "\n".join(rows))))
    assert "column 2 of the header has no name" in message and "row index" not in message


def test_csv_values_beyond_float32_are_refused(tmp_path: Path) -> None:
    # They passed the finiteness check in float64 and became inf in the float32 tensors.
    rows = [f"{i},{i % 2}" for i in range(20)]
    rows[5] = "1e300,1"
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows), "feature.csv")))
    assert "feature column 'x'" in message and "1e+300" in message and "line 7" in message
    assert "float32" in message and "rescale" in message
    rows = [f"{i},{i * 0.5}" for i in range(20)]
    rows[3] = "3,-4e39"
    message = raises_data_error(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows), "target.csv")))
    assert "target column 'y'" in message and "-4e+39" in message and "line 5" in message
    # Large but representable values load (cross-validation standardizes them in float64).
    rows = [f"{i},{i % 2}" for i in range(20)]
    rows[2] = rows[9] = "3e38,0"
    ds = load_dataset(csv_spec(write_csv(tmp_path, "x,y\n" + "\n".join(rows), "large.csv")), seed=0)
    assert float(torch.cat([ds.X_train, ds.X_test]).max()) == pytest.approx(3e38)


def test_csv_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = write_csv(tmp_path, _mixed_table())
    first = load_dataset(csv_spec(path), seed=0)
    assert load_dataset(csv_spec(path), seed=1).X_train is first.X_train
    path.write_text(_mixed_table(80), encoding="utf-8")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert load_dataset(csv_spec(path), seed=0).X_train.shape[0] == 64


# --------------------------------------------------------------- nested subsets


def test_nested_subset_indices_properties() -> None:
    rng = np.random.default_rng(0)
    y = rng.choice(4, size=1000, p=[0.55, 0.25, 0.15, 0.05])
    shares = np.bincount(y) / len(y)
    previous = np.array([], dtype=np.int64)
    for size in (10, 50, 99, 400, 1000):
        idx = nested_subset_indices(torch.from_numpy(y), size, seed=11, stratified=True)
        assert idx.dtype == np.int64 and len(np.unique(idx)) == size and np.all(np.diff(idx) > 0)
        # within about one sample of the proportional share (bounded by 2 with 4 classes)
        assert np.all(np.abs(np.bincount(y[idx], minlength=4) - size * shares) < 2.0)
        assert np.isin(previous, idx).all()
        previous = idx
    assert np.array_equal(
        nested_subset_indices(y, 50, seed=11, stratified=True),
        nested_subset_indices(torch.from_numpy(y), 50, seed=11, stratified=True),
    )
    plain_small = nested_subset_indices(y, 30, seed=5, stratified=False)
    plain_large = nested_subset_indices(y, 300, seed=5, stratified=False)
    assert np.isin(plain_small, plain_large).all()
    assert not np.array_equal(plain_small, nested_subset_indices(y, 30, seed=6, stratified=False))
    with pytest.raises(DataError, match="max 1000"):
        nested_subset_indices(y, 1001, seed=0, stratified=True)


def test_clear_dataset_cache() -> None:
    first = load_dataset(DigitsSpec(name="digits"), seed=0)
    clear_dataset_cache()
    second = load_dataset(DigitsSpec(name="digits"), seed=0)
    assert second.X_train is not first.X_train and torch.equal(second.X_train, first.X_train)
    assert data_module.Dataset is Dataset
