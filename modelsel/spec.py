"""Study specs: the YAML a user writes, validated with pydantic.

A spec names a dataset, fixed model and training values, an optional search space
(Optuna distributions over any dataset, model or training field) or sweep grid, the
cross-validation scheme, sampler, pruner, budget, objectives and storage. Unknown
keys are errors. :func:`load_spec` turns every validation problem into one
:class:`~modelsel.errors.SpecError` line that names the field and the fix.
"""

from __future__ import annotations

import functools
import json
import math
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from modelsel.errors import SpecError

Activation = Literal["relu", "leaky_relu", "elu", "gelu", "tanh", "sigmoid"]
Init = Literal["default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"]
Optimizer = Literal["sgd", "momentum", "adam", "adamw"]
Task = Literal["classification", "regression"]
Objective = Literal["val_accuracy", "val_loss", "n_params", "fit_seconds"]
SamplerName = Literal["tpe", "random", "gp", "cmaes", "grid", "nsga2"]
PrunerName = Literal["none", "median", "percentile", "successive_halving", "hyperband", "fold_paired"]
Scalar = bool | int | float | str | None

#: Direction Optuna optimizes each objective in.
OBJECTIVE_DIRECTIONS: dict[str, str] = {
    "val_accuracy": "maximize",
    "val_loss": "minimize",
    "n_params": "minimize",
    "fit_seconds": "minimize",
}


def _leaf_types(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (``int | list[int]``: int and list[int]), else itself."""
    if get_origin(annotation) is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(t for arg in get_args(annotation) for t in _leaf_types(arg))
    return (annotation,)


@functools.cache
def _number_kind(annotation: Any) -> str | None:
    """``an integer`` or ``a number`` for an annotation that takes numbers but no booleans,
    else None."""
    leaves = _leaf_types(annotation)
    if bool in leaves or (int not in leaves and float not in leaves):
        return None
    return "a number" if float in leaves else "an integer"


def _whole_numbers_only(annotation: Any) -> bool:
    """Whether a field of this annotation takes whole numbers only (``int``, ``int | list[int]``)."""
    return _number_kind(annotation) == "an integer"


def _bool_for_number(annotation: Any, value: Any) -> str | None:
    """Why ``value`` (a boolean, or a list holding one) does not fit a numeric field of
    this annotation, or None."""
    kind = _number_kind(annotation)
    if kind is not None and isinstance(value, bool):
        return f"expected {kind}, got {str(value).lower()}"
    if isinstance(value, list) and any(isinstance(v, bool) for v in value):
        for leaf in _leaf_types(annotation):
            item_kind = _number_kind(get_args(leaf)[0]) if get_origin(leaf) is list else None
            if item_kind is not None:
                return f"expected {item_kind} or a list of them, got a list holding a boolean (true/false)"
    return None


def value_key(value: Any) -> str:
    """A comparable text key for a grid value (numpy scalars and 0 vs 0.0 agree)."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, str)):
        value = value.item()
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(float(value))
    return json.dumps(value, sort_keys=True, default=str)


def params_key(params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """A comparable key for a trial's parameters (a grid cell; with the seed, a trial of it)."""
    return tuple(sorted((name, value_key(value)) for name, value in params.items()))


#: The trial parameter of a sweep's repeats (``sweep.repeats`` > 1): the seed of each.
SWEEP_SEED_PARAM = "seed"

#: The widest hidden layer a spec may ask for (784 inputs x 65,536 units: 51M weights a model).
MAX_WIDTH = 65_536


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_number(cls, data: Any) -> Any:
        # pydantic reads true as 1 in an int or float field (``width: true`` would be width 1).
        if isinstance(data, Mapping):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                problem = _bool_for_number(field.annotation, value) if field is not None else None
                if problem:
                    raise PydanticCustomError(_BOOL_ERROR, "{problem}", {"field": name, "problem": problem})
        return data


#: Error type of a boolean in a numeric field; the message names the field via ``ctx``.
_BOOL_ERROR = "bool_for_number"


# --------------------------------------------------------------------------- model


class ModelSpec(_Section):
    """The MLP: ``depth`` hidden layers of ``width`` units between input and output."""

    depth: int = Field(1, ge=0, le=64, description="number of hidden layers (0: a linear model)")
    width: int | list[int] = Field(64, description="units per hidden layer, or one value per layer")
    activation: Activation = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    batch_norm: bool = False
    residual: bool = Field(False, description="skip links between equal-width hidden layers")
    init: Init = "default"

    @field_validator("width")
    @classmethod
    def _positive_width(cls, width: int | list[int]) -> int | list[int]:
        widths = width if isinstance(width, list) else [width]
        if any(not 1 <= w <= MAX_WIDTH for w in widths):
            # A width of 10^12 passed and failed to allocate inside the first trial.
            raise ValueError(f"every width must be from 1 to {MAX_WIDTH}")
        return width

    @model_validator(mode="after")
    def _width_matches_depth(self) -> ModelSpec:
        if isinstance(self.width, list) and len(self.width) != self.depth:
            raise ValueError(
                f"width lists {len(self.width)} layers but depth is {self.depth}; "
                "give one width per hidden layer or a single int"
            )
        return self

    def hidden_widths(self) -> tuple[int, ...]:
        """Width of each hidden layer, in order."""
        if isinstance(self.width, list):
            return tuple(self.width)
        return (self.width,) * self.depth

    @property
    def normalizes_batches(self) -> bool:
        """Whether the model has batch norm (only hidden layers have it): it then trains on
        batches of 2 samples or more."""
        return self.batch_norm and self.depth > 0


# ------------------------------------------------------------------------ training


class GradClipSpec(_Section):
    """Gradient clipping: by total norm or element-wise by value."""

    kind: Literal["norm", "value"] = "norm"
    threshold: float = Field(gt=0.0)


class EarlyStoppingSpec(_Section):
    """Stop a fold when validation loss has not improved by ``min_delta`` for ``patience`` epochs."""

    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class TrainingSpec(_Section):
    """How each model is trained."""

    epochs: int = Field(20, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1)
    optimizer: Optimizer = "adam"
    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="used by optimizer 'momentum'")
    weight_decay: float = Field(0.0, ge=0.0, description="L2 penalty through the optimizer")
    l1: float = Field(0.0, ge=0.0, description="explicit L1 penalty on weights")
    grad_clip: GradClipSpec | None = None
    early_stopping: EarlyStoppingSpec | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["auto", "sequential", "stacked"] = Field(
        "auto", description="train the fold models one by one or as one stacked model"
    )
    train_metrics: Literal["running", "full"] = Field(
        "running",
        description="per-epoch train loss: running mean over batches, or a full eval pass",
    )
    stack_trials: int | Literal["auto"] = Field(
        "auto",
        description=(
            "sweeps and grid searches: train up to this many trials that share an architecture "
            "as one stacked model (auto: 8 on CUDA; on CPU 8 when every cell is a small model "
            "and there is no dropout and no pruner, else 1)"
        ),
    )

    @field_validator("stack_trials")
    @classmethod
    def _positive_stack(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("stack_trials must be 'auto' or a whole number from 1 to 256")
        return value

    @field_validator("grad_clip", mode="before")
    @classmethod
    def _clip_shorthand(cls, value: Any) -> Any:
        # ``grad_clip: 1.0`` means clipping the total norm at 1.0 (searchable as a float).
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None if value == 0 else {"kind": "norm", "threshold": value}
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(
                f"expected a number (clip the total norm at it), {{kind: value, threshold: 0.5}} or null, "
                f"got {_yaml_text(value)}"
            )
        return value

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _early_stopping_shorthand(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return {"patience": value}
        return value


# ------------------------------------------------------------------------- datasets


class _DatasetBase(_Section):
    train_size: int | float | None = Field(
        None, description="subsample the training split: a count or a fraction (nested, stratified)"
    )
    standardize: bool | None = Field(
        None, description="standardize features with training-fold statistics (dataset default if unset)"
    )

    @field_validator("train_size")
    @classmethod
    def _valid_train_size(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return None
        if isinstance(value, float) and not value.is_integer():
            if not 0.0 < value <= 1.0:
                raise ValueError("a fractional train_size must be in (0, 1]")
            return value
        if isinstance(value, float) and value == 1.0:
            return value
        if int(value) < 2:
            raise ValueError("train_size must be at least 2 samples (or a fraction in (0, 1])")
        return int(value)


class DigitsSpec(_DatasetBase):
    """scikit-learn's embedded 8×8 ``digits`` (1,797 images, 10 classes)."""

    name: Literal["digits"]
    test_size: float = Field(0.2, gt=0.0, lt=1.0)


class FashionMNISTSpec(_DatasetBase):
    """Fashion-MNIST through torchvision: 60k train / 10k test 28×28 images."""

    name: Literal["fashion-mnist"]
    root: str | None = Field(None, description="data root; else $MODELSEL_DATA_ROOT, else a user cache")
    download: bool = False


class PolynomialSpec(_DatasetBase):
    """D2L's synthetic polynomial regression problem."""

    name: Literal["polynomial"]
    max_degree: int = Field(20, ge=1, le=40, description="number of generated features x^i/i!")
    degree: int | None = Field(None, ge=0, description="model uses features of degree <= d")
    n_train: int = Field(100, ge=2)
    n_test: int = Field(100, ge=1)
    noise: float = Field(0.1, ge=0.0)

    @model_validator(mode="after")
    def _degree_in_range(self) -> PolynomialSpec:
        if self.degree is not None and self.degree > self.max_degree - 1:
            raise ValueError(
                f"degree {self.degree} needs {self.degree + 1} features but max_degree is "
                f"{self.max_degree}; raise max_degree or lower degree"
            )
        return self


class CSVSpec(_DatasetBase):
    """A user's table: numeric and categorical columns plus one target column."""

    name: Literal["csv"]
    path: str
    target: str
    task: Task | None = Field(None, description="inferred from the target column when unset")
    test_size: float = Field(0.2, gt=0.0, lt=1.0)


class SyntheticClassificationSpec(_DatasetBase):
    """scikit-learn's ``make_classification``, for fast tests."""

    name: Literal["synthetic-classification"]
    n_samples: int = Field(1000, ge=10)
    n_features: int = Field(20, ge=1)
    n_informative: int = Field(10, ge=1)
    n_redundant: int = Field(2, ge=0)
    n_classes: int = Field(2, ge=2)
    n_clusters_per_class: int = Field(2, ge=1)
    class_sep: float = Field(1.0, gt=0.0)
    flip_y: float = Field(0.01, ge=0.0, le=1.0)
    test_size: float = Field(0.2, gt=0.0, lt=1.0)


DatasetSpec = Annotated[
    DigitsSpec | FashionMNISTSpec | PolynomialSpec | CSVSpec | SyntheticClassificationSpec,
    Field(discriminator="name"),
]

#: Task of every dataset whose task does not depend on its file.
DATASET_TASKS: dict[str, Task] = {
    "digits": "classification",
    "fashion-mnist": "classification",
    "polynomial": "regression",
    "synthetic-classification": "classification",
}


# ------------------------------------------------------------------- search space


class IntDistribution(_Section):
    """A searched integer: ``low``..``high`` inclusive, on a log scale or in steps of ``step``."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False


class FloatDistribution(_Section):
    """A searched float: ``low``..``high``, on a log scale or in steps of ``step``."""

    type: Literal["float"]
    low: float
    high: float
    step: float | None = Field(None, gt=0.0)
    log: bool = False


class CategoricalDistribution(_Section):
    """A searched choice among ``choices``."""

    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)


Distribution = Annotated[
    IntDistribution | FloatDistribution | CategoricalDistribution,
    Field(discriminator="type"),
]


def _normalize_distribution(value: Any) -> Any:
    # Shorthands: ``type: log`` is a log-uniform float; a bare list is a categorical.
    if isinstance(value, list):
        return {"type": "categorical", "choices": value}
    if isinstance(value, Mapping) and value.get("type") == "log":
        return {**value, "type": "float", "log": True}
    return value


def _axis_values(values: Any) -> Any:
    # Runs per axis, so that an error names the axis (``sweep.width``).
    if not isinstance(values, list):
        text = _yaml_text(values)
        raise ValueError(f"expected a list of values, got {text}; write [{text}] for one value")
    if not values:
        raise ValueError("the axis lists no values; give at least one")
    for value in values:
        if isinstance(value, (list, Mapping)):
            where = (
                "; a setting written as a mapping (e.g. grad_clip: {kind: value, threshold: 0.5}) goes under "
                "training in a study of its own"
                if isinstance(value, Mapping)
                else ""
            )
            raise ValueError(f"a sweep value is a number, a string, true/false or null, not {value!r}{where}")
    return values


class SweepSpec(_Section):
    """A grid over one or two axes, each with explicit values; every cell once per repeat."""

    axes: dict[str, Annotated[list[Scalar], BeforeValidator(_axis_values)]]
    repeats: int = Field(1, ge=1, le=100, description="seeds per cell, for error bars")

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, value: Any) -> Any:
        # ``sweep: {width: [...], repeats: 3}`` is accepted as well as ``{axes: {...}}``.
        if isinstance(value, Mapping) and "axes" not in value:
            value = dict(value)
            repeats = value.pop("repeats", 1)
            return {"axes": value, "repeats": repeats}
        return value

    @field_validator("axes")
    @classmethod
    def _one_or_two_axes(cls, axes: dict[str, list[Scalar]]) -> dict[str, list[Scalar]]:
        if not axes:
            raise ValueError("a sweep has one or two axes, got none; give one such as width: [4, 16, 64]")
        if len(axes) > 2:
            raise ValueError(f"a sweep has one or two axes, got {len(axes)}; give a list of grids to sweep more")
        return axes


def _sweep_form(value: Any) -> str | None:
    """The tag of the sweep union's branch that fits ``value``: one grid or a list of grids."""
    if isinstance(value, list):
        return "sweep-grids"
    if isinstance(value, (Mapping, SweepSpec)):
        return "sweep-grid"
    return None


# ------------------------------------------------------- cv, sampler, pruner, budget


class CVSpec(_Section):
    """The cross-validation split of the training data (scikit-learn's (Stratified)KFold)."""

    folds: int = Field(5, ge=2, le=100)
    stratified: bool | None = Field(None, description="default: stratified for classification")
    shuffle: bool = True


class SamplerSpec(_Section):
    """An Optuna sampler by name, with its constructor's options (seeded from the spec's seed)."""

    name: SamplerName = "tpe"
    options: dict[str, Any] = Field(default_factory=dict)


class PrunerSpec(_Section):
    """An Optuna pruner (or modelsel's ``fold_paired``) by name, with its constructor's options."""

    name: PrunerName = "none"
    options: dict[str, Any] = Field(default_factory=dict)


class BudgetSpec(_Section):
    """When a run stops: finished trials, seconds, or fold-epochs trained (whichever comes first)."""

    n_trials: int | None = Field(20, ge=1, description="total finished trials (complete + pruned)")
    timeout: float | None = Field(None, gt=0.0, description="seconds for this run")
    fold_epochs: int | None = Field(
        None,
        ge=1,
        description=(
            "compute cap: epochs trained × folds, summed over the study's trials; a trial starts "
            "only while one at its longest still fits"
        ),
    )


class RegimeSpec(_Section):
    """Thresholds of the regime labels (underfit / good / overfit / diverged).

    Errors are the error rate (1 − accuracy) for classification and the MSE for
    regression; ``*_error`` and ``overfit_gap`` are shares of the *baseline error*, the
    training-split error of a trivial predictor (majority class, or the mean target).
    The rule is written out in the README ("Regimes").
    """

    underfit_error: float = Field(
        0.25, gt=0.0, description="train error / baseline error at or above which a trial underfits"
    )
    overfit_gap: float = Field(
        0.05, gt=0.0, description="(val error - train error) / baseline error at or above which a trial overfits"
    )
    val_rise: float = Field(
        0.2, gt=0.0, description="val loss ending this share above its minimum while train loss falls: overfit"
    )
    diverge_ratio: float = Field(
        1.0, gt=0.0, description="last-epoch train loss above this multiple of the first epoch's: diverged"
    )
    tolerance_se: float = Field(
        1.0, ge=0.0, description="sweep: within this many standard errors of the best cell's val error is good"
    )
    tolerance_rel: float = Field(
        0.05, ge=0.0, description="sweep: within this share of the best cell's val error is good"
    )


def _name_shorthand(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


# ---------------------------------------------------------------------- the study

Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
_SEED = TypeAdapter(Seed)


class StudySpec(_Section):
    """A whole study: what to train, what to vary, how to score and where to store it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=100)
    description: str = ""
    seed: Seed = 0
    dataset: DatasetSpec = Field(default_factory=lambda: DigitsSpec(name="digits"))
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    search: dict[str, Distribution] = Field(default_factory=dict)
    sweep: (
        Annotated[
            Annotated[SweepSpec, Tag("sweep-grid")] | Annotated[list[SweepSpec], Tag("sweep-grids")],
            Discriminator(
                _sweep_form,
                custom_error_type="sweep_form",
                custom_error_message="give a mapping of axes to lists of values, or a list of such grids",
            ),
        ]
        | None
    ) = Field(None, description="a grid over one or two axes, or a list of grids (one study per grid)")
    regimes: RegimeSpec = Field(default_factory=RegimeSpec)
    cv: CVSpec = Field(default_factory=CVSpec)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    objectives: list[Objective] | None = Field(
        None, description="default: val_accuracy for classification, val_loss for regression"
    )
    storage: str | None = Field(None, description="Optuna storage URL; default SQLite under the output folder")

    @field_validator("search", mode="before")
    @classmethod
    def _search_shorthands(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: _normalize_distribution(dist) for key, dist in value.items()}
        return value

    @field_validator("storage")
    @classmethod
    def _storage_given(cls, value: str | None) -> str | None:
        # An empty URL would silently mean the default storage, whose folder is not created for it.
        if value is not None and not value.strip():
            raise ValueError(
                "the storage URL is empty; give one such as sqlite:///path/to/study.db, or leave 'storage' out"
            )
        return value

    @field_validator("sampler", "pruner", mode="before")
    @classmethod
    def _string_shorthand(cls, value: Any) -> Any:
        return _name_shorthand(value)

    @field_validator("objectives")
    @classmethod
    def _distinct_objectives(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("list at least one objective, or leave objectives out")
            if len(set(value)) != len(value):
                raise ValueError("an objective is listed twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        problem = batch_norm_batch_problem(self.model, self.training)
        if problem:
            raise ValueError(problem)
        for key, dist in self.search.items():
            _check_distribution(self, key, dist)
        _one_key_per_field(self, list(self.search), where="search")
        if self.sweep is not None:
            if self.search:
                raise ValueError("give either 'search' or 'sweep', not both")
            if self.sampler.name not in ("grid", "tpe") or self.sampler.options:
                raise ValueError("a sweep runs on the grid sampler; leave 'sampler' out")
            _check_grids(self)
        elif self.sampler.name == "grid":
            for key, dist in self.search.items():
                if isinstance(dist, FloatDistribution) and dist.step is None:
                    raise ValueError(
                        f"search.{key}: the grid sampler needs a finite grid; give 'step' "
                        "or use a categorical/sweep"
                    )
        _check_momentum_is_used(self)
        fold_epochs = self.budget.fold_epochs
        if fold_epochs is not None:
            short = fold_epochs_shortfall(self, fold_epochs, name=f"budget.fold_epochs ({fold_epochs})")
            if short:
                raise ValueError(f"{short}, or leave it out")
        objectives = self.objectives or []
        if len(objectives) > 1 and self.pruner.name != "none":
            raise ValueError(
                "pruning works with one objective only; set 'pruner: none' or list one objective"
            )
        if objectives and objectives[0] in ("fit_seconds", "n_params") and self.pruner.name != "none":
            # Neither is known before a trial ends, so no curve could be reported to the pruner.
            raise ValueError(
                f"pruning needs a validation objective; {objectives[0]} has no per-epoch curve: "
                "set 'pruner: none' or use val_loss or val_accuracy"
            )
        task = self.task
        if task == "regression" and "val_accuracy" in objectives:
            raise ValueError("val_accuracy needs a classification dataset; use val_loss")
        return self

    @property
    def task(self) -> Task | None:
        """The dataset's task where known without reading files (CSV may need the file)."""
        if isinstance(self.dataset, CSVSpec):
            return self.dataset.task
        return DATASET_TASKS[self.dataset.name]

    def resolved_objectives(self, task: Task) -> list[str]:
        """Objectives to optimize, with the default for ``task`` filled in."""
        if self.objectives:
            return list(self.objectives)
        return ["val_accuracy" if task == "classification" else "val_loss"]

    def sweep_list(self) -> list[SweepSpec]:
        """The sweep's grids: none, one, or several (a list of grids runs one study per grid)."""
        if self.sweep is None:
            return []
        return list(self.sweep) if isinstance(self.sweep, list) else [self.sweep]

    def to_json(self) -> str:
        """Canonical JSON of the spec (stored with the study)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


# ---------------------------------------------------------------- field lookups

_SECTIONS = ("dataset", "model", "training")
#: Fields that identify a dataset or a run rather than a hyperparameter.
_NOT_SEARCHABLE = {"name", "path", "root", "download", "target", "task", "device"}
#: Fields that a search or sweep could vary but must not, and why.
_FIXED_FOR_THE_STUDY = {
    "test_size": "it sets the held-out test split, which every trial must share (one trial's test rows would "
    "train another, and the selection would compare scores on different data)",
    "engine": "it is a run setting (how the folds train, with the same results), not a hyperparameter; "
    "set training.engine",
    "stack_trials": "it is a run setting (how many trials train at once), not a hyperparameter; "
    "set training.stack_trials",
    "train_metrics": "it sets how the training loss is measured, not how the model trains; "
    "set training.train_metrics",
}


def searchable_fields(spec: StudySpec) -> dict[str, str]:
    """Map each searchable field name to the spec section holding it."""
    fields: dict[str, str] = {}
    for section in _SECTIONS:
        for field in type(getattr(spec, section)).model_fields:
            if field not in _NOT_SEARCHABLE and field not in _FIXED_FOR_THE_STUDY:
                fields[field] = section
    return fields


def resolve_field(spec: StudySpec, key: str) -> tuple[str, str]:
    """Resolve a search/sweep key (``lr`` or ``training.lr``) to ``(section, field)``.

    Raises
    ------
    ValueError
        When the key names no searchable field.
    """
    fields = searchable_fields(spec)
    if "." in key:
        section, _, field = key.partition(".")
        if section in _SECTIONS and fields.get(field) == section:
            return section, field
    elif key in fields:
        return fields[key], key
    if key == "seed":
        return "study", "seed"
    why = _FIXED_FOR_THE_STUDY.get(key.rpartition(".")[2])
    if why is not None:
        raise ValueError(f"'{key}' cannot be searched or swept: {why}")
    known = ", ".join(sorted(fields))
    raise ValueError(f"'{key}' is not a searchable field; choose one of: {known}")


def max_trial_epochs(spec: StudySpec) -> int:
    """The most epochs one trial of ``spec`` can train: the largest searched or swept
    ``training.epochs``, and ``training.epochs`` itself only where a trial trains it (the
    search, or a grid of a sweep, does not vary it)."""
    spaces: list[dict[str, Any]] = [dict(grid.axes) for grid in spec.sweep_list()] or [dict(spec.search)]
    longest = 0
    for space in spaces:
        epochs = [values for key, values in space.items() if resolve_field(spec, key) == ("training", "epochs")]
        if not epochs:
            longest = max(longest, spec.training.epochs)
            continue
        values = epochs[0]
        if isinstance(values, (IntDistribution, FloatDistribution)):
            values = [values.high]
        elif isinstance(values, CategoricalDistribution):
            values = values.choices
        # Every value was validated as a training.epochs (None is not one), so each converts to an int.
        longest = max([longest, *(int(v) for v in values if v is not None)])
    return longest


def trial_fold_epochs_cap(spec: StudySpec) -> int:
    """Fold-epochs of one trial of ``spec`` at its longest: the unit of ``budget.fold_epochs``."""
    return max_trial_epochs(spec) * spec.cv.folds


def fold_epochs_shortfall(spec: StudySpec, fold_epochs: int, *, name: str) -> str | None:
    """Why a fold-epoch cap of ``fold_epochs`` (called ``name`` in the message) cannot start
    a single trial of ``spec``; None when one at its longest fits."""
    longest = trial_fold_epochs_cap(spec)
    if fold_epochs >= longest:
        return None
    return (
        f"{name} is less than one trial at its longest ({max_trial_epochs(spec)} epochs × "
        f"{spec.cv.folds} folds = {longest}); give at least {longest}"
    )


def with_field(spec: StudySpec, key: str, value: Any) -> StudySpec:
    """Return ``spec`` with one searchable field replaced, validated.

    Raises
    ------
    ValueError
        When the key is unknown or the value is invalid for that field.
    """
    return with_params(spec, {key: value})


def with_params(spec: StudySpec, params: Mapping[str, Any]) -> StudySpec:
    """Return ``spec`` with several searchable fields replaced, validated together.

    Raises
    ------
    ValueError
        When a key is unknown or a value is invalid for its field.
    """
    updates: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    seed = spec.seed
    for key, value in params.items():
        section, field = resolve_field(spec, key)
        if section == "study":
            seed = _validated_seed(value)
        else:
            updates[section][field] = value
    sections: dict[str, Any] = {"seed": seed}
    for section, fields in updates.items():
        if fields:
            current = getattr(spec, section)
            merged = {**current.model_dump(), **fields}
            try:
                sections[section] = type(current).model_validate(merged)
            except ValidationError as exc:
                raise ValueError(_first_error_text(exc, prefix=section)) from None
    model, training = sections.get("model", spec.model), sections.get("training", spec.training)
    problem = batch_norm_batch_problem(model, training)
    if problem:
        raise ValueError(problem)
    return spec.model_copy(update=sections)


def _validated_seed(value: Any) -> int:
    problem = _bool_for_number(int, value)
    if problem:
        raise ValueError(f"seed: {problem}")
    try:
        return _SEED.validate_python(value)
    except ValidationError as exc:
        raise ValueError(_first_error_text(exc, prefix="seed")) from None


def batch_norm_batch_problem(model: ModelSpec, training: TrainingSpec) -> str | None:
    """Why ``model`` cannot train with ``training``'s batches (batch norm normalizes each
    unit over a batch, so it needs two samples or more), or None."""
    if model.normalizes_batches and training.batch_size < 2:
        return (
            f"model.batch_norm needs batches of 2 samples or more (training.batch_size is "
            f"{training.batch_size}); raise batch_size or set batch_norm: false"
        )
    return None


def _field_name(section: str, field: str) -> str:
    """``training.lr``, or ``seed`` for the study's own field."""
    return field if section == "study" else f"{section}.{field}"


def _one_key_per_field(spec: StudySpec, keys: list[str], *, where: str) -> dict[tuple[str, str], str]:
    """Refuse two of ``keys`` that name one field (``lr`` and ``training.lr``), or an unknown
    key; return each field (section, name) with the key that names it."""
    seen: dict[tuple[str, str], str] = {}
    for key in keys:
        try:
            resolved = resolve_field(spec, key)
        except ValueError as exc:
            raise ValueError(f"{where}.{key}: {exc}") from None
        if resolved in seen:
            raise ValueError(
                f"{where}.{key} and {where}.{seen[resolved]} name the same field {_field_name(*resolved)}; keep one"
            )
        seen[resolved] = key
    return seen


def _check_grids(spec: StudySpec) -> None:
    """Refuse sweep grids that name a field twice, sweep the same fields as another grid,
    or hold a value the field refuses or two values that are one once validated."""
    grids = spec.sweep_list()
    if not grids:
        raise ValueError("sweep: list at least one grid, or leave 'sweep' out")
    wheres = _grid_wheres(spec)
    fields = []
    for grid, where in zip(grids, wheres, strict=True):
        axes = _one_key_per_field(spec, list(grid.axes), where=where)
        seeded = axes.get(("study", "seed"))
        if seeded is not None and grid.repeats > 1:
            # The repeats' seeds would silently replace the listed ones.
            raise ValueError(f"{where}.{seeded} and {where}.repeats both set the seeds; keep one")
        fields.append(frozenset(axes))
    if len(set(fields)) != len(grids):
        raise ValueError("sweep: two grids sweep the same axes; merge them into one grid")
    for grid, where in zip(grids, wheres, strict=True):
        for axis, values in grid.axes.items():
            _check_values(spec, axis, values, where=f"{where}.{axis}", repeats=f"sweep axis '{axis}' repeats a value")


def _grid_wheres(spec: StudySpec) -> list[str]:
    """Where each grid of the sweep is in the spec, as messages name it: ``sweep`` for one
    grid, ``sweep.0``, ``sweep.1``, … for a list of grids."""
    grids = spec.sweep_list()
    return [f"sweep.{i}" if isinstance(spec.sweep, list) else "sweep" for i in range(len(grids))]


def _check_momentum_is_used(spec: StudySpec) -> None:
    """Refuse a searched or swept ``momentum`` that no trial uses: only optimizer
    'momentum' reads it, so the search (or each grid of a sweep) that varies it must
    train with that optimizer, fixed or among its choices."""
    spaces: list[tuple[str, dict[str, Any]]] = [
        (where, dict(grid.axes)) for grid, where in zip(spec.sweep_list(), _grid_wheres(spec), strict=True)
    ]
    for where, space in spaces or [("search", dict(spec.search))]:
        fields = {resolve_field(spec, key): (key, values) for key, values in space.items()}
        if ("training", "momentum") not in fields:
            continue
        searched = fields.get(("training", "optimizer"))
        optimizers: list[Any] = [spec.training.optimizer]
        if searched is not None:
            values = searched[1]
            optimizers = list(values.choices if isinstance(values, CategoricalDistribution) else values)
        if "momentum" not in optimizers:
            key = fields[("training", "momentum")][0]
            named = " or ".join(map(str, optimizers))
            raise ValueError(
                f"{where}.{key}: the optimizer is {named}, which does not use momentum (only optimizer: momentum "
                f"does), so every value would train alike; "
                + (
                    f"add momentum to the choices of {where}.{searched[0]}"
                    if searched is not None
                    else f"set training.optimizer: momentum, or {_vary_it_too(where)}"
                )
            )


def _vary_it_too(where: str) -> str:
    """``search it too``, ``sweep it too``, or for a grid of a list ``sweep it in sweep.1 too``."""
    verb = where.partition(".")[0]
    return f"{verb} it too" if verb == where else f"{verb} it in {where} too"


def _check_distribution(spec: StudySpec, key: str, dist: Any) -> None:
    try:
        section, field = resolve_field(spec, key)
    except ValueError as exc:
        raise ValueError(f"search.{key}: {exc}") from None
    model = type(spec) if section == "study" else type(getattr(spec, section))
    if isinstance(dist, FloatDistribution) and _whole_numbers_only(model.model_fields[field].annotation):
        # Its draws would be floats such as 7.3, which the field refuses in every trial.
        log = " (with log: true for a log scale)" if dist.log else ""
        raise ValueError(
            f"search.{key}: {_field_name(section, field)} takes whole numbers, not a float distribution; "
            f"use type: int{log}"
        )
    if isinstance(dist, CategoricalDistribution):
        endpoints: list[Any] = list(dist.choices)
    else:
        if dist.low > dist.high:
            raise ValueError(f"search.{key}: low ({dist.low}) is above high ({dist.high}); swap them")
        if dist.log and dist.low <= 0:
            raise ValueError(f"search.{key}: a log distribution needs low > 0 (got {dist.low})")
        if dist.log and (isinstance(dist, IntDistribution) and dist.step != 1):
            raise ValueError(f"search.{key}: a log int distribution takes no step")
        if isinstance(dist, FloatDistribution) and dist.log and dist.step is not None:
            raise ValueError(f"search.{key}: a log float distribution takes no step")
        if dist.step is not None:
            steps = (dist.high - dist.low) / dist.step
            if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
                # Optuna would warn and quietly search up to the last step below high instead.
                below = dist.low + math.floor(steps) * dist.step
                raise ValueError(
                    f"search.{key}: high - low ({_number(dist.high - dist.low)}) is not a multiple of step "
                    f"{_number(dist.step)}; use high: {_number(below)} or high: {_number(below + dist.step)}"
                )
        endpoints = [dist.low, dist.high]
    _check_values(
        spec,
        key,
        endpoints,
        where=f"search.{key}",
        invalid="value {value} is invalid: {problem}",
        repeats="the choices repeat a value" if isinstance(dist, CategoricalDistribution) else None,
    )


def value_text(value: Any, *, digits: int = 4) -> str:
    """A parameter value for a summary, a table or a plot: a float to ``digits`` significant
    digits, and still a float when it is whole and not 0 (``train_size`` 1.0, the whole
    split, is not the count 1)."""
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.{digits}g}"
    return f"{text}.0" if value != 0 and text.lstrip("-").isdigit() else text


def _number(value: float) -> str:
    """A search-space number as a spec would write it (no float noise such as 0.30000000000000004)."""
    return f"{value:.10g}"


def _check_values(
    spec: StudySpec, key: str, values: list[Any], *, where: str, invalid: str = "{problem}", repeats: str | None
) -> None:
    """Validate each of ``values`` as the field ``key`` names, and refuse two that are one
    once validated (unless ``repeats`` is None).

    Raises
    ------
    ValueError
        ``where``, then ``invalid`` filled with the value and its problem, or ``repeats``
        and which values are one.
    """
    validated = []
    for value in values:
        try:
            validated.append(_validated_value(spec, key, value))
        except ValueError as exc:
            raise ValueError(f"{where}: " + invalid.format(value=repr(value), problem=exc)) from None
    repeat = _repeated_value(values, validated) if repeats else None
    if repeat:
        raise ValueError(f"{where}: {repeats}: {repeat}; keep one")


def _validated_value(spec: StudySpec, key: str, value: Any) -> Any:
    """``value`` as the field that ``key`` names holds it (``4.0`` as a width is 4).

    Raises
    ------
    ValueError
        When the key is unknown or the value is invalid for that field.
    """
    section, field = resolve_field(spec, key)
    updated = with_field(spec, key, value)
    return getattr(updated if section == "study" else getattr(updated, section), field)


def _repeated_value(values: list[Any], validated: list[Any]) -> str | None:
    """How two of ``values`` are one value once validated (``4 and 4.0 are the same value``),
    or None when they all differ."""
    for j, value in enumerate(validated):
        for i in range(j):
            if validated[i] == value:
                first, again = values[i], values[j]
                if type(first) is type(again) and first == again:
                    return f"{_yaml_text(again)} is listed twice"
                return f"{_yaml_text(first)} and {_yaml_text(again)} are the same value"
    return None


def _yaml_text(value: Any) -> str:
    """A scalar as a spec writes it: true, null, 4.0, 'relu'."""
    return json.dumps(value) if isinstance(value, bool) or value is None else repr(value)


# ------------------------------------------------------------------------ loading


def _is_union_tag(part: Any) -> bool:
    """Whether a location part names a branch of a union ('digits', 'int', 'list[int]')."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part)


def _loc_text(loc: tuple[Any, ...]) -> str:
    parts = []
    for i, part in enumerate(loc):
        in_grid = (i >= 1 and loc[i - 1] == "sweep-grid") or (
            i >= 2 and loc[i - 2] == "sweep-grids" and isinstance(loc[i - 1], int)
        )
        # A flat sweep names its axes right under 'sweep' ('axes' is the long form).
        if not _is_union_tag(part) and not (part == "axes" and in_grid):
            parts.append(str(part))
    return ".".join(parts)


def _other_branch(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two error locations are two branches of one union (they part at union tags)."""
    for x, y in zip(a, b, strict=False):
        if x != y:
            return _is_union_tag(x) and _is_union_tag(y)
    return False


def _problems(errors: list[Any]) -> list[list[Any]]:
    """pydantic's errors grouped by problem: a value that fits no branch of a union is one
    problem, however many branches it failed."""
    groups: list[list[Any]] = []
    for error in errors:
        loc = tuple(error["loc"])
        group = next((g for g in groups if any(_other_branch(loc, tuple(e["loc"])) for e in g)), None)
        if group is None:
            groups.append([error])
        else:
            group.append(error)
    return groups


def _problem_error(group: list[Any]) -> Any:
    """The error that tells most about one problem: the branch that got furthest into the
    value (a list of ints whose second item is not one), or the branches' wishes together
    when none got in."""
    deepest = max(len(e["loc"]) for e in group)
    best = [e for e in group if len(e["loc"]) == deepest]
    if len(best) > 1 and all(str(e["type"]).endswith("_type") for e in best):
        wishes = [str(e["msg"]).removeprefix("Input should be ") for e in best]
        return {**best[0], "msg": f"Input should be {', '.join(wishes[:-1])} or {wishes[-1]}"}
    return best[0]


_UNION_TAGS = {
    "digits",
    "fashion-mnist",
    "polynomial",
    "csv",
    "synthetic-classification",
    "int",
    "float",
    "categorical",
    "bool",
    "str",
    "sweep-grid",
    "sweep-grids",
}


def _first_error_text(exc: ValidationError, *, prefix: str = "") -> str:
    problems = _problems(list(exc.errors()))
    first = _problem_error(problems[0])
    loc = _loc_text(tuple(first["loc"]))
    if first["type"] == _BOOL_ERROR:  # raised by the model, about one of its fields
        loc = ".".join(p for p in (loc, str((first.get("ctx") or {})["field"])) if p)
    where = ".".join(p for p in (prefix, loc) if p)
    # pydantic's class names mean nothing to a spec's author.
    message = str(first["msg"]).removeprefix("Value error, ").split(" or instance of ")[0]
    if first["type"] == "extra_forbidden":
        message = "unknown key" + _allowed_keys_hint(first["loc"], prefix)
    elif first["type"] == "missing":
        message = "required key is missing"
    elif first["type"] == "union_tag_not_found":
        key = str((first.get("ctx") or {}).get("discriminator", "")).strip("'")
        message = f"missing '{key}'" + (f"; give one of: {_TAG_CHOICES[key]}" if key in _TAG_CHOICES else "")
    elif first["type"] == "union_tag_invalid":
        ctx = first.get("ctx") or {}
        key, tag = str(ctx.get("discriminator", "")).strip("'"), ctx.get("tag")
        choices = _TAG_CHOICES.get(key) or str(ctx.get("expected_tags", ""))
        message = f"unknown {key} {tag!r}; give one of: {choices}"
    elif first["type"] in _TYPE_WISHES:
        got = first.get("input")
        shown = "a mapping" if isinstance(got, dict) else "a list" if isinstance(got, list) else _yaml_text(got)
        message = _TYPE_WISHES[first["type"]].format(got=shown, raw=got)
        if isinstance(got, (dict, list)):  # "write [{'a': 1}]" would be Python, not YAML
            message = message.partition(";")[0]
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def _allowed_keys_hint(loc: tuple[Any, ...], prefix: str) -> str:
    parts = ([prefix] if prefix else []) + list(loc[:-1])
    model: type[BaseModel] | None = StudySpec
    for part in parts:
        if part in _DATASET_CLASSES:
            model = _DATASET_CLASSES[part]
            continue
        if part in _DISTRIBUTION_CLASSES:
            model = _DISTRIBUTION_CLASSES[part]
            continue
        # A key of a mapping such as ``search`` (a union tag follows), a list index or a union tag.
        if model is None or isinstance(part, int) or _is_union_tag(part):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return ""
        # The section a field holds, through ``X | None`` and lists of X (a list of sweep grids).
        leaves = [get_args(a)[0] if get_origin(a) is list else a for a in _leaf_types(field.annotation)]
        candidates = {a for a in leaves if isinstance(a, type) and issubclass(a, BaseModel)}
        model = candidates.pop() if len(candidates) == 1 else None
    if model is None:
        return ""
    return "; allowed keys: " + ", ".join(model.model_fields)


#: pydantic's wrong-type errors, said as the spec's author would fix them ({got}: the value given).
_TYPE_WISHES = {
    "dict_type": "expected a mapping (key: value pairs), got {got}",
    "model_type": "expected a mapping (key: value pairs), got {got}",
    "model_attributes_type": "expected a mapping (key: value pairs), got {got}",
    "string_type": "expected text, got {got}; quote it if it is meant as text",
    "list_type": "expected a list, got {got}; write [{raw}] for a list of one",
}

#: What to write for each discriminator key of a tagged union, when it is left out.
_TAG_CHOICES = {
    "name": "digits, fashion-mnist, polynomial, csv, synthetic-classification",
    "type": "int, float, log, categorical (or give a list of choices)",
}

_DISTRIBUTION_CLASSES: dict[str, type[BaseModel]] = {
    "int": IntDistribution,
    "float": FloatDistribution,
    "categorical": CategoricalDistribution,
}

_DATASET_CLASSES: dict[str, type[BaseModel]] = {
    "digits": DigitsSpec,
    "fashion-mnist": FashionMNISTSpec,
    "polynomial": PolynomialSpec,
    "csv": CSVSpec,
    "synthetic-classification": SyntheticClassificationSpec,
}


def parse_spec(data: Any, *, source: str = "spec") -> StudySpec:
    """Validate an already-parsed spec mapping.

    Raises
    ------
    SpecError
        One line naming the field and the problem.
    """
    if data is None:
        raise SpecError(f"{source}: the spec is empty; give at least 'name: my-study' (see studies/quickstart.yaml)")
    if not isinstance(data, Mapping):
        raise SpecError(f"{source}: a study spec must be a YAML mapping (key: value), got {type(data).__name__}")
    try:
        spec = StudySpec.model_validate(dict(data))
    except ValidationError as exc:
        raise SpecError(f"{source}: {_first_error_text(exc)}") from None
    except ValueError as exc:  # raised by helpers outside pydantic's wrapping
        raise SpecError(f"{source}: {exc}") from None
    for value in _floats(spec.model_dump()):
        if not math.isfinite(value):
            raise SpecError(f"{source}: numbers must be finite (found {value})")
    return spec


def load_spec(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> StudySpec:
    """Read and validate a YAML study spec.

    Parameters
    ----------
    path
        The YAML file.
    overrides
        Top-level values that replace the file's (e.g. ``{"seed": 3}`` from the CLI).

    Raises
    ------
    SpecError
        The file is missing, not YAML, or not a valid spec.
    """
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{path} is a folder, not a spec file; give the path of a YAML study spec in it")
    if not path.is_file():
        raise SpecError(
            f"spec file not found: {path} (give the path of a YAML study spec, e.g. studies/quickstart.yaml)"
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SpecLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "cannot parse"
        if isinstance(exc, _KeyNotTextError):  # valid YAML, but not a spec
            raise SpecError(f"{path}{where}: {problem}") from None
        raise SpecError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file; a study spec is YAML text") from None
    except OSError as exc:  # e.g. no permission to read it
        raise SpecError(f"cannot read spec file {path} ({exc.strerror}); check its permissions") from None
    if isinstance(data, Mapping) and overrides:
        data = {**data, **overrides}
    return parse_spec(data, source=str(path))


class _KeyNotTextError(yaml.constructor.ConstructorError):
    """A mapping key that YAML reads as a boolean, number, date or null."""


class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last)
    and a key that YAML reads as something other than text (every spec key is a name)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str) and isinstance(key_node, yaml.ScalarNode):
                # YAML reads ``true``, ``null`` or ``2`` as a boolean, null or number, which
                # no spec key is; pydantic would name it by a coerced value (``1``).
                text = key_node.value or "null"
                kind = {bool: "a boolean", int: "a number", float: "a number", type(None): "null"}.get(
                    type(key), f"a {type(key).__name__}"
                )
                raise _KeyNotTextError(
                    problem=f"YAML reads the key {text} as {kind}, and every spec key is a name; "
                    f"quote it ('{text}') if it is meant as one",
                    problem_mark=key_node.start_mark,
                )
            try:
                first = first_lines.get(key)
            except TypeError:  # an unhashable key: the base loader says so
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key '{key}' (first at line {first}); keep one",
                    problem_mark=key_node.start_mark,
                )
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# YAML 1.1, which PyYAML follows, reads ``1e-4`` (no dot) as text: a searched or swept
# ``weight_decay: [0, 1e-4]`` stored the string '1e-4' with the study, where YAML 1.2
# and every YAML user mean a number.
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def builtin_spec_path(name: str = "quickstart") -> Path:
    """Path of a spec shipped inside the package (``quickstart``)."""
    return Path(__file__).parent / "studies" / f"{name}.yaml"


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, Mapping):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []
