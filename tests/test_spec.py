"""Tests of modelsel.spec: loading, defaults, shorthands and every bad-input message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_spec_data

from modelsel.errors import SpecError, UserError
from modelsel.spec import (
    CategoricalDistribution,
    DigitsSpec,
    FloatDistribution,
    GradClipSpec,
    IntDistribution,
    StudySpec,
    builtin_spec_path,
    load_spec,
    parse_spec,
    resolve_field,
    value_text,
    with_field,
    with_params,
)

REPO = Path(__file__).resolve().parents[1]


def spec_error(data: Any) -> str:
    """Parse ``data`` expecting a SpecError; return its message after checking it is one line."""
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="s.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("s.yaml: ")
    return message


def spec(**changes: Any) -> dict[str, Any]:
    return {"name": "t", **changes}


# ------------------------------------------------------------------- valid specs


def test_tiny_spec_loads_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_data()), encoding="utf-8")
    loaded = load_spec(path)
    assert isinstance(loaded, StudySpec)
    assert loaded.name == "tiny"
    assert loaded.dataset.name == "synthetic-classification"
    assert loaded.cv.folds == 2
    assert loaded.training.epochs == 2
    assert loaded.budget.n_trials == 2
    assert set(loaded.search) == {"width", "lr"}


def test_defaults() -> None:
    loaded = parse_spec({"name": "defaults"})
    assert loaded.seed == 0
    assert isinstance(loaded.dataset, DigitsSpec)
    assert loaded.model.depth == 1 and loaded.model.width == 64
    assert loaded.model.activation == "relu"
    assert loaded.model.dropout == 0.0 and not loaded.model.batch_norm and not loaded.model.residual
    assert loaded.model.init == "default"
    training = loaded.training
    assert (training.epochs, training.batch_size, training.optimizer, training.lr) == (20, 64, "adam", 1e-3)
    assert training.weight_decay == 0.0 and training.l1 == 0.0
    assert training.grad_clip is None and training.early_stopping is None
    assert training.device == "auto"
    assert loaded.search == {} and loaded.sweep is None
    assert loaded.cv.folds == 5 and loaded.cv.shuffle and loaded.cv.stratified is None
    assert loaded.sampler.name == "tpe" and loaded.pruner.name == "none"
    assert loaded.budget.n_trials == 20 and loaded.budget.timeout is None
    assert loaded.objectives is None and loaded.storage is None
    assert loaded.resolved_objectives("classification") == ["val_accuracy"]
    assert loaded.resolved_objectives("regression") == ["val_loss"]


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-4 as the text '1e-4': the study stored and searched the string.
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: t\ntraining: {lr: 1e-3}\nsearch:\n  weight_decay: [0, 1e-4, 1E-2]\n  l1: [0, '1e-5']\n",
        encoding="utf-8",
    )
    loaded = load_spec(path)
    assert loaded.search["weight_decay"].choices == [0, 1e-4, 1e-2]
    assert loaded.search["l1"].choices == [0, "1e-5"]  # quoted: text, as written
    assert loaded.training.lr == 1e-3
    swept = tmp_path / "w.yaml"
    swept.write_text("name: t\nsweep: {weight_decay: [1e-5, 1e-4]}\n", encoding="utf-8")
    assert load_spec(swept).sweep.axes["weight_decay"] == [1e-5, 1e-4]  # type: ignore[union-attr]


def test_value_text_keeps_a_whole_float_a_float() -> None:
    # "train_size=1" read as one sample, where 1.0 is the whole training split.
    assert [value_text(v) for v in (1.0, 100.0, 0.5, 0.0, 1e-4, 123456.0, 8, "relu", None)] == [
        "1.0", "100.0", "0.5", "0", "0.0001", "1.235e+05", "8", "relu", "None"
    ]
    assert value_text(0.123456789, digits=6) == "0.123457"


def test_load_spec_overrides_replace_top_level_values(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_data()), encoding="utf-8")
    assert load_spec(path, overrides={"seed": 7}).seed == 7


def test_bundled_quickstart_spec_parses_with_budget_30() -> None:
    quickstart = load_spec(builtin_spec_path())
    assert quickstart.name == "quickstart"
    assert quickstart.dataset.name == "digits"
    assert quickstart.budget.n_trials == 30
    assert quickstart.cv.folds == 5
    assert quickstart.sampler.name == "tpe" and quickstart.pruner.name == "median"
    assert {"width", "depth", "activation", "lr", "dropout", "weight_decay"} <= set(quickstart.search)


def test_repository_studies_match_the_bundled_quickstart() -> None:
    # studies/quickstart.yaml is what the README points users at; it must be the one the CLI runs.
    assert load_spec(REPO / "studies" / "quickstart.yaml") == load_spec(builtin_spec_path())


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda path: path.stem)
def test_every_example_study_loads_and_is_named_after_its_file(path: Path) -> None:
    assert load_spec(path).name == path.stem  # the README names the file; the report folder is the name


# ------------------------------------------------------------------- shorthands


def test_grad_clip_float_shorthand_clips_the_norm() -> None:
    loaded = parse_spec(spec(training={"grad_clip": 1.0}))
    assert loaded.training.grad_clip == GradClipSpec(kind="norm", threshold=1.0)
    assert parse_spec(spec(training={"grad_clip": 0})).training.grad_clip is None
    by_value = parse_spec(spec(training={"grad_clip": {"kind": "value", "threshold": 0.5}}))
    assert by_value.training.grad_clip == GradClipSpec(kind="value", threshold=0.5)


def test_early_stopping_shorthands() -> None:
    on = parse_spec(spec(training={"early_stopping": True})).training.early_stopping
    assert on is not None and on.patience == 5 and on.min_delta == 0.0
    assert parse_spec(spec(training={"early_stopping": False})).training.early_stopping is None
    patience = parse_spec(spec(training={"early_stopping": 3})).training.early_stopping
    assert patience is not None and patience.patience == 3


def test_search_shorthands_and_sampler_string() -> None:
    loaded = parse_spec(
        spec(
            search={
                "lr": {"type": "log", "low": 0.001, "high": 0.1},
                "activation": ["relu", "tanh"],
                "depth": {"type": "int", "low": 1, "high": 3},
            },
            sampler="random",
            pruner="median",
        )
    )
    assert loaded.search["lr"] == FloatDistribution(type="float", low=0.001, high=0.1, log=True)
    assert loaded.search["activation"] == CategoricalDistribution(type="categorical", choices=["relu", "tanh"])
    assert loaded.search["depth"] == IntDistribution(type="int", low=1, high=3)
    assert loaded.sampler.name == "random" and loaded.sampler.options == {}
    assert loaded.pruner.name == "median"
    assert parse_spec(spec(sampler="tpe")).sampler.name == "tpe"


def test_width_list_gives_per_layer_widths() -> None:
    loaded = parse_spec(spec(model={"depth": 3, "width": [32, 16, 8]}))
    assert loaded.model.hidden_widths() == (32, 16, 8)
    assert parse_spec(spec(model={"depth": 2, "width": 5})).model.hidden_widths() == (5, 5)
    assert parse_spec(spec(model={"depth": 0})).model.hidden_widths() == ()


# ------------------------------------------------------------------- with_params


def test_with_params_replaces_fields_in_their_sections() -> None:
    base = parse_spec(spec())
    updated = with_params(base, {"lr": 0.05, "width": 12, "model.depth": 2, "training.epochs": 3, "seed": 4})
    assert updated.training.lr == 0.05 and updated.training.epochs == 3
    assert updated.model.width == 12 and updated.model.depth == 2
    assert updated.seed == 4
    assert base.training.lr == 1e-3 and base.model.width == 64  # the original is unchanged
    assert resolve_field(base, "lr") == ("training", "lr")
    assert resolve_field(base, "train_size") == ("dataset", "train_size")


def test_with_params_validates_values() -> None:
    base = parse_spec(spec())
    with pytest.raises(ValueError, match=r"model\.dropout"):
        with_params(base, {"dropout": 1.5})
    with pytest.raises(ValueError, match=r"training\.epochs"):
        with_params(base, {"epochs": "many"})
    with pytest.raises(ValueError, match="width lists 2 layers but depth is 1"):
        with_field(base, "width", [4, 4])
    with pytest.raises(ValueError, match=r"'learning_rate' is not a searchable field; choose one of: .*lr"):
        with_params(base, {"learning_rate": 0.1})
    with pytest.raises(ValueError, match="not a searchable field"):
        with_params(base, {"model.lr": 0.1})  # lr lives in training, not model


def test_with_params_validates_fields_together() -> None:
    # depth and a width list are only consistent when changed together.
    updated = with_params(parse_spec(spec()), {"depth": 2, "width": [8, 4]})
    assert updated.model.hidden_widths() == (8, 4)


# ------------------------------------------------------------------- bad input


def test_unknown_top_level_key_lists_allowed_keys() -> None:
    message = spec_error(spec(epochs=3))
    assert "epochs: unknown key" in message
    assert "allowed keys: name, description, seed, dataset, model, training" in message


@pytest.mark.parametrize(
    ("data", "where", "allowed"),
    [
        ({"model": {"widht": 3}}, "model.widht", "depth, width, activation"),
        ({"training": {"learning_rate": 0.1}}, "training.learning_rate", "epochs, batch_size, optimizer, lr"),
        ({"cv": {"fold": 3}}, "cv.fold", "folds, stratified, shuffle"),
        ({"dataset": {"name": "digits", "n_samples": 5}}, "dataset.n_samples", "train_size, standardize, name"),
        ({"training": {"grad_clip": {"threshold": 1, "type": "norm"}}}, "training.grad_clip.type", "kind, threshold"),
        ({"search": {"lr": {"type": "float", "low": 0.1, "high": 1, "lg": True}}}, "search.lr.lg", "low, high"),
    ],
)
def test_unknown_nested_key_names_path_and_lists_allowed_keys(data: dict[str, Any], where: str, allowed: str) -> None:
    message = spec_error(spec(**data))
    assert f"{where}: unknown key" in message
    assert "allowed keys: " in message
    assert allowed in message


@pytest.mark.parametrize(
    ("data", "field", "hint"),
    [
        ({"training": {"epochs": "many"}}, "training.epochs", "valid integer"),
        ({"training": {"lr": "fast"}}, "training.lr", "valid number"),
        ({"model": {"batch_norm": "sometimes"}}, "model.batch_norm", "valid boolean"),
        ({"seed": [1, 2]}, "seed", "valid integer"),
        ({"model": "big"}, "model", "expected a mapping (key: value pairs), got 'big'"),
        # pydantic's own wording named no fix.
        ({"dataset": "csv"}, "dataset", "expected a mapping (key: value pairs), got 'csv'"),
        ({"name": 123}, "name", "expected text, got 123; quote it if it is meant as text"),
        ({"objectives": "val_loss"}, "objectives", "expected a list, got 'val_loss'; write [val_loss] for a list"),
    ],
)
def test_wrong_type_names_field(data: dict[str, Any], field: str, hint: str) -> None:
    message = spec_error(spec(**data))
    assert f"s.yaml: {field}: " in message
    assert hint in message


@pytest.mark.parametrize(
    ("data", "field", "kind"),
    [
        ({"model": {"width": True}}, "model.width", "an integer"),
        ({"model": {"depth": False}}, "model.depth", "an integer"),
        ({"training": {"epochs": True}}, "training.epochs", "an integer"),
        ({"training": {"batch_size": True}}, "training.batch_size", "an integer"),
        ({"training": {"lr": True}}, "training.lr", "a number"),
        ({"training": {"grad_clip": {"threshold": True}}}, "training.grad_clip.threshold", "a number"),
        ({"dataset": {"name": "digits", "train_size": True}}, "dataset.train_size", "a number"),
        ({"cv": {"folds": True}}, "cv.folds", "an integer"),
        ({"budget": {"timeout": True}}, "budget.timeout", "a number"),
        ({"seed": True}, "seed", "an integer"),
        ({"search": {"width": {"type": "int", "low": True, "high": 8}}}, "search.width.low", "an integer"),
        ({"sweep": {"width": [4, 8], "repeats": True}}, "sweep.repeats", "an integer"),
    ],
)
def test_a_boolean_is_not_a_number(data: dict[str, Any], field: str, kind: str) -> None:
    # pydantic alone reads true as 1: width 1, one epoch, lr 1.0.
    message = spec_error(spec(**data))
    assert f"s.yaml: {field}" in message
    assert f"expected {kind}, got " in message


def test_a_boolean_is_not_a_number_in_a_list_a_search_or_a_sweep() -> None:
    message = spec_error(spec(model={"depth": 2, "width": [True, 4]}))
    assert "model.width: expected an integer or a list of them" in message
    assert "search.epochs: value True is invalid: training.epochs: expected an integer, got true" in spec_error(
        spec(search={"epochs": [True, 2]})
    )
    assert "sweep.seed: seed: expected an integer, got true" in spec_error(spec(sweep={"seed": [True, 2]}))
    base = parse_spec(spec())
    with pytest.raises(ValueError, match=r"model\.width: expected an integer, got true"):
        with_params(base, {"width": True})
    with pytest.raises(ValueError, match="seed: Input should be a valid integer"):
        with_params(base, {"seed": 1.5})
    # Booleans stay booleans where a field takes them, shorthands included.
    loaded = parse_spec(spec(model={"batch_norm": True}, training={"early_stopping": True}))
    assert loaded.model.batch_norm and loaded.training.early_stopping is not None


def test_missing_name_is_reported() -> None:
    assert "name: required key is missing" in spec_error({"seed": 1})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"cv": {"folds": 1}}, "cv.folds: Input should be greater than or equal to 2"),
        ({"model": {"dropout": 1.0}}, "model.dropout: Input should be less than 1"),
        ({"model": {"dropout": -0.1}}, "model.dropout: Input should be greater than or equal to 0"),
        ({"training": {"epochs": 0}}, "training.epochs: Input should be greater than or equal to 1"),
        ({"training": {"lr": 0}}, "training.lr: Input should be greater than 0"),
        ({"budget": {"n_trials": 0}}, "budget.n_trials: Input should be greater than or equal to 1"),
        ({"model": {"width": 0}}, "model.width: every width must be from 1 to 65536"),
        ({"model": {"width": 10**12}}, "model.width: every width must be from 1 to 65536"),
        ({"model": {"depth": 2, "width": [8, 70000]}}, "model.width: every width must be from 1 to 65536"),
        ({"dataset": {"name": "digits", "train_size": 1.5}}, "dataset.train_size: a fractional train_size"),
        ({"training": {"lr": float("nan")}}, "training.lr"),
        ({"training": {"weight_decay": float("inf")}}, "must be finite"),
    ],
)
def test_out_of_range_values(data: dict[str, Any], expected: str) -> None:
    assert expected in spec_error(spec(**data))


def test_unknown_dataset_lists_datasets() -> None:
    message = spec_error(spec(dataset={"name": "mnist"}))
    assert "dataset: unknown name 'mnist'; give one of: " in message
    for name in ("digits", "fashion-mnist", "polynomial", "csv", "synthetic-classification"):
        assert name in message


@pytest.mark.parametrize(
    ("data", "field", "choices"),
    [
        ({"sampler": "bayes"}, "sampler.name", ["tpe", "random", "gp", "cmaes", "grid", "nsga2"]),
        ({"sampler": {"name": "annealing"}}, "sampler.name", ["tpe", "random"]),
        ({"pruner": "aggressive"}, "pruner.name", ["none", "median", "percentile", "successive_halving", "hyperband"]),
        ({"model": {"activation": "swish"}}, "model.activation", ["relu", "leaky_relu", "elu", "gelu", "tanh"]),
        ({"model": {"init": "orthogonal"}}, "model.init", ["default", "xavier_uniform", "kaiming_normal"]),
        ({"training": {"optimizer": "lbfgs"}}, "training.optimizer", ["sgd", "momentum", "adam", "adamw"]),
        ({"objectives": ["accuracy"]}, "objectives.0", ["val_accuracy", "val_loss", "n_params"]),
    ],
)
def test_unknown_choice_lists_valid_choices(data: dict[str, Any], field: str, choices: list[str]) -> None:
    message = spec_error(spec(**data))
    assert f"{field}: " in message
    for choice in choices:
        assert f"'{choice}'" in message


def test_width_list_length_must_match_depth() -> None:
    message = spec_error(spec(model={"depth": 2, "width": [8, 8, 8]}))
    assert "model: width lists 3 layers but depth is 2" in message
    assert "give one width per hidden layer or a single int" in message


def test_low_above_high() -> None:
    message = spec_error(spec(search={"lr": {"type": "float", "low": 0.1, "high": 0.01}}))
    assert "search.lr: low (0.1) is above high (0.01); swap them" in message
    assert "search.width: low (9) is above high (3)" in spec_error(
        spec(search={"width": {"type": "int", "low": 9, "high": 3}})
    )


@pytest.mark.parametrize(
    "dist", [{"type": "float", "low": 0.0, "high": 0.1, "log": True}, {"type": "log", "low": -1, "high": 1}]
)
def test_log_distribution_needs_positive_low(dist: dict[str, Any]) -> None:
    message = spec_error(spec(search={"weight_decay": dist}))
    assert "search.weight_decay: a log distribution needs low > 0" in message


def test_search_range_endpoints_are_validated_against_the_field() -> None:
    message = spec_error(spec(search={"dropout": {"type": "float", "low": 0.0, "high": 1.5}}))
    assert "search.dropout: value 1.5 is invalid" in message
    assert "model.dropout" in message
    message = spec_error(spec(search={"activation": ["relu", "swish"]}))
    assert "search.activation: value 'swish' is invalid" in message


@pytest.mark.parametrize(
    ("key", "dist", "fix"),
    [
        ("width", {"type": "float", "low": 4, "high": 16}, "use type: int"),
        ("model.depth", {"type": "float", "low": 1, "high": 3, "step": 1}, "use type: int"),
        ("epochs", {"type": "log", "low": 1, "high": 8}, "use type: int (with log: true for a log scale)"),
        ("batch_size", {"type": "float", "low": 16, "high": 64}, "use type: int"),
    ],
)
def test_a_float_distribution_over_an_integer_field(key: str, dist: dict[str, Any], fix: str) -> None:
    # Its endpoints are whole numbers, but every trial would draw a float the field refuses.
    field = resolve_field(parse_spec(spec()), key)
    message = spec_error(spec(search={key: dist}))
    assert message.endswith(f"search.{key}: {'.'.join(field)} takes whole numbers, not a float distribution; {fix}")


def test_a_float_distribution_over_a_field_that_takes_floats() -> None:
    loaded = parse_spec(spec(search={"train_size": {"type": "float", "low": 0.2, "high": 0.8}}))
    assert isinstance(loaded.search["train_size"], FloatDistribution)


def test_a_swept_seed_and_repeats_cannot_both_set_the_seeds() -> None:
    message = spec_error(spec(sweep={"width": [4], "seed": [10, 20], "repeats": 3}))
    assert message == "s.yaml: sweep.seed and sweep.repeats both set the seeds; keep one"
    assert parse_spec(spec(sweep={"width": [4], "seed": [10, 20]})).sweep is not None


def test_batch_norm_needs_batches_of_two_samples_fixed_searched_or_swept() -> None:
    # One sample per batch has no batch statistics: torch's BatchNorm1d refuses it in
    # training, and the stacked engine would train on zeros.
    expected = "model.batch_norm needs batches of 2 samples or more (training.batch_size is 1)"
    message = spec_error(spec(model={"batch_norm": True}, training={"batch_size": 1}))
    assert message.endswith(f"{expected}; raise batch_size or set batch_norm: false")
    searched = spec(model={"batch_norm": True}, search={"batch_size": {"type": "int", "low": 1, "high": 8}})
    assert f"search.batch_size: value 1 is invalid: {expected}" in spec_error(searched)
    swept = spec(training={"batch_size": 1}, sweep={"batch_norm": [False, True]})
    assert f"sweep.batch_norm: {expected}" in spec_error(swept)
    assert parse_spec(spec(model={"batch_norm": True, "depth": 0}, training={"batch_size": 1})).model.batch_norm
    with pytest.raises(ValueError, match="batch_norm needs batches of 2"):
        with_params(parse_spec(spec(model={"batch_norm": True})), {"batch_size": 1})


@pytest.mark.parametrize("key", ["device", "name", "learning_rate", "model.lr"])
def test_search_on_unsearchable_or_unknown_field(key: str) -> None:
    message = spec_error(spec(search={key: [1, 2]}))
    assert f"'{key}' is not a searchable field" in message
    assert "choose one of: " in message and "lr" in message and "width" in message


@pytest.mark.parametrize(
    ("where", "key", "values", "why"),
    [
        # The held-out split varied with the trial: one trial's test rows trained another.
        ("search", "test_size", [0.2, 0.3], "held-out test split"),
        ("sweep", "dataset.test_size", [0.2, 0.9], "held-out test split"),
        ("search", "engine", ["sequential", "stacked"], "set training.engine"),
        ("sweep", "stack_trials", [1, 2], "set training.stack_trials"),
        ("search", "train_metrics", ["running", "full"], "set training.train_metrics"),
    ],
)
def test_settings_fixed_for_the_study_cannot_be_searched_or_swept(
    where: str, key: str, values: list[Any], why: str
) -> None:
    message = spec_error(spec(**{where: {key: values}}))
    assert f"{where}.{key}: '{key}' cannot be searched or swept: " in message
    assert why in message


def test_a_searched_momentum_needs_an_optimizer_that_uses_it() -> None:
    # With adam, three momentum values trained three identical models.
    message = spec_error(spec(training={"optimizer": "adam"}, search={"momentum": {"type": "float", "low": 0.1,
                                                                                 "high": 0.99}}))
    assert "search.momentum: the optimizer is adam, which does not use momentum" in message
    swept = spec_error(spec(training={"optimizer": "sgd"}, sweep={"training.momentum": [0.5, 0.9]}))
    assert "sweep.training.momentum: the optimizer is sgd" in swept and "or sweep it too" in swept
    # Searched among optimizers that all ignore it; or swept in one grid while another sweeps the optimizer.
    among = spec_error(spec(search={"momentum": [0.5, 0.9], "optimizer": ["sgd", "adam"]}))
    assert "search.momentum: the optimizer is sgd or adam, which does not use momentum" in among
    two_grids = [{"momentum": [0.5, 0.9]}, {"optimizer": ["sgd", "momentum"]}]
    grids = spec_error(spec(training={"optimizer": "adam"}, sweep=two_grids))
    assert "sweep.0.momentum: the optimizer is adam" in grids
    assert parse_spec(spec(training={"optimizer": "momentum"}, search={"momentum": [0.5, 0.9]}))
    assert parse_spec(spec(search={"momentum": [0.5, 0.9], "optimizer": ["momentum", "adam"]}))
    assert parse_spec(spec(sweep={"momentum": [0.5, 0.9], "optimizer": ["momentum", "sgd"]}))


def test_a_momentum_no_trial_uses_in_a_list_of_grids_names_its_grid() -> None:
    # It said "sweep.momentum" and "or sweep it too", whichever grid of the list it was in.
    fixed = spec_error(spec(training={"optimizer": "adam"}, sweep=[{"width": [4, 8]}, {"momentum": [0.5, 0.9]}]))
    assert fixed.endswith(
        "sweep.1.momentum: the optimizer is adam, which does not use momentum (only optimizer: momentum does), "
        "so every value would train alike; set training.optimizer: momentum, or sweep it in sweep.1 too"
    )
    among = spec_error(spec(sweep=[{"width": [4, 8]}, {"momentum": [0.5, 0.9], "optimizer": ["sgd", "adam"]}]))
    assert "sweep.1.momentum: the optimizer is sgd or adam" in among
    assert among.endswith("add momentum to the choices of sweep.1.optimizer")


def test_one_field_under_two_names() -> None:
    searched = spec(search={"lr": [0.1, 0.01], "training.lr": {"type": "log", "low": 0.001, "high": 0.1}})
    assert spec_error(searched).endswith("search.training.lr and search.lr name the same field training.lr; keep one")
    swept = spec(sweep={"model.width": [4, 8], "width": [16, 32]})
    assert spec_error(swept).endswith("sweep.width and sweep.model.width name the same field model.width; keep one")
    grids = spec(sweep=[{"lr": [0.1], "width": [4]}, {"model.width": [8], "training.lr": [0.2]}])
    assert spec_error(grids).endswith("sweep: two grids sweep the same axes; merge them into one grid")


@pytest.mark.parametrize(
    ("axis", "values", "repeat"),
    [
        ("width", [4, 8, 4], "4 is listed twice"),
        ("width", [4, 4.0], "4 and 4.0 are the same value"),
        ("batch_norm", [True, 1], "true and 1 are the same value"),
        ("train_size", [100, 100.0], "100 and 100.0 are the same value"),
    ],
)
def test_a_sweep_axis_that_repeats_a_value_once_validated(axis: str, values: list[Any], repeat: str) -> None:
    # Each would run one cell twice.
    message = spec_error(spec(sweep={axis: values}))
    assert message == f"s.yaml: sweep.{axis}: sweep axis '{axis}' repeats a value: {repeat}; keep one"


def test_a_categorical_search_that_repeats_a_choice() -> None:
    message = spec_error(spec(search={"activation": ["relu", "tanh", "relu"]}))
    assert message.endswith("search.activation: the choices repeat a value: 'relu' is listed twice; keep one")
    message = spec_error(spec(search={"width": [4, 8, 4.0]}))
    assert message.endswith("search.width: the choices repeat a value: 4 and 4.0 are the same value; keep one")
    assert parse_spec(spec(search={"batch_norm": [True, False]})).search["batch_norm"]


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ({"width": [4, 4]}, "sweep.width: sweep axis 'width' repeats a value: 4 is listed twice; keep one"),
        ({}, "sweep: a sweep has one or two axes, got none; give one such as width: [4, 16, 64]"),
        ({"width": []}, "sweep.width: the axis lists no values; give at least one"),
        ({"width": [4], "depth": [1], "lr": [0.1]}, "sweep: a sweep has one or two axes, got 3; give a list of grids"),
        ({"width": [4, 8], "repeats": 0}, "sweep.repeats: Input should be greater than or equal to 1"),
        ({"axes": {"width": [4]}, "colour": 1}, "sweep.colour: unknown key; allowed keys: axes, repeats"),
        ({"width": 4}, "sweep.width: expected a list of values, got 4; write [4] for one value"),
        ({"axes": {"width": 4}}, "sweep.width: expected a list of values, got 4"),
        ({"early_stopping": [True, {}]}, "sweep.early_stopping: a sweep value is a number, a string, true/false"),
        (
            {"grad_clip": [None, {"kind": "value", "threshold": 0.5}]},
            "sweep.grad_clip: a sweep value is a number, a string, true/false or null, not {'kind': 'value', "
            "'threshold': 0.5}; a setting written as a mapping (e.g. grad_clip: {kind: value, threshold: 0.5}) goes "
            "under training in a study of its own",
        ),
        ([{"lr": [0.1]}, {"width": 4}], "sweep.1.width: expected a list of values, got 4"),
        ([{"lr": [0.1]}, {"width": [4, 4.0]}], "sweep.1.width: sweep axis 'width' repeats a value: 4 and 4.0"),
        ([{"lr": [0.1]}, {"axes": {"width": [4]}, "colour": 1}], "sweep.1.colour: unknown key; allowed keys: axes"),
        (5, "sweep: give a mapping of axes to lists of values, or a list of such grids"),
    ],
)
def test_sweep_errors_name_the_axis_in_the_spec_s_own_terms(sweep: Any, expected: str) -> None:
    # pydantic alone says 'sweep.SweepSpec.axes: ... (and 1 more problem)': the class name of one
    # branch of the sweep's union, and the other branch (a list of grids) counted as a problem.
    message = spec_error(spec(sweep=sweep))
    assert message.startswith(f"s.yaml: {expected}")
    assert "Spec" not in message and "more problem" not in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"model": {"width": "wide"}}, "model.width: Input should be a valid integer, unable to parse string"),
        ({"model": {"depth": 2, "width": [8, "wide"]}}, "model.width.1: Input should be a valid integer"),
        ({"training": {"stack_trials": "many"}}, "training.stack_trials: Input should be a valid integer"),
        ({"search": {"lr": [[0.1]]}}, "search.lr.choices.0: Input should be a valid boolean, a valid integer, a valid"),
        ({"training": {"grad_clip": "hard"}}, "training.grad_clip: expected a number (clip the total norm at it), "),
    ],
)
def test_a_value_that_fits_no_branch_of_a_union_is_one_problem(data: dict[str, Any], expected: str) -> None:
    message = spec_error(spec(**data))
    assert message.startswith(f"s.yaml: {expected}")
    assert "more problem" not in message and "Spec" not in message


def test_dataset_without_a_name_says_which_names_exist() -> None:
    message = spec_error(spec(dataset={"train_size": 100}))
    assert "dataset: missing 'name'" in message
    assert "digits, fashion-mnist, polynomial, csv, synthetic-classification" in message


def test_distribution_without_a_type_says_which_types_exist() -> None:
    message = spec_error(spec(search={"lr": {"low": 0.001, "high": 0.1}}))
    assert "search.lr: missing 'type'" in message
    assert "int, float, log, categorical" in message


def test_unknown_distribution_type() -> None:
    message = spec_error(spec(search={"lr": {"type": "uniform", "low": 0.1, "high": 1}}))
    assert "search.lr: unknown type 'uniform'; give one of: int, float, log, categorical" in message


def test_search_and_sweep_together() -> None:
    message = spec_error(spec(search={"lr": [0.1, 0.01]}, sweep={"width": [4, 8]}))
    assert "give either 'search' or 'sweep', not both" in message


def test_multi_objective_with_a_pruner() -> None:
    message = spec_error(spec(objectives=["val_accuracy", "n_params"], pruner="median"))
    assert "pruning works with one objective only" in message and "pruner: none" in message
    parse_spec(spec(objectives=["val_accuracy", "n_params"]))  # without a pruner it is fine


@pytest.mark.parametrize(
    ("distribution", "message"),
    [
        ({"type": "int", "low": 4, "high": 10, "step": 4}, "(6) is not a multiple of step 4; use high: 8 or"),
        ({"type": "float", "low": 0, "high": 0.25, "step": 0.1}, "(0.25) is not a multiple of step 0.1; use high: 0.2"),
    ],
)
def test_a_step_that_does_not_divide_the_range(distribution: dict[str, Any], message: str) -> None:
    # Optuna warned and quietly searched another range ([4, 8] for 4..10 step 4).
    key = "width" if distribution["type"] == "int" else "dropout"
    assert message in spec_error(spec(search={key: distribution}))
    parse_spec(spec(search={key: {**distribution, "high": 8 if key == "width" else 0.3}}))


@pytest.mark.parametrize("objective", ["n_params", "fit_seconds"])
def test_a_pruner_with_an_objective_that_has_no_curve(objective: str) -> None:
    # It was accepted and never pruned: the trials report no curve for these objectives.
    message = spec_error(spec(objectives=[objective], pruner="median"))
    assert f"{objective} has no per-epoch curve" in message and "pruner: none" in message
    parse_spec(spec(objectives=[objective]))


def test_val_accuracy_on_a_regression_dataset() -> None:
    message = spec_error(spec(dataset={"name": "polynomial"}, objectives=["val_accuracy"]))
    assert "val_accuracy needs a classification dataset; use val_loss" in message


def test_objectives_listed_twice_or_empty() -> None:
    assert "an objective is listed twice" in spec_error(spec(objectives=["val_loss", "val_loss"]))
    assert "list at least one objective" in spec_error(spec(objectives=[]))


def test_grid_sampler_needs_a_finite_grid() -> None:
    message = spec_error(spec(sampler="grid", search={"lr": {"type": "float", "low": 0.1, "high": 1.0}}))
    assert "search.lr: the grid sampler needs a finite grid; give 'step'" in message


def test_bad_study_name() -> None:
    assert "name: " in spec_error({"name": "my study!"})


def test_non_mapping_yaml_is_rejected(tmp_path: Path) -> None:
    for text, kind in (("- a\n- b\n", "list"), ("just text\n", "str")):
        path = tmp_path / "s.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(SpecError, match=f"a study spec must be a YAML mapping.*got {kind}"):
            load_spec(path)


def test_empty_yaml_says_what_to_write(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"empty.yaml: the spec is empty; give at least 'name: my-study'"):
        load_spec(path)


def test_search_on_unknown_field_names_the_search_key(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"search\.colour: 'colour' is not a searchable field; choose one of: "):
        parse_spec({"name": "s", "search": {"colour": ["red", "blue"]}})


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: a\nmodel:\n  depth: 2\n  width: [8, 8\ntraining: {}\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: invalid YAML at line ")
    line = int(message.split("at line ")[1].split(",")[0])
    assert 4 <= line <= 5


@pytest.mark.parametrize(
    ("text", "where", "key", "first"),
    [
        ("name: a\ndataset: {name: digits}\nname: b\n", "line 3, column 1", "name", 1),
        ("name: a\nmodel:\n  width: 4\n  depth: 1\n  width: 8\n", "line 5, column 3", "width", 3),
        ("name: a\nmodel: {width: 4, width: 8}\n", "line 2, column 19", "width", 2),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str, where: str, key: str, first: int) -> None:
    # Plain YAML keeps the last value and drops the other without a word.
    path = tmp_path / "twice.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message == f"{path}: invalid YAML at {where}: duplicate key '{key}' (first at line {first}); keep one"


def test_a_merged_key_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("name: a\nmodel:\n  <<: {width: 4, depth: 2}\n  width: 8\n", encoding="utf-8")
    loaded = load_spec(path)
    assert (loaded.model.width, loaded.model.depth) == (8, 2)


@pytest.mark.parametrize(
    ("text", "where", "key", "kind"),
    [
        ("name: a\ndataset: {name: digits}\nsweep: {true: [1, 2]}\n", "line 3, column 9", "true", "a boolean"),
        ("name: a\nmodel:\n  2: 3\n", "line 3, column 3", "2", "a number"),
        ("name: a\nmodel:\n  ~: 3\n", "line 3, column 3", "~", "null"),
        ("name: a\nsampler: {name: tpe, options: {2026-01-01: 1}}\n", "line 2, column 32", "2026-01-01", "a date"),
    ],
)
def test_a_key_that_yaml_reads_as_a_value_is_named_as_written(
    tmp_path: Path, text: str, where: str, key: str, kind: str
) -> None:
    # pydantic named ``true`` by its coerced value: "sweep.1: Input should be a valid string".
    path = tmp_path / "keys.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == (
        f"{path} at {where}: YAML reads the key {key} as {kind}, and every spec key is a name; "
        f"quote it ('{key}') if it is meant as one"
    )


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81name")
    with pytest.raises(SpecError, match="not a UTF-8 text file"):
        load_spec(path)


def test_a_folder_given_as_the_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=f"^{re.escape(str(tmp_path))} is a folder, not a spec file; give the path"):
        load_spec(tmp_path)


def test_a_spec_file_that_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads any file, so the refusal is simulated: it was a PermissionError traceback.
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\n", encoding="utf-8")

    def refuse(self: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(SpecError, match=r"cannot read spec file .*spec\.yaml \(Permission denied\); check its"):
        load_spec(path)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    assert str(info.value).startswith(f"spec file not found: {missing}")
    assert isinstance(info.value, UserError)


def test_error_reports_the_first_problem_and_counts_the_rest() -> None:
    message = spec_error(spec(training={"epochs": 0, "lr": -1, "batch_size": 0}))
    assert message.endswith("(and 2 more problems)")
    # Two problems, each a value that fits neither branch of its field's union.
    message = spec_error(spec(model={"width": "wide"}, training={"stack_trials": "many"}))
    assert message.startswith("s.yaml: model.width: ") and message.endswith(" (and 1 more problem)")


def test_the_readme_spec_shows_the_defaults() -> None:
    # The README's annotated spec is read as the defaults: every value it shows must be one.
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split("## Study specs", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)
    assert parse_spec(data) == parse_spec({"name": data["name"], "search": data["search"]})
