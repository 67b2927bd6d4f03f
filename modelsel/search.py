"""Optuna's samplers and pruners, built from a spec and checked before a study is touched.

:func:`make_sampler` seeds the sampler from the spec (and, for a resumed study, from how
many trials it already stores: :func:`resume_seed_offset`); :func:`make_pruner` sets the
pruners' defaults in epochs; :func:`check_sampler_and_pruner` runs both through a
throwaway in-memory study, so that options that fail only once trials exist fail here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import optuna

from modelsel.errors import SpecError
from modelsel.spec import StudySpec, max_trial_epochs

#: A resumed study's sampler is seeded ``seed + stride * (trials already stored)``: seeded
#: as in its first run, a random or TPE sampler would draw that run's configurations again.
_RESUME_SEED_STRIDE = 104_729


def resume_seed_offset(stored_trials: int) -> int:
    """What a run adds to the spec's seed for its sampler, given how many trials the study
    already stores: 0 for a new study, else a step per trial, so that each resume draws
    configurations of its own (and the same ones again for the same stored trials)."""
    return _RESUME_SEED_STRIDE * stored_trials


def make_sampler(spec: StudySpec, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler a spec names, seeded with the spec's seed plus ``seed_offset`` (see
    :func:`resume_seed_offset`; a grid ignores it: its cells keep their order, and the
    sampler skips the visited ones).

    Raises
    ------
    SpecError
        When ``sampler.options`` are not accepted by the sampler.
    """
    samplers = optuna.samplers
    options = dict(spec.sampler.options)
    name = "grid" if spec.sweep is not None else spec.sampler.name
    if "seed" in options:
        raise SpecError("sampler.options.seed: the sampler is seeded from the spec's seed; set the top-level seed")
    try:
        if name == "grid":
            from modelsel.objective import study_grid

            if options:  # GridSampler takes none but its grid and seed: they would be ignored without a word
                what = "a sweep runs on optuna's GridSampler, which" if spec.sweep is not None else "the grid sampler"
                raise ValueError(f"{what} takes no options ({', '.join(map(str, options))}); remove them")

            return samplers.GridSampler(study_grid(spec), seed=spec.seed)
        factory: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
            "tpe": samplers.TPESampler,
            "random": samplers.RandomSampler,
            "gp": samplers.GPSampler,
            "cmaes": samplers.CmaEsSampler,
            "nsga2": samplers.NSGAIISampler,
        }
        # Optuna takes seeds below 2**32; a long-resumed study's offset may pass it.
        return factory[name](seed=(spec.seed + seed_offset) % 2**32, **options)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"sampler.options: {exc}") from None


#: The most trials :func:`check_sampler_and_pruner` sends through its probe study.
_PROBE_MAX_TRIALS = 64


def check_sampler_and_pruner(spec: StudySpec) -> None:
    """Raise a one-line :class:`SpecError` when ``spec``'s sampler or pruner options are bad.

    Some options pass the constructors and fail only when a trial is sampled or judged
    (TPE's ``n_startup_trials: 'x'``, Hyperband's ``max_resource: 0``), and a model-based
    sampler's own options (TPE's ``gamma``, CMA-ES's ``popsize`` or ``x0``) only once its
    random start-up trials are done: so trials go through a throwaway in-memory study,
    sampling the search space and reporting a step, until one past the start-up
    (at most :data:`_PROBE_MAX_TRIALS`).
    """
    from modelsel.objective import suggest_params

    pruner = make_pruner(spec)
    grid = spec.sweep is not None or spec.sampler.name == "grid"
    sampler = make_sampler(spec)  # refuses bad options (a grid's too, which it would ignore)
    if grid:  # a grid's sampler needs no probe (its cells were checked as values); its pruner does
        sampler = optuna.samplers.RandomSampler(seed=0)
    n_objectives = len(spec.objectives or ["default"])
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its warnings concern the probe's trials
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = optuna.create_study(sampler=sampler, pruner=pruner, directions=["minimize"] * n_objectives)
            startup = getattr(sampler, "_n_startup_trials", 0)
            n_probe = min(_PROBE_MAX_TRIALS, startup + 2) if isinstance(startup, int) else 2
            for i in range(max(2, n_probe)):
                value = 1.0 / (i + 2)  # distinct values, so that a model-based sampler can rank them
                try:
                    trial = probe.ask()
                    if not grid:
                        suggest_params(trial, spec)
                except Exception as exc:  # whatever a misconfigured sampler raises
                    raise SpecError(_options_error("sampler", sampler, exc, options=spec.sampler.options)) from None
                if n_objectives == 1 and spec.pruner.name not in ("none", "fold_paired"):
                    try:
                        trial.report(value, 1)
                        trial.should_prune()
                    except Exception as exc:  # whatever a misconfigured pruner raises
                        raise SpecError(_options_error("pruner", pruner, exc, options=spec.pruner.options)) from None
                try:
                    probe.tell(trial, [value] * n_objectives)
                except Exception as exc:  # options used once a trial ends (TPE's constraints_func)
                    raise SpecError(_options_error("sampler", sampler, exc, options=spec.sampler.options)) from None
    finally:
        optuna.logging.set_verbosity(verbosity)


def _options_error(field: str, used: object, exc: Exception, *, options: dict[str, Any]) -> str:
    """One line for an Optuna sampler or pruner that accepted its options, then failed."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    name = type(used).__name__
    if not options:  # nothing to blame but the choice itself (e.g. CMA-ES with two objectives)
        return f"{field}: optuna's {name} cannot run this study ({what}); choose another {field}"
    return f"{field}.options: optuna's {name} fails with them ({what}); check each against the arguments of {name}"


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner a spec names (``none`` never prunes).

    Steps are epochs trained (see :class:`modelsel.objective.PruningCallback`): the
    median and percentile pruners wait for 5 finished trials and may prune from the
    first epoch on (``n_warmup_steps: 1``); Hyperband's ``max_resource`` is the most
    epochs a trial can train (``training.epochs``, or the largest searched or swept value).

    Raises
    ------
    SpecError
        When ``pruner.options`` are not accepted by the pruner.
    """
    pruners = optuna.pruners
    options = dict(spec.pruner.options)
    try:
        if spec.pruner.name == "none":
            if options:  # they would be ignored without a word
                raise ValueError("the pruner 'none' takes no options; remove them, or name a pruner")
            return pruners.NopPruner()
        if spec.pruner.name == "median":
            options.setdefault("n_startup_trials", 5)
            options.setdefault("n_warmup_steps", 1)
            return pruners.MedianPruner(**options)
        if spec.pruner.name == "percentile":
            options.setdefault("percentile", 25.0)
            options.setdefault("n_startup_trials", 5)
            options.setdefault("n_warmup_steps", 1)
            return pruners.PercentilePruner(**options)
        if spec.pruner.name == "successive_halving":
            return pruners.SuccessiveHalvingPruner(**options)
        if spec.pruner.name == "fold_paired":
            from modelsel.objective import FoldPairedPruner

            worse = options.get("min_worse_folds")
            if isinstance(worse, int) and worse > spec.cv.folds:
                raise ValueError(f"min_worse_folds {worse} is more than the {spec.cv.folds} folds of cv.folds")
            return FoldPairedPruner(**options)
        options.setdefault("min_resource", 1)
        # The longest trial's epochs: training.epochs may be searched or swept.
        options.setdefault("max_resource", max_trial_epochs(spec))
        for resource in ("min_resource", "max_resource"):
            value = options[resource]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"{resource} is {value}; give a number of epochs of 1 or more")
        low, high = options["min_resource"], options["max_resource"]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) and low > high:
            raise ValueError(f"min_resource ({low}) is above max_resource ({high}); lower min_resource")
        return pruners.HyperbandPruner(**options)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"pruner.options: {exc}") from None
