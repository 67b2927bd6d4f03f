"""Gradient and weight diagnostics: vanishing/exploding gradients and what L2/L1 do to weights."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence

import torch

from modelsel.models import MLP
from modelsel.training import Callback


class GradientStats(Callback):
    """Records the L2 norm of each linear layer's weight gradient, and of the loss's
    gradient with respect to each layer's output (the backward signal), once per epoch
    per member.

    The first batch of each epoch is measured (before clipping), at the cost of one small
    reduction per layer per epoch. The first epoch's, before any update, shows how the
    gradient flows through the initialized net (vanishing in the early layers of a deep
    sigmoid net); a learning rate too large blows up within an epoch, between two such
    measurements, and shows as a diverged trial instead (see
    :func:`modelsel.regimes.gradient_flow`).
    """

    wants_grads = True

    def __init__(self) -> None:
        # member -> layer name -> per-epoch norm
        self.norms: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.preactivation_norms: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def on_grads_computed(self, member: int, model: MLP, epoch: int) -> None:
        grads = [layer.weight.grad for layer in model.linear_layers()]
        values = torch.stack(
            [g.norm() if g is not None else torch.zeros((), device=model.output.weight.device) for g in grads]
        ).tolist()
        for name, value in zip(model.layer_names(), values, strict=False):
            self.norms[member][name].append(float(value))

    def on_preactivation_grads(self, member: int, model: MLP, epoch: int, norms: Sequence[float]) -> None:
        for name, value in zip(model.layer_names(), norms, strict=True):
            self.preactivation_norms[member][name].append(float(value))

    def fold_mean(self, *, preactivation: bool = False) -> dict[str, list[float]]:
        """Per-layer, per-epoch gradient norm averaged over members: of each layer's
        weights, or with ``preactivation`` of the loss with respect to each layer's output
        (:meth:`~modelsel.training.Callback.on_preactivation_grads`)."""
        layers: dict[str, list[list[float]]] = defaultdict(list)
        for per_layer in (self.preactivation_norms if preactivation else self.norms).values():
            for name, values in per_layer.items():
                layers[name].append(values)
        result = {}
        for name, series in layers.items():
            length = max(len(s) for s in series)
            result[name] = [
                statistics.fmean(s[min(epoch, len(s) - 1)] for s in series) for epoch in range(length)
            ]
        return result


def weight_stats(model: MLP, *, near_zero: float = 1e-3) -> dict[str, dict[str, float]]:
    """Per linear layer: squared L2 norm of the weights and the share of near-zero weights.

    Parameters
    ----------
    model
        A trained MLP.
    near_zero
        Absolute value under which a weight counts as zero (what an L1 penalty produces).
    """
    stats = {}
    with torch.no_grad():
        for name, layer in zip(model.layer_names(), model.linear_layers(), strict=False):
            weight = layer.weight
            stats[name] = {
                "sq_norm": float(weight.pow(2).sum()),
                "near_zero_share": float((weight.abs() < near_zero).float().mean()),
            }
    return stats


def mean_weight_stats(models: Sequence[MLP], *, near_zero: float = 1e-3) -> dict[str, dict[str, float]]:
    """:func:`weight_stats` averaged over several models of one architecture (e.g. CV folds)."""
    per_model = [weight_stats(m, near_zero=near_zero) for m in models]
    return {
        layer: {key: statistics.fmean(s[layer][key] for s in per_model) for key in per_model[0][layer]}
        for layer in per_model[0]
    }

