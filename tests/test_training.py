"""Tests of modelsel.training: learning, determinism, optimizers, regularisation, clipping,
early stopping, divergence and callbacks."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from modelsel.diagnostics import GradientStats, weight_stats
from modelsel.engines import train_models
from modelsel.models import MLP
from modelsel.spec import ModelSpec, TrainingSpec
from modelsel.training import (
    Callback,
    Diverged,
    FoldData,
    History,
    TrainedMember,
    TrainSource,
    evaluate,
    make_optimizer,
)


def blobs(n: int = 128, *, seed: int = 0, n_features: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian classes, well separated along every feature."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.randn(n, n_features, generator=gen) + (y[:, None].float() * 2 - 1) * 1.5
    return X, y


def linear_regression(
    n: int = 128, *, seed: int = 0, n_features: int = 4, noise: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n_features, generator=gen)
    w = torch.linspace(-2, 2, n_features)
    y = X @ w + 1.0 + noise * torch.randn(n, generator=gen)
    return X, y


def classification_fold(n: int = 128) -> FoldData:
    X, y = blobs(n, seed=0)
    X_val, y_val = blobs(64, seed=1)
    return FoldData(X_train=X, y_train=y, X_val=X_val, y_val=y_val)


def regression_fold(n: int = 128, **kwargs: Any) -> FoldData:
    X, y = linear_regression(n, seed=0, **kwargs)
    X_val, y_val = linear_regression(64, seed=1, **kwargs)
    return FoldData(X_train=X, y_train=y, X_val=X_val, y_val=y_val)


@pytest.fixture(autouse=True, params=["sequential", "stacked"])
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs on both training engines (members one by one, or stacked into one model):
    the behaviour below is the engines' shared contract."""
    global _ENGINE
    _ENGINE = request.param
    try:
        yield request.param
    finally:
        _ENGINE = "auto"


_ENGINE = "auto"


def fit(
    members: Sequence[FoldData],
    *,
    task: str = "classification",
    model: dict[str, Any] | None = None,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    **training: Any,
) -> list[TrainedMember]:
    training.setdefault("epochs", 5)
    training.setdefault("batch_size", 16)
    training.setdefault("engine", _ENGINE)
    return train_models(
        members,
        model_spec=ModelSpec.model_validate(model if model is not None else {"depth": 1, "width": 16}),
        training=TrainingSpec.model_validate(training),
        task=task,  # type: ignore[arg-type]
        n_outputs=2 if task == "classification" else 1,
        seed=seed,
        callbacks=callbacks,
    )


def state_equal(a: MLP, b: MLP) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Snapshots(Callback):
    """Keeps a copy of every model's weights at train begin and after each epoch."""

    def __init__(self) -> None:
        self.models: list[MLP] = []
        self.initial: list[dict[str, torch.Tensor]] = []
        self.after_epoch: list[list[dict[str, torch.Tensor]]] = []

    def on_train_begin(self, models: Sequence[MLP]) -> None:
        self.models = list(models)
        self.initial = [copy.deepcopy(m.state_dict()) for m in models]

    def on_epoch_end(self, epoch: int, histories: Sequence[History]) -> None:
        self.after_epoch.append([copy.deepcopy(m.state_dict()) for m in self.models])


# ------------------------------------------------------------------- learning


def test_classification_loss_goes_down() -> None:
    (member,) = fit([classification_fold()], epochs=8, lr=0.01)
    history = member.history
    assert history.epochs_run == 8
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.val_loss[-1] < 0.5 * history.val_loss[0]
    assert history.val_metric[-1] >= 0.9
    assert len(history.val_metric) == len(history.train_metric) == 8
    assert history.final_epoch == 7 and not history.stopped_early
    assert history.fit_seconds > 0


def test_regression_loss_goes_down() -> None:
    (member,) = fit([regression_fold()], task="regression", epochs=10, lr=0.02)
    history = member.history
    assert history.val_loss[-1] < 0.1 * history.val_loss[0]
    # The regression metric is the RMSE.
    assert history.val_metric == pytest.approx([math.sqrt(v) for v in history.val_loss])


def test_final_train_values_come_from_an_eval_pass_over_the_training_data() -> None:
    fold = classification_fold()
    (member,) = fit([fold], model={"depth": 1, "width": 16, "dropout": 0.3}, epochs=3)
    loss, metric = evaluate(member.model, fold.X_train, fold.y_train, task="classification")
    assert member.history.final_train_loss == pytest.approx(loss)
    assert member.history.final_train_metric == pytest.approx(metric)


def test_full_train_metrics_are_eval_passes_each_epoch() -> None:
    fold = classification_fold()
    (member,) = fit([fold], epochs=2, train_metrics="full")
    loss, metric = evaluate(member.model, fold.X_train, fold.y_train, task="classification")
    assert member.history.train_loss[-1] == pytest.approx(loss)
    assert member.history.train_metric[-1] == pytest.approx(metric)


def test_evaluate_accuracy_and_rmse() -> None:
    model = MLP(2, 2, hidden=())
    with torch.no_grad():
        model.output.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.output.bias.zero_()
    X = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    _, accuracy = evaluate(model, X, torch.tensor([0, 1, 1, 1]), task="classification")
    assert accuracy == 0.75
    regressor = MLP(1, 1, hidden=())
    with torch.no_grad():
        regressor.output.weight.fill_(1.0)
        regressor.output.bias.zero_()
    loss, rmse = evaluate(regressor, torch.tensor([[1.0], [2.0]]), torch.tensor([2.0, 2.0]), task="regression")
    assert loss == pytest.approx(0.5) and rmse == pytest.approx(math.sqrt(0.5))


def test_evaluate_over_many_chunks_matches_one_pass() -> None:
    # More rows than one evaluation chunk, with a ragged last chunk: every row counts once.
    torch.manual_seed(0)
    model = MLP(5, 3, hidden=(7,))
    X, y = torch.randn(2_500, 5), torch.randint(0, 3, (2_500,))
    loss, accuracy = evaluate(model, X, y, task="classification")
    with torch.no_grad():
        out = model.eval()(X)
    assert loss == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert accuracy == pytest.approx((out.argmax(dim=1) == y).sum().item() / 2_500)
    target = torch.randn(2_500)
    regressor = MLP(5, 1, hidden=(7,))
    mse, rmse = evaluate(regressor, X, target, task="regression")
    with torch.no_grad():
        expected = F.mse_loss(regressor.eval()(X).squeeze(-1), target).item()
    assert mse == pytest.approx(expected, rel=1e-5) and rmse == pytest.approx(math.sqrt(expected), rel=1e-5)


def test_members_without_validation_data_train() -> None:
    X, y = blobs()
    (member,) = fit([FoldData(X_train=X, y_train=y)], epochs=2)
    assert member.history.epochs_run == 2 and member.history.val_loss == []
    assert member.history.final_epoch == 1


def test_a_fold_given_by_rows_of_a_source_trains_as_its_copy() -> None:
    # make_fold_data's unstandardized folds hold no copy of their training rows: the
    # engines gather batches and evaluation chunks from the source. More rows than one
    # evaluation chunk, in shuffled order, with a ragged last batch.
    X, y = blobs(2_600)
    rows = torch.randperm(2_600, generator=torch.Generator().manual_seed(3))[:2_301]
    X_val, y_val = blobs(64, seed=1)
    copied = FoldData(X_train=X[rows], y_train=y[rows], X_val=X_val, y_val=y_val)
    by_rows = FoldData(X_val=X_val, y_val=y_val, source=TrainSource(X, y, rows))
    for kwargs in ({}, {"train_metrics": "full"}):
        (a,) = fit([copied], epochs=2, batch_size=64, **kwargs)
        (b,) = fit([by_rows], epochs=2, batch_size=64, **kwargs)
        assert a.history.train_loss == b.history.train_loss and a.history.val_loss == b.history.val_loss
        assert a.history.final_train_loss == b.history.final_train_loss
        assert state_equal(a.model, b.model)


def test_fold_data_by_rows_reads_as_tensors() -> None:
    X, y = blobs(20)
    rows = torch.tensor([5, 1, 7])
    fold = FoldData(source=TrainSource(X, y, rows))
    assert fold.n_train == 3 and fold.n_inputs == 4
    assert torch.equal(fold.X_train, X[rows]) and torch.equal(fold.y_train, y[rows])
    source_X, _, source_rows = fold.training_rows()
    assert source_X is X and source_rows is rows
    own = FoldData(X_train=X, y_train=y)
    own_X, own_y, own_rows = own.training_rows()
    assert own_X is X and own_y is y and own_rows is None and own.n_train == 20
    with pytest.raises(ValueError, match="X_train and y_train, or a source"):
        FoldData(X_train=X)


def test_batch_norm_with_a_last_batch_of_one_sample() -> None:
    X, y = blobs(33)
    (member,) = fit([FoldData(X_train=X, y_train=y)], model={"depth": 1, "width": 8, "batch_norm": True}, epochs=2)
    assert member.history.epochs_run == 2


def test_batch_norm_refuses_batches_of_one_sample() -> None:
    # torch's BatchNorm1d refuses them in training; the stacked engine must not train on
    # the zeros it would compute instead.
    X, y = blobs(33)
    bn = {"depth": 1, "width": 8, "batch_norm": True}
    with pytest.raises(ValueError, match=r"batch_norm needs batches of 2 samples or more \(training.batch_size is 1\)"):
        fit([FoldData(X_train=X, y_train=y)], model=bn, batch_size=1)
    with pytest.raises(ValueError, match="needs 2 training samples or more per model; member 1 has 1"):
        fit([FoldData(X_train=X, y_train=y), FoldData(X_train=X[:1], y_train=y[:1])], model=bn)
    (linear,) = fit([FoldData(X_train=X[:1], y_train=y[:1])], model={"depth": 0, "batch_norm": True}, batch_size=1)
    assert linear.history.epochs_run == 5


def test_tensors_the_models_cannot_take_are_refused_by_name() -> None:
    X, y = blobs(32)
    classification = "classification"
    cases = [
        (
            [FoldData(X_train=X.double(), y_train=y)],
            classification,
            r"member 0's training inputs are torch.float64; .*\.float\(\)",
        ),
        (
            [FoldData(X_train=X, y_train=y.int())],
            classification,
            r"member 0's training targets are torch.int32; classification needs torch.int64 \(convert with \.long",
        ),
        (
            [FoldData(X_train=X, y_train=y, X_val=X, y_val=y.float())],
            classification,
            "member 0's validation targets are torch.float32",
        ),
        (
            [FoldData(X_train=X, y_train=y), FoldData(X_train=X[:, :3], y_train=y)],
            classification,
            r"member 1's training inputs have shape \(32, 3\); they need \[rows, 4\]",
        ),
        (
            [FoldData(X_train=X[0], y_train=y)],
            classification,
            r"member 0's training inputs have shape \(4,\); they need \[rows, features",
        ),
        ([], classification, "at least one member"),
        (
            [FoldData(X_train=X, y_train=y.float()[:, None])],
            "regression",
            r"member 0's training targets have shape \(32, 1\); they need one value per input row",
        ),
    ]
    for members, task, message in cases:
        with pytest.raises(ValueError, match=message):
            fit(members, task=task)


# -------------------------------------------------------------- reproducibility


def test_same_seed_gives_identical_histories_and_weights() -> None:
    model = {"depth": 2, "width": 16, "dropout": 0.2}
    folds = [classification_fold(), classification_fold(96)]
    first = fit(folds, model=model, seed=3, epochs=3)
    second = fit(folds, model=model, seed=3, epochs=3)
    for a, b in zip(first, second, strict=True):
        assert a.history.train_loss == b.history.train_loss
        assert a.history.val_loss == b.history.val_loss
        assert a.history.val_metric == b.history.val_metric
        assert state_equal(a.model, b.model)


def test_different_seed_gives_different_numbers() -> None:
    first = fit([classification_fold()], seed=0, epochs=2)[0]
    second = fit([classification_fold()], seed=1, epochs=2)[0]
    assert first.history.train_loss != second.history.train_loss
    assert not state_equal(first.model, second.model)


def test_fold_members_get_different_initial_weights() -> None:
    snapshots = Snapshots()
    fit([classification_fold(), classification_fold()], epochs=1, callbacks=[snapshots])
    first, second = snapshots.initial
    assert not torch.equal(first["blocks.0.linear.weight"], second["blocks.0.linear.weight"])


def test_a_member_trains_the_same_whatever_members_train_beside_it() -> None:
    alone = fit([classification_fold()], seed=5, epochs=2)[0]
    together = fit([classification_fold(), classification_fold(96)], seed=5, epochs=2)[0]
    assert alone.history.train_loss == together.history.train_loss
    assert state_equal(alone.model, together.model)


def test_training_does_not_disturb_the_global_random_state() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit([classification_fold()], epochs=1)
    torch.testing.assert_close(torch.rand(3), expected)


# ------------------------------------------------------------------ optimizers


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.1), ("momentum", 0.02), ("adam", 0.01), ("adamw", 0.01)])
def test_each_optimizer_learns(optimizer: str, lr: float) -> None:
    (member,) = fit([classification_fold()], optimizer=optimizer, lr=lr, epochs=6)
    assert member.history.train_loss[-1] < 0.6 * member.history.train_loss[0]


def test_optimizers_differ() -> None:
    losses = {
        optimizer: fit([classification_fold()], optimizer=optimizer, lr=0.01, epochs=2)[0].history.train_loss[-1]
        for optimizer in ("sgd", "momentum", "adam")
    }
    assert len(set(losses.values())) == 3


def test_make_optimizer_builds_the_named_optimizer_and_decays_weights_only() -> None:
    model = MLP(4, 2, hidden=(8,), batch_norm=True)
    for name, cls in (("sgd", torch.optim.SGD), ("momentum", torch.optim.SGD), ("adam", torch.optim.Adam)):
        assert type(make_optimizer(model, TrainingSpec(optimizer=name))) is cls  # type: ignore[arg-type]
    assert type(make_optimizer(model, TrainingSpec(optimizer="adamw"))) is torch.optim.AdamW
    momentum = make_optimizer(model, TrainingSpec(optimizer="momentum", momentum=0.8, lr=0.3))
    assert all(group["momentum"] == 0.8 and group["lr"] == 0.3 for group in momentum.param_groups)
    assert all(group["momentum"] == 0.0 for group in make_optimizer(model, TrainingSpec(optimizer="sgd")).param_groups)
    optimizer = make_optimizer(model, TrainingSpec(weight_decay=0.1))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    weights = {id(layer.weight) for layer in model.linear_layers()}
    assert decayed == weights  # no biases, no batch-norm scales
    all_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all_params == {id(p) for p in model.parameters()}


# -------------------------------------------------------------- regularisation


def test_l1_gives_more_near_zero_weights() -> None:
    # 20 noisy features of which 4 matter: least squares gives every weight some value,
    # an L1 penalty pushes the 16 irrelevant ones to (near) zero and keeps the 4.
    X, _ = linear_regression(64, n_features=20)
    y = X[:, :4].sum(dim=1) + 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(3))
    fold = FoldData(X_train=X, y_train=y)
    common: dict[str, Any] = {"task": "regression", "model": {"depth": 0}, "optimizer": "sgd", "lr": 0.01}
    plain = fit([fold], epochs=40, **common)[0].model
    sparse = fit([fold], epochs=40, l1=0.3, **common)[0].model
    plain_share = weight_stats(plain, near_zero=0.01)["output"]["near_zero_share"]
    sparse_share = weight_stats(sparse, near_zero=0.01)["output"]["near_zero_share"]
    assert sparse_share >= plain_share + 0.4
    assert float(sparse.output.weight.detach()[0, :4].abs().min()) > 0.5


def test_weight_decay_shrinks_the_weight_norm() -> None:
    common: dict[str, Any] = {"optimizer": "sgd", "lr": 0.05, "epochs": 8, "model": {"depth": 1, "width": 32}}
    plain = fit([classification_fold()], **common)[0].model
    decayed = fit([classification_fold()], weight_decay=0.5, **common)[0].model
    plain_norm = sum(s["sq_norm"] for s in weight_stats(plain).values())
    decayed_norm = sum(s["sq_norm"] for s in weight_stats(decayed).values())
    assert decayed_norm < 0.8 * plain_norm


# ------------------------------------------------------------------ clipping


def _one_sgd_step(grad_clip: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameter deltas of one full-batch SGD step (lr 1), and the gradients before clipping."""
    snapshots = Snapshots()
    grads = GradCapture()
    X, y = blobs(64)
    (member,) = fit(
        [FoldData(X_train=X * 10, y_train=y)],
        model={"depth": 1, "width": 16},
        optimizer="sgd",
        lr=1.0,
        epochs=1,
        batch_size=64,
        grad_clip=grad_clip,
        callbacks=[snapshots, grads],
    )
    final = member.model.state_dict()
    deltas = [final[k] - v for k, v in snapshots.initial[0].items()]
    return deltas, grads.grads


class GradCapture(Callback):
    wants_grads = True

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_grads_computed(self, member: int, model: MLP, epoch: int) -> None:
        self.grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])))


def test_without_clipping_the_step_is_the_full_gradient() -> None:
    deltas, grads = _one_sgd_step(None)
    assert _norm(deltas) == pytest.approx(_norm(grads), rel=1e-4)
    assert _norm(grads) > 0.5  # large enough that the clipping tests below clip


def test_grad_clip_by_norm_limits_the_total_step() -> None:
    deltas, grads = _one_sgd_step(0.1)
    assert _norm(grads) > 0.5
    assert _norm(deltas) == pytest.approx(0.1, rel=1e-3)


def test_grad_clip_by_value_limits_each_component() -> None:
    deltas, grads = _one_sgd_step({"kind": "value", "threshold": 0.01})
    assert max(float(g.abs().max()) for g in grads) > 0.01
    largest_step = max(float(d.abs().max()) for d in deltas)
    assert largest_step == pytest.approx(0.01, rel=1e-4)


# ------------------------------------------------------------ early stopping


def test_early_stopping_stops_and_restores_the_best_epoch() -> None:
    # Validation labels are the training labels flipped: learning makes validation worse,
    # so the best validation loss is at the first epoch.
    X, y = blobs(64)
    fold = FoldData(X_train=X, y_train=y, X_val=X.clone(), y_val=1 - y)
    snapshots = Snapshots()
    (member,) = fit([fold], epochs=20, lr=0.05, early_stopping={"patience": 2}, callbacks=[snapshots])
    history = member.history
    assert history.stopped_early
    assert history.best_epoch == 0 and history.final_epoch == 0
    assert history.epochs_run == 3  # the best epoch and `patience` epochs without improvement
    assert history.val_loss[1] > history.val_loss[0]
    best_weights = snapshots.after_epoch[history.best_epoch][0]
    assert all(torch.equal(member.model.state_dict()[k], v) for k, v in best_weights.items())
    assert not all(torch.equal(snapshots.after_epoch[-1][0][k], v) for k, v in best_weights.items())
    val_loss, _ = evaluate(member.model, fold.X_val, fold.y_val, task="classification")  # type: ignore[arg-type]
    assert val_loss == pytest.approx(history.val_loss[history.best_epoch])


def test_early_stopping_lets_other_members_finish() -> None:
    X, y = blobs(64)
    stopping = FoldData(X_train=X, y_train=y, X_val=X.clone(), y_val=1 - y)
    (stopped, learning) = fit(
        [stopping, classification_fold()], epochs=6, lr=0.05, early_stopping={"patience": 1, "min_delta": 0.0}
    )
    assert stopped.history.stopped_early and stopped.history.epochs_run == 2
    assert learning.history.epochs_run == 6 and not learning.history.stopped_early


def test_without_early_stopping_the_last_epoch_is_kept() -> None:
    X, y = blobs(64)
    fold = FoldData(X_train=X, y_train=y, X_val=X.clone(), y_val=1 - y)
    (member,) = fit([fold], epochs=4, lr=0.05)
    assert member.history.epochs_run == 4 and member.history.final_epoch == 3
    assert member.history.best_epoch == 0


# ---------------------------------------------------------------- divergence


def test_huge_learning_rate_diverges() -> None:
    with pytest.raises(Diverged) as info:
        fit([regression_fold()], task="regression", optimizer="sgd", lr=1e4, epochs=20)
    assert info.value.member == 0
    assert 0 <= info.value.epoch < 20
    assert "diverged" in str(info.value) and ("nan" in info.value.reason or "inf" in info.value.reason)


# ----------------------------------------------------------------- callbacks


class Recorder(Callback):
    wants_grads = True

    def __init__(self, *, raise_at_epoch: int | None = None) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.raise_at_epoch = raise_at_epoch

    def on_train_begin(self, models: Sequence[MLP]) -> None:
        self.events.append(("begin", len(models)))

    def on_grads_computed(self, member: int, model: MLP, epoch: int) -> None:
        assert model.output.weight.grad is not None
        self.events.append(("grads", member, epoch))

    def on_epoch_end(self, epoch: int, histories: Sequence[History]) -> None:
        self.events.append(("epoch", epoch, tuple(h.epochs_run for h in histories)))
        if epoch == self.raise_at_epoch:
            raise KeyboardInterrupt("stop here")


def test_callbacks_are_called_in_order_with_grads_once_per_epoch_per_member() -> None:
    recorder = Recorder()
    fit([classification_fold(), classification_fold(96)], epochs=3, batch_size=16, callbacks=[recorder])
    expected: list[tuple[Any, ...]] = [("begin", 2)]
    for epoch in range(3):
        expected += [("grads", 0, epoch), ("grads", 1, epoch), ("epoch", epoch, (epoch + 1, epoch + 1))]
    assert recorder.events == expected


def test_callbacks_without_wants_grads_get_no_gradient_calls() -> None:
    class Quiet(Recorder):
        wants_grads = False

    quiet = Quiet()
    fit([classification_fold()], epochs=2, callbacks=[quiet])
    assert [e[0] for e in quiet.events] == ["begin", "epoch", "epoch"]


def test_an_exception_from_a_callback_stops_training() -> None:
    recorder = Recorder(raise_at_epoch=1)
    with pytest.raises(KeyboardInterrupt, match="stop here"):
        fit([classification_fold()], epochs=10, callbacks=[recorder])
    assert [e for e in recorder.events if e[0] == "epoch"] == [("epoch", 0, (1,)), ("epoch", 1, (2,))]


def test_gradient_stats_records_each_layer_each_epoch() -> None:
    stats = GradientStats()
    fit([classification_fold(), classification_fold()], model={"depth": 2, "width": 8}, epochs=3, callbacks=[stats])
    assert set(stats.norms) == {0, 1}
    assert set(stats.norms[0]) == {"hidden1", "hidden2", "output"}
    assert all(len(v) == 3 and all(x > 0 for x in v) for v in stats.norms[1].values())
    mean = stats.fold_mean()
    for layer, values in mean.items():
        pairs = zip(stats.norms[0][layer], stats.norms[1][layer], strict=True)
        assert values == pytest.approx([(a + b) / 2 for a, b in pairs])


def test_an_interrupted_first_step_leaves_no_hook_on_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # The backward-signal hooks of the first step stayed on the layers a raising forward
    # pass had not reached (a model with a pending local hook cannot be pickled).
    import pickle

    from modelsel.models import HiddenBlock

    class Models(GradientStats):
        def on_train_begin(self, models: Sequence[MLP]) -> None:
            self.models = list(models)

    forward = HiddenBlock.forward
    blocks_run: list[int] = []

    def interrupted_in_the_second_block(block: HiddenBlock, x: torch.Tensor) -> torch.Tensor:
        blocks_run.append(1)
        if len(blocks_run) == 2:
            raise KeyboardInterrupt
        return forward(block, x)

    monkeypatch.setattr(HiddenBlock, "forward", interrupted_in_the_second_block)
    stats = Models()
    with pytest.raises(KeyboardInterrupt):
        fit([classification_fold()], model={"depth": 3, "width": 8}, callbacks=[stats])
    (model,) = stats.models
    assert not any(layer._forward_hooks for layer in model.linear_layers())
    pickle.dumps(model)
