"""Gradient and weight diagnostics: what GradientStats records and what weight_stats reports."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from modelsel.diagnostics import GradientStats, mean_weight_stats, weight_stats
from modelsel.engines import train_models
from modelsel.models import build_mlp
from modelsel.spec import ModelSpec, TrainingSpec
from modelsel.training import FoldData


def _model(depth: int = 2, width: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mlp(ModelSpec(depth=depth, width=width), n_inputs=3, n_outputs=2)


def test_gradient_stats_record_each_layers_norm_at_the_first_batch_of_each_epoch() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=gen)
    y = (X[:, 0] > 0).long()
    folds = [FoldData(X[:48], y[:48], X[48:], y[48:]), FoldData(X[16:], y[16:], X[:16], y[:16])]
    stats = GradientStats()
    training = TrainingSpec(epochs=3, batch_size=16, lr=0.1, optimizer="sgd", engine="sequential")
    train_models(
        folds, model_spec=ModelSpec(depth=2, width=4), training=training, task="classification",
        n_outputs=2, seed=0, callbacks=[stats],
    )
    means = stats.fold_mean()
    assert list(means) == ["hidden1", "hidden2", "output"]
    assert all(len(per_epoch) == 3 for per_epoch in means.values())  # one norm per epoch
    assert all(value > 0 and math.isfinite(value) for per_epoch in means.values() for value in per_epoch)
    # The fold mean of each member's own record.
    for layer, per_epoch in means.items():
        pairs = zip(stats.norms[0][layer], stats.norms[1][layer], strict=True)
        assert per_epoch == pytest.approx([(a + b) / 2 for a, b in pairs])


class _InitialModels(GradientStats):
    def on_train_begin(self, models: object) -> None:
        self.initial = [copy.deepcopy(m) for m in models]  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", ["sequential", "stacked"])
@pytest.mark.parametrize(
    "model",
    [
        {"depth": 3, "width": 8, "activation": "relu"},
        {"depth": 3, "width": 8, "activation": "sigmoid", "residual": True},
        {"depth": 2, "width": 8, "activation": "tanh", "batch_norm": True},
    ],
)
def test_preactivation_grads_are_the_loss_gradient_at_each_layers_output(engine: str, model: dict[str, object]) -> None:
    """With one batch of the whole fold, the first batch's backward signal is the norm of the
    mean loss's gradient with respect to each linear layer's output, order aside."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, generator=gen)
    y = (X[:, 0] + X[:, 1] > 0).long()
    folds = [FoldData(X[:30], y[:30], X[30:], y[30:]), FoldData(X[10:], y[10:], X[:10], y[:10])]
    stats = _InitialModels()
    training = TrainingSpec(epochs=1, batch_size=64, lr=0.1, optimizer="sgd", engine=engine)  # type: ignore[arg-type]
    train_models(
        folds, model_spec=ModelSpec(**model), training=training, task="classification",  # type: ignore[arg-type]
        n_outputs=2, seed=0, callbacks=[stats],
    )
    for member, (initial, fold) in enumerate(zip(stats.initial, folds, strict=True)):
        outputs: list[torch.Tensor] = []

        def keep(module: object, inputs: object, output: torch.Tensor, outputs: list[torch.Tensor] = outputs) -> None:
            output.retain_grad()
            outputs.append(output)

        for layer in initial.linear_layers():
            layer.register_forward_hook(keep)
        initial.train()
        torch.nn.functional.cross_entropy(initial(fold.X_train), fold.y_train).backward()
        expected = [float(output.grad.norm()) for output in outputs]
        caught = [stats.preactivation_norms[member][name][0] for name in initial.layer_names()]
        assert caught == pytest.approx(expected, rel=1e-4)
    assert list(stats.fold_mean(preactivation=True)) == stats.initial[0].layer_names()


def test_fold_mean_carries_a_member_that_stopped_early_at_its_last_epoch() -> None:
    stats = GradientStats()
    stats.norms[0]["output"].extend([1.0, 2.0, 3.0])
    stats.norms[1]["output"].extend([3.0])  # early stopping ended it after one epoch
    assert stats.fold_mean() == {"output": [2.0, 2.5, 3.0]}


def test_weight_stats_give_the_squared_norm_and_the_share_of_near_zero_weights() -> None:
    model = _model(depth=1, width=4)
    with torch.no_grad():
        for layer in model.linear_layers():
            layer.weight.fill_(0.5)
        model.output.weight[0].zero_()  # 4 of the output layer's 8 weights are zero
    stats = weight_stats(model)
    assert stats["hidden1"] == {"sq_norm": pytest.approx(12 * 0.25), "near_zero_share": 0.0}
    assert stats["output"] == {"sq_norm": pytest.approx(4 * 0.25), "near_zero_share": 0.5}
    assert weight_stats(model, near_zero=1.0)["hidden1"]["near_zero_share"] == 1.0


def test_mean_weight_stats_average_over_models() -> None:
    first, second = _model(depth=1), _model(depth=1)
    with torch.no_grad():
        for layer in first.linear_layers():
            layer.weight.fill_(1.0)
        for layer in second.linear_layers():
            layer.weight.zero_()
    mean = mean_weight_stats([first, second])
    assert mean["hidden1"] == {"sq_norm": pytest.approx(6.0), "near_zero_share": 0.5}  # (12 + 0) / 2
    assert mean["output"] == {"sq_norm": pytest.approx(4.0), "near_zero_share": 0.5}
