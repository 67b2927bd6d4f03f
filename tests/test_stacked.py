"""Tests of the stacked engine: every model and training feature matches the one-model
path (float tolerance), uneven member sizes, early stopping, divergence, per-member
hyperparameters, dropout statistics, callbacks and the ``engine: auto`` rule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import pytest
import torch
from torch.nn import functional as F

from modelsel.diagnostics import GradientStats
from modelsel.engines import train_models
from modelsel.spec import ModelSpec, TrainingSpec
from modelsel.stacked import (
    StackedTrainer,
    StackJob,
    StackResult,
    _batched_members,
    _StackedCrossEntropy,
    stack_signature,
    train_stacked,
)
from modelsel.training import (
    Diverged,
    FoldData,
    TrainedMember,
    TrainSource,
    choose_engine,
    torch_threads,
)

N_CLASSES = 3


def fold(n: int, *, seed: int, n_features: int = 5, task: str = "classification", n_val: int = 11) -> FoldData:
    gen = torch.Generator().manual_seed(seed)

    def sample(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.randn(m, n_features, generator=gen)
        if task == "classification":
            return X, (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
        return X, 2 * X[:, 0] - X[:, 1] + 0.1 * torch.randn(m, generator=gen)

    X, y = sample(n)
    X_val, y_val = sample(n_val)
    return FoldData(X_train=X, y_train=y, X_val=X_val, y_val=y_val)


def folds(sizes: Sequence[int] = (37, 36, 38), **kwargs: Any) -> list[FoldData]:
    return [fold(n, seed=i, **kwargs) for i, n in enumerate(sizes)]


def cuda_folds(sizes: Sequence[int]) -> list[FoldData]:
    """:func:`folds` on the GPU."""
    return [
        FoldData(*(t.cuda() if t is not None else None for t in (f.X_train, f.y_train, f.X_val, f.y_val)))
        for f in folds(sizes)
    ]


def run(
    members: Sequence[FoldData],
    engine: str,
    *,
    model: dict[str, Any],
    training: dict[str, Any],
    task: str = "classification",
    seed: int = 3,
    callbacks: Sequence[Any] = (),
) -> list[TrainedMember]:
    return train_models(
        members,
        model_spec=ModelSpec.model_validate(model),
        training=TrainingSpec.model_validate({"epochs": 4, "batch_size": 8, **training, "engine": engine}),
        task=task,  # type: ignore[arg-type]
        n_outputs=N_CLASSES if task == "classification" else 1,
        seed=seed,
        callbacks=callbacks,
    )


def assert_same_training(
    sequential: Sequence[TrainedMember],
    stacked: Sequence[TrainedMember],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    skip: tuple[str, ...] = (),
) -> None:
    assert len(sequential) == len(stacked)
    for a, b in zip(sequential, stacked, strict=True):
        ha, hb = a.history, b.history
        assert ha.epochs_run == hb.epochs_run
        assert (ha.best_epoch, ha.final_epoch, ha.stopped_early) == (hb.best_epoch, hb.final_epoch, hb.stopped_early)
        for name in ("train_loss", "val_loss", "train_metric", "val_metric"):
            torch.testing.assert_close(getattr(hb, name), getattr(ha, name), rtol=rtol, atol=atol, msg=name)
        assert math.isclose(ha.final_train_loss, hb.final_train_loss, rel_tol=rtol, abs_tol=atol)
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            if not any(part in key for part in skip):
                torch.testing.assert_close(sb[key], sa[key], rtol=rtol, atol=atol, msg=key)


FEATURES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "adam": ({"depth": 1, "width": 16}, {"optimizer": "adam", "lr": 0.01}),
    "sgd, per-layer widths, tanh": (
        {"depth": 2, "width": [8, 12], "activation": "tanh"},
        {"optimizer": "sgd", "lr": 0.1},
    ),
    "momentum, weight decay, gelu": (
        {"depth": 1, "width": 16, "activation": "gelu"},
        {"optimizer": "momentum", "lr": 0.05, "weight_decay": 0.01},
    ),
    "adamw, weight decay, l1, elu": (
        {"depth": 1, "width": 16, "activation": "elu"},
        {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1, "l1": 0.001},
    ),
    "adam, weight decay, clip norm, residual, leaky_relu": (
        {"depth": 3, "width": 16, "activation": "leaky_relu", "residual": True},
        {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.01, "grad_clip": 0.5},
    ),
    "clip value, sigmoid, xavier_normal": (
        {"depth": 1, "width": 16, "activation": "sigmoid", "init": "xavier_normal"},
        {"optimizer": "sgd", "lr": 0.5, "grad_clip": {"kind": "value", "threshold": 0.01}},
    ),
    "batch norm, kaiming_uniform": (
        {"depth": 2, "width": 16, "batch_norm": True, "init": "kaiming_uniform"},
        {"optimizer": "momentum", "lr": 0.05},
    ),
    "sgd, weight decay, residual": (
        {"depth": 2, "width": 16, "residual": True},
        {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.01},
    ),
    "depth 0": ({"depth": 0}, {"optimizer": "adam", "lr": 0.01}),
    "kaiming_normal, xavier_uniform-free defaults": (
        {"depth": 1, "width": 16, "init": "kaiming_normal"},
        {"optimizer": "sgd", "lr": 0.05},
    ),
    "full train metrics": ({"depth": 1, "width": 16}, {"optimizer": "adam", "lr": 0.01, "train_metrics": "full"}),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_stacked_matches_sequential(feature: str) -> None:
    model, training = FEATURES[feature]
    members = folds()
    assert_same_training(
        run(members, "sequential", model=model, training=training),
        run(members, "stacked", model=model, training=training),
    )


def test_batch_norm_asked_of_a_linear_model_changes_neither_engine() -> None:
    # depth 0 has no batch-norm layer, so a last batch of one sample (17 = 2 x 8 + 1)
    # is trained on, not dropped as a batch-norm model must drop it.
    members = folds((17, 33, 36))
    training = {"optimizer": "sgd", "lr": 0.5}
    plain = run(members, "sequential", model={"depth": 0}, training=training)
    for engine in ("sequential", "stacked"):
        assert_same_training(plain, run(members, engine, model={"depth": 0, "batch_norm": True}, training=training))


def test_xavier_uniform_and_regression_match() -> None:
    model = {"depth": 1, "width": 16, "init": "xavier_uniform"}
    members = folds(task="regression")
    training = {"optimizer": "adam", "lr": 0.01}
    assert_same_training(
        run(members, "sequential", model=model, training=training, task="regression"),
        run(members, "stacked", model=model, training=training, task="regression"),
    )


@pytest.mark.parametrize(
    "sizes",
    [
        (32, 33, 16, 5),  # different step counts: members sit out the last steps
        (33, 32, 41),  # batch norm drops a last batch of one sample for some members only
        (7, 40),  # a member smaller than one batch
    ],
)
def test_uneven_member_sizes(sizes: tuple[int, ...]) -> None:
    members = folds(sizes)
    for model, training in (
        ({"depth": 1, "width": 16}, {"optimizer": "adam", "lr": 0.01}),
        ({"depth": 1, "width": 16, "batch_norm": True}, {"optimizer": "momentum", "lr": 0.05}),
        ({"depth": 1, "width": 16}, {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.01}),
    ):
        assert_same_training(
            run(members, "sequential", model=model, training=training),
            run(members, "stacked", model=model, training=training),
        )


def test_deep_batch_norm_with_a_member_sitting_out_steps_does_not_diverge() -> None:
    # A member without rows in a step has batch statistics of nothing: its padded rows
    # were scaled by rsqrt(eps) at each of 12 layers, overflowed, and inf * 0 in the
    # masked loss sum read as a divergence. Twelve batch-norm layers amplify float32
    # rounding: with two members of 48 rows, none sitting out, the weights differ by up
    # to 3.4e-4 too, hence the looser tolerance.
    # Batches of 16 (the 16-row member sits out two of three steps): at batches of 8,
    # twelve layers of batch statistics amplify rounding chaotically (for some seeds,
    # inputs changed by one float32 step move the sequential engine's loss by 1e-2).
    members = folds((16, 48), task="regression")
    model = {"depth": 12, "width": 16, "batch_norm": True}
    training = {"optimizer": "momentum", "lr": 0.001, "epochs": 1, "batch_size": 16}
    assert_same_training(
        run(members, "sequential", model=model, training=training, task="regression"),
        run(members, "stacked", model=model, training=training, task="regression"),
        rtol=1e-3,
        atol=1e-3,
    )


def test_batch_norm_with_adam_matches() -> None:
    # A linear layer before batch norm had a bias whose true gradient is exactly zero: its
    # gradient was rounding noise, which Adam normalised into full-size steps, so it (and
    # the running mean after it) differed between the engines by ~0.06. It has no bias now.
    members = folds()
    model = {"depth": 2, "width": 16, "batch_norm": True}
    training = {"optimizer": "adam", "lr": 0.01}
    sequential = run(members, "sequential", model=model, training=training)
    assert "blocks.0.linear.bias" not in sequential[0].model.state_dict()
    assert_same_training(sequential, run(members, "stacked", model=model, training=training))


def test_early_stopping_per_member() -> None:
    members = folds((37, 36, 38, 35))
    model = {"depth": 1, "width": 32}
    training = {"optimizer": "adam", "lr": 0.05, "epochs": 30, "early_stopping": {"patience": 2}}
    sequential = run(members, "sequential", model=model, training=training)
    stacked = run(members, "stacked", model=model, training=training)
    assert any(m.history.stopped_early for m in stacked)
    assert len({m.history.epochs_run for m in stacked}) > 1  # members stop at different epochs
    assert_same_training(sequential, stacked)


def test_a_diverging_fold_raises_as_in_the_sequential_engine() -> None:
    members = folds()
    members[1].X_train[3, 0] = math.inf
    model, training = {"depth": 1, "width": 8}, {"optimizer": "sgd", "lr": 0.1}
    errors = []
    for engine in ("sequential", "stacked"):
        with pytest.raises(Diverged) as info:
            run(members, engine, model=model, training=training)
        errors.append((info.value.member, info.value.epoch))
    assert errors[0] == errors[1] == (1, 0)


def solo(job: StackJob) -> TrainedMember:
    """The job trained alone by the one-model path."""
    assert job.index == 0
    training = job.training.model_copy(update={"engine": "sequential"})
    (member,) = train_models(
        [job.data], model_spec=job.model, training=training, task="classification",
        n_outputs=N_CLASSES, seed=job.seed,
    )
    return member


def test_stacked_sweep_members_with_different_hyperparameters() -> None:
    base = TrainingSpec(epochs=4, batch_size=8, optimizer="momentum", lr=0.05)
    data = fold(37, seed=0)
    variants: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({}, {}),
        ({"dropout": 0.0, "init": "xavier_uniform"}, {"lr": 0.02, "weight_decay": 0.01}),
        ({}, {"momentum": 0.5, "l1": 0.001, "grad_clip": 0.3}),
        ({}, {"grad_clip": {"kind": "value", "threshold": 0.05}, "epochs": 2}),
        ({}, {"early_stopping": {"patience": 1}, "epochs": 6, "lr": 0.3}),
    ]
    jobs = [
        StackJob(
            data=data,
            model=ModelSpec.model_validate({"depth": 1, "width": 16, **model_changes}),
            training=TrainingSpec.model_validate({**base.model_dump(), **training_changes}),
            seed=10 + i,
        )
        for i, (model_changes, training_changes) in enumerate(variants)
    ]
    results = train_stacked(jobs, task="classification", n_outputs=N_CLASSES)
    assert [r.member.history.epochs_run for r in results][3] == 2
    for job, result in zip(jobs, results, strict=True):
        assert result.diverged is None
        assert_same_training([solo(job)], [result.member])


def test_plain_sgd_steps_inside_the_backward_pass_as_the_one_model_path() -> None:
    # Members differ in learning rate and weight decay (per-member columns) and in size
    # (members sit out the last steps), with dropout-free residual blocks.
    sizes, settings = (37, 30, 45), ((0.1, 0.0), (0.05, 0.01), (0.2, 0.001))
    jobs = [
        StackJob(
            data=fold(n, seed=i),
            model=ModelSpec(depth=2, width=16, residual=True),
            training=TrainingSpec(epochs=3, batch_size=8, optimizer="sgd", lr=lr, weight_decay=wd),
            seed=4 + i,
        )
        for i, (n, (lr, wd)) in enumerate(zip(sizes, settings, strict=True))
    ]
    trainers = {
        fused: StackedTrainer(
            jobs, task="classification", n_outputs=N_CLASSES, device=torch.device("cpu"), fused_sgd=fused
        )
        for fused in (True, False)
    }
    # Each layer's weights (and their gradient buffer) are one contiguous [k, out, in]
    # tensor: torch's in-place batched products take BLAS's batched path only then.
    for weight, _, grad_weight, _ in trainers[True].layers:
        assert weight.shape[0] == len(jobs) and weight.is_contiguous() and grad_weight.is_contiguous()
    results = {fused: trainer.train() for fused, trainer in trainers.items()}
    # Every step (6 an epoch for the largest member), ragged ones included, updates in the backward pass.
    assert trainers[True].fused_steps == 3 * 6 and trainers[False].fused_steps == 0
    for job, fused, separate in zip(jobs, results[True], results[False], strict=True):
        assert_same_training([solo(job)], [fused.member])
        assert_same_training([separate.member], [fused.member])
    # Features that need the gradient itself keep the separate update.
    for change in ({"l1": 0.001}, {"grad_clip": 1.0}, {"optimizer": "momentum"}):
        job = StackJob(
            data=jobs[0].data,
            model=jobs[0].model,
            training=TrainingSpec.model_validate({**jobs[0].training.model_dump(), **change}),
            seed=4,
        )
        trainer = StackedTrainer([job], task="classification", n_outputs=N_CLASSES, device=torch.device("cpu"))
        trainer.train()
        assert trainer.fused_steps == 0, change


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_members_beyond_a_multiple_of_the_threads_match_the_one_model_path(optimizer: str) -> None:
    # 3 members at 2 threads, products of 256 x 512 x 256: two go through one batched
    # call, the third through a 2-thread product of its own (forward, the SGD step taken
    # in the backward pass, and momentum's separate weight gradient).
    members = folds((300, 290, 310), n_features=512)
    model = {"depth": 1, "width": 256}
    training = {"optimizer": optimizer, "lr": 0.05, "weight_decay": 0.001, "batch_size": 256, "epochs": 2}
    with torch_threads(2):
        x, weight = torch.empty(3, 256, 512), torch.empty(3, 512, 256)
        assert _batched_members(x, weight) == 2
        assert _batched_members(x[:, :64], weight) == 3  # too small a product to split
        sequential = run(members, "sequential", model=model, training=training)
        stacked = run(members, "stacked", model=model, training=training)
    with torch_threads(1):
        assert _batched_members(x, weight) == 3
    assert_same_training(sequential, stacked)


def test_members_sharing_a_source_gather_from_it_with_the_same_results() -> None:
    # Folds cut from one source tensor (as make_fold_data cuts unstandardized ones) are
    # gathered with one call per chunk; 784 features make the chunk 216 rows for 3
    # members, so the last chunk of an epoch is partial and the members uneven.
    gen = torch.Generator().manual_seed(0)
    X, y = torch.rand(400, 784, generator=gen), torch.randint(0, N_CLASSES, (400,), generator=gen)
    members = []
    for i, n in enumerate((300, 290, 310)):
        rows = torch.randperm(400, generator=torch.Generator().manual_seed(i))[:n]
        members.append(FoldData(X_train=X[rows], y_train=y[rows], source=TrainSource(X, y, rows)))
    sources = [cast(TrainSource, m.source) for m in members]

    def trainer(datas: list[FoldData]) -> StackedTrainer:
        model, training = ModelSpec(depth=1, width=16), TrainingSpec(epochs=2, batch_size=8)
        jobs = [StackJob(data=data, model=model, training=training, seed=i) for i, data in enumerate(datas)]
        return StackedTrainer(jobs, task="classification", n_outputs=N_CLASSES, device=torch.device("cpu"))

    apart = trainer([FoldData(m.X_train, m.y_train) for m in members])  # their own tensors only
    shared = trainer(members)  # tensors and the source
    rows_only = trainer([FoldData(source=s) for s in sources])  # no copy of the training rows
    # Rows of different sources: each member gathers from its own.
    copied = TrainSource(X.clone(), y.clone(), sources[0].rows)
    mixed = trainer([FoldData(source=copied), *(FoldData(source=s) for s in sources[1:])])
    assert apart._shared_source() is None and mixed._shared_source() is None
    assert shared._shared_source() is not None and rows_only._shared_source() is not None
    expected = apart.train()
    for other in (shared, rows_only, mixed):
        for a, b in zip(expected, other.train(), strict=True):
            assert a.member.history.train_loss == b.member.history.train_loss
            assert a.member.history.final_train_loss == b.member.history.final_train_loss
            for key, value in a.member.model.state_dict().items():
                assert torch.equal(b.member.model.state_dict()[key], value), key


def test_relu_runs_in_place_except_before_a_residual_sum() -> None:
    def trainer(**model: Any) -> StackedTrainer:
        job = StackJob(data=fold(20, seed=0), model=ModelSpec.model_validate(model), training=TrainingSpec(), seed=0)
        return StackedTrainer([job], task="classification", n_outputs=N_CLASSES, device=torch.device("cpu"))

    assert trainer(depth=2, width=8).inplace_relu == [True, True]
    assert trainer(depth=2, width=8, activation="tanh").inplace_relu == [False, False]
    residual = trainer(depth=3, width=8, residual=True)
    assert residual.inplace_relu == [not r for r in residual.residual] and any(residual.residual)


def test_the_stacked_loss_is_cross_entropy_with_the_argmax_hits_of_the_same_pass() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 4, generator=gen)
    target = torch.randint(0, 4, (3, 7), generator=gen)
    logits[0, 0], target[0, 0] = torch.tensor([1.0, 2.0, 2.0, 0.0]), 1  # a tie: argmax takes the first
    logits[0, 1], target[0, 1] = torch.tensor([1.0, 2.0, 2.0, 0.0]), 2
    weights = torch.rand(3, 7, generator=gen)  # as the ragged steps' per-sample weights
    stacked, reference = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    per_sample, hits = _StackedCrossEntropy.apply(stacked, target)
    (per_sample * weights).sum().backward()
    expected = F.cross_entropy(reference.reshape(-1, 4), target.reshape(-1), reduction="none").view(3, 7)
    (expected * weights).sum().backward()
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(stacked.grad, reference.grad)
    assert torch.equal(hits, logits.argmax(dim=-1) == target)
    assert hits[0, 0] and not hits[0, 1]
    for bad in (math.inf, math.nan):  # divergence stays visible in the loss
        broken = logits.clone()
        broken[1, 2, 3] = bad
        assert not _StackedCrossEntropy.apply(broken, target)[0][1, 2].isfinite()


def test_adam_sweep_members_with_different_learning_rates() -> None:
    data = fold(37, seed=0)
    jobs = [
        StackJob(data=data, model=ModelSpec(depth=1, width=16), training=TrainingSpec(
            epochs=3, batch_size=8, optimizer=optimizer, lr=lr, weight_decay=wd), seed=1)
        for optimizer in ("adam", "adamw") for lr, wd in ((0.01, 0.0), (0.003, 0.05))
    ]
    for optimizer in ("adam", "adamw"):
        group = [j for j in jobs if j.training.optimizer == optimizer]
        results = train_stacked(group, task="classification", n_outputs=N_CLASSES)
        for job, result in zip(group, results, strict=True):
            assert_same_training([solo(job)], [result.member])


def test_a_diverging_sweep_member_leaves_the_others_unharmed() -> None:
    data = fold(37, seed=0)
    jobs = [
        StackJob(data=data, model=ModelSpec(depth=1, width=16),
                 training=TrainingSpec(epochs=4, batch_size=8, optimizer="sgd", lr=lr), seed=2)
        for lr in (0.05, 1e6, 0.1)
    ]
    results = train_stacked(jobs, task="classification", n_outputs=N_CLASSES)
    assert results[1].diverged is not None and results[1].diverged.member == 1
    assert results[1].member.history.epochs_run < 4
    for i in (0, 2):
        assert results[i].diverged is None
        assert_same_training([solo(jobs[i])], [results[i].member])


def test_members_must_share_a_stack_signature() -> None:
    data = fold(20, seed=0)
    jobs = [
        StackJob(data=data, model=ModelSpec(depth=1, width=16), training=TrainingSpec(), seed=0),
        StackJob(data=data, model=ModelSpec(depth=1, width=8), training=TrainingSpec(), seed=0),
    ]
    assert stack_signature(jobs[0].model, jobs[0].training) != stack_signature(jobs[1].model, jobs[1].training)
    with pytest.raises(ValueError, match="share architecture"):
        train_stacked(jobs, task="classification", n_outputs=N_CLASSES)


# ------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("rates", [(0.0, 0.2, 0.5), (0.3, 0.3, 0.3)])
def test_dropout_masks_keep_each_members_rate_and_scale(rates: tuple[float, ...]) -> None:
    data = fold(64, seed=0)
    jobs = [
        StackJob(data=data, model=ModelSpec(depth=1, width=16, dropout=p), training=TrainingSpec(), seed=0)
        for p in rates
    ]
    trainer = StackedTrainer(jobs, task="classification", n_outputs=N_CLASSES, device=torch.device("cpu"))
    a = torch.ones(len(rates), 4000, 64)
    mask = trainer._dropout_mask(a)
    assert mask.shape == a.shape and mask.dtype == a.dtype
    for i, p in enumerate(rates):
        kept = mask[i] != 0
        assert abs(kept.float().mean().item() - (1 - p)) < 0.01
        torch.testing.assert_close(mask[i][kept], torch.full_like(mask[i][kept], 1 / (1 - p)))
    assert not torch.equal(mask[1, :100], mask[1, 100:200])  # fresh bits everywhere
    assert not torch.equal(mask, trainer._dropout_mask(a))  # and at every call


def test_dropout_trains_as_well_stacked_as_sequential() -> None:
    # Masks come from different random streams, so only the statistics can agree.
    members = folds((120, 121, 119, 120), n_val=200)
    model = {"depth": 1, "width": 32, "dropout": 0.3}
    training = {"optimizer": "adam", "lr": 0.01, "epochs": 8, "batch_size": 16}
    accuracy = {}
    for engine in ("sequential", "stacked"):
        trained = run(members, engine, model=model, training=training)
        accuracy[engine] = sum(m.history.val_metric[-1] for m in trained) / len(trained)
    assert accuracy["stacked"] > 0.7 and accuracy["sequential"] > 0.7
    assert abs(accuracy["stacked"] - accuracy["sequential"]) < 0.06


# ---------------------------------------------------------------------- callbacks


@pytest.mark.parametrize(
    "training",
    [
        {"optimizer": "adam", "lr": 0.01, "l1": 0.001},
        {"optimizer": "sgd", "lr": 0.1},  # the first step of each epoch keeps its gradients for the callback
    ],
)
def test_gradient_stats_and_models_are_the_one_model_paths(training: dict[str, Any]) -> None:
    members = folds()
    model = {"depth": 2, "width": 16}
    stats = {engine: GradientStats() for engine in ("sequential", "stacked")}
    trained = {
        engine: run(members, engine, model=model, training=training, callbacks=[stats[engine]])
        for engine in stats
    }
    for member in range(len(members)):
        for layer, values in stats["sequential"].norms[member].items():
            torch.testing.assert_close(stats["stacked"].norms[member][layer], values, rtol=1e-4, atol=1e-6)
        backward_signal = stats["sequential"].preactivation_norms[member]
        assert list(backward_signal) == ["hidden1", "hidden2", "output"]
        for layer, values in backward_signal.items():
            assert len(values) == 4  # every epoch
            torch.testing.assert_close(
                stats["stacked"].preactivation_norms[member][layer], values, rtol=1e-4, atol=1e-6
            )
    # Every stacked model owns its storage: changing one changes no other.
    models = [m.model for m in trained["stacked"]]
    before = models[1].output.weight.detach().clone()
    with torch.no_grad():
        models[0].output.weight.add_(1.0)
    assert torch.equal(models[1].output.weight, before)
    assert all(p.grad is None for p in models[0].parameters())


def test_training_does_not_disturb_the_global_random_state() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(folds(), "stacked", model={"depth": 1, "width": 8, "dropout": 0.2}, training={"epochs": 1})
    torch.testing.assert_close(torch.rand(3), expected)


def test_same_seed_same_numbers_with_dropout() -> None:
    model, training = {"depth": 1, "width": 8, "dropout": 0.2}, {"epochs": 2}
    first = run(folds(), "stacked", model=model, training=training)
    second = run(folds(), "stacked", model=model, training=training)
    for a, b in zip(first, second, strict=True):
        assert a.history.train_loss == b.history.train_loss


# ------------------------------------------------------------------- engine auto


def test_engine_auto_rule() -> None:
    def choose(model: ModelSpec, batch: int, device: str = "cpu", n_inputs: int = 784, engine: str = "auto") -> str:
        del model, device, n_inputs  # auto depends on the engine setting alone
        return choose_engine(TrainingSpec(batch_size=batch, engine=engine))  # type: ignore[arg-type]

    d2l = ModelSpec(depth=1, width=256)
    assert choose(d2l, 256) == "stacked"
    assert choose(ModelSpec(depth=3, width=1024), 256) == "stacked"
    assert choose(d2l, 256, device="cuda") == "stacked"
    assert choose(ModelSpec(depth=2, width=64), 64, n_inputs=64) == "stacked"  # the quickstart's digits
    assert choose(d2l, 64, engine="sequential") == "sequential"
    assert choose(d2l, 256, engine="stacked") == "stacked"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stacked_matches_sequential_and_is_the_auto_choice() -> None:
    device = torch.device("cuda")
    members = cuda_folds((37, 36, 38))
    model = ModelSpec(depth=2, width=16, batch_norm=True, dropout=0.0)
    training = TrainingSpec(epochs=3, batch_size=8, optimizer="momentum", lr=0.05, grad_clip=1.0)
    assert choose_engine(training) == "stacked"
    trained = {
        engine: train_models(
            members, model_spec=model, training=training.model_copy(update={"engine": engine}),
            task="classification", n_outputs=N_CLASSES, seed=3, device=device,
        )
        for engine in ("sequential", "stacked")
    }
    assert_same_training(trained["sequential"], trained["stacked"], rtol=1e-3, atol=1e-4)
    dropout = ModelSpec(depth=1, width=16, dropout=0.3)
    run_dropout = train_models(
        members, model_spec=dropout, training=training.model_copy(update={"engine": "stacked"}),
        task="classification", n_outputs=N_CLASSES, seed=3, device=device,
    )
    assert all(math.isfinite(m.history.train_loss[-1]) for m in run_dropout)


def test_stacked_engine_trains_under_bf16_autocast() -> None:
    """Under autocast the layers' products run in bfloat16 while the weights, their
    gradient buffers and the optimizer stay float32; training follows the float32 run."""
    members = folds((37, 36, 38))
    model = {"depth": 2, "width": 16}
    training = {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3, "epochs": 6}
    reference = run(members, "stacked", model=model, training=training)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        low = {engine: run(members, engine, model=model, training=training) for engine in ("sequential", "stacked")}
    for engine, trained in low.items():
        for member, ref in zip(trained, reference, strict=True):
            assert all(p.dtype == torch.float32 for p in member.model.parameters()), engine
            losses = member.history.train_loss
            assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], engine
            assert member.history.val_loss[-1] == pytest.approx(ref.history.val_loss[-1], abs=0.05), engine
    for a, b in zip(low["sequential"], low["stacked"], strict=True):
        assert a.history.val_loss[-1] == pytest.approx(b.history.val_loss[-1], abs=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("model", "training"),
    [
        ({"depth": 1, "width": 32}, {"optimizer": "sgd", "lr": 0.1}),
        (
            {"depth": 2, "width": 16, "batch_norm": True, "residual": True},
            {"optimizer": "momentum", "lr": 0.05, "weight_decay": 1e-3, "l1": 1e-4, "grad_clip": 1.0},
        ),
        ({"depth": 2, "width": 16}, {"optimizer": "sgd", "lr": 0.05, "grad_clip": {"kind": "value", "threshold": 0.1}}),
        ({"depth": 2, "width": 16}, {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3}),
        # Not Adam with batch norm: the bias before a batch norm has a zero gradient up to
        # rounding, which Adam scales to full steps, so two roundings of one update diverge
        # by ~1% (as do the sequential and stacked engines: FEATURES pairs it with momentum).
        ({"depth": 1, "width": 32}, {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.05, "l1": 1e-3}),
    ],
)
def test_cuda_graph_steps_match_eager_steps(model: dict[str, Any], training: dict[str, Any]) -> None:
    """On CUDA the full steps replay one captured graph; they train as the eager steps do."""
    device = torch.device("cuda")
    members = cuda_folds((83, 80, 85))
    spec = TrainingSpec.model_validate({"epochs": 3, "batch_size": 8, **training})
    jobs = [
        StackJob(data=data, model=ModelSpec.model_validate(model), training=spec, seed=5, index=i)
        for i, data in enumerate(members)
    ]
    runs: dict[bool, list[StackResult]] = {}
    for graph in (False, True):
        trainer = StackedTrainer(jobs, task="classification", n_outputs=N_CLASSES, device=device, cuda_graph=graph)
        runs[graph] = trainer.train()
        # 10 full steps an epoch, the first of each eager; 2 warm-up steps before the capture.
        assert trainer.graph_replays == (3 * 9 - 2 if graph else 0)
    eager = [r.member for r in runs[False]]
    graphed = [r.member for r in runs[True]]
    assert_same_training(eager, graphed, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_draw_fresh_dropout_masks() -> None:
    """The stack's dropout generator is registered with the graph: each replay draws new
    masks (a graph that replayed one mask would train every step on the same units)."""
    device = torch.device("cuda")
    members = cuda_folds((83, 80, 85))
    spec = TrainingSpec(epochs=3, batch_size=8, optimizer="adam", lr=0.01)
    jobs = [
        StackJob(data=data, model=ModelSpec(depth=2, width=16, dropout=0.5), training=spec, seed=5, index=i)
        for i, data in enumerate(members)
    ]
    trainer = StackedTrainer(jobs, task="classification", n_outputs=N_CLASSES, device=device)
    ones = torch.ones(3, 8, 16, device=device)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(trainer.dropout_generator)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        trainer._dropout_mask(ones)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph, stream=side):
        mask = trainer._dropout_mask(ones)
    graph.replay()
    first = mask.clone()
    graph.replay()
    assert not torch.equal(first, mask)
    assert 0.4 < (first > 0).float().mean().item() < 0.6
    results = trainer.train()
    assert trainer.graph_replays == 3 * 9 - 2
    for result in results:
        losses = result.member.history.train_loss
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
