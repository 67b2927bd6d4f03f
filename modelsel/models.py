"""The multilayer perceptron: built from a :class:`~modelsel.spec.ModelSpec`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from modelsel.spec import ModelSpec

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

# Nonlinearity names torch.nn.init.calculate_gain knows, for Kaiming init.
_KAIMING_NONLINEARITY: dict[str, Literal["relu", "leaky_relu", "tanh", "sigmoid", "linear"]] = {
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "elu": "relu",
    "gelu": "relu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "linear": "linear",
}


class HiddenBlock(nn.Module):
    """Linear → (batch norm) → activation → (dropout), with an optional residual link."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        activation: str,
        dropout: float,
        batch_norm: bool,
        residual: bool,
    ) -> None:
        super().__init__()
        # Batch norm subtracts each unit's batch mean: a bias before it would be a parameter
        # with a true gradient of exactly zero, which Adam turns into steps from rounding noise.
        self.linear = nn.Linear(n_in, n_out, bias=not batch_norm)
        self.norm: nn.Module = nn.BatchNorm1d(n_out) if batch_norm else nn.Identity()
        self.activation = _ACTIVATIONS[activation]()
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Residual links only join layers of equal width.
        self.residual = residual and n_in == n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.activation(self.norm(self.linear(x))))
        return x + h if self.residual else h


class MLP(nn.Module):
    """A multilayer perceptron: ``depth`` hidden blocks then a linear output layer.

    Parameters
    ----------
    n_inputs, n_outputs
        Feature count and output count (classes, or 1 for regression).
    hidden
        Width of each hidden layer; empty for a linear model.
    activation, dropout, batch_norm, residual, init
        As in :class:`~modelsel.spec.ModelSpec`.
    """

    def __init__(
        self,
        n_inputs: int,
        n_outputs: int,
        *,
        hidden: tuple[int, ...] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        residual: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__()
        widths = (n_inputs, *hidden)
        self.blocks = nn.ModuleList(
            HiddenBlock(
                n_in,
                n_out,
                activation=activation,
                dropout=dropout,
                batch_norm=batch_norm,
                # Links join hidden layers only, never the input to the first hidden layer.
                residual=residual and index > 0,
            )
            for index, (n_in, n_out) in enumerate(itertools.pairwise(widths))
        )
        self.output = nn.Linear(widths[-1], n_outputs)
        if init != "default":
            for block in self.blocks:
                assert isinstance(block, HiddenBlock)
                _init_linear(block.linear, init, activation)
            # The output layer feeds no nonlinearity: Kaiming uses the linear gain there.
            _init_linear(self.output, init, "linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.output(x)

    def linear_layers(self) -> Iterator[nn.Linear]:
        """The linear layers from input to output."""
        for block in self.blocks:
            assert isinstance(block, HiddenBlock)
            yield block.linear
        yield self.output

    def layer_names(self) -> list[str]:
        """Readable names of the linear layers (``hidden1`` … ``output``)."""
        return [f"hidden{i + 1}" for i in range(len(self.blocks))] + ["output"]

    @property
    def n_params(self) -> int:
        """Number of trainable parameters."""
        return count_params(self)


def _init_linear(layer: nn.Linear, init: str, activation: str) -> None:
    if init == "xavier_uniform":
        nn.init.xavier_uniform_(layer.weight)
    elif init == "xavier_normal":
        nn.init.xavier_normal_(layer.weight)
    elif init == "kaiming_uniform":
        nn.init.kaiming_uniform_(layer.weight, nonlinearity=_KAIMING_NONLINEARITY[activation])
    elif init == "kaiming_normal":
        nn.init.kaiming_normal_(layer.weight, nonlinearity=_KAIMING_NONLINEARITY[activation])
    else:
        raise ValueError(f"unknown init '{init}'")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def build_mlp(spec: ModelSpec, *, n_inputs: int, n_outputs: int) -> MLP:
    """Build the MLP a model spec describes.

    Parameters
    ----------
    spec
        Depth, width(s), activation, dropout, batch norm, residual links and init.
    n_inputs, n_outputs
        Sizes of the input features and of the output layer.

    Returns
    -------
    MLP
        A freshly initialised model (use ``torch.manual_seed`` before for reproducibility).
    """
    return MLP(
        n_inputs,
        n_outputs,
        hidden=spec.hidden_widths(),
        activation=spec.activation,
        dropout=spec.dropout,
        batch_norm=spec.batch_norm,
        residual=spec.residual,
        init=spec.init,
    )


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mlp_param_count(spec: ModelSpec, *, n_inputs: int, n_outputs: int) -> int:
    """Parameter count of the MLP ``spec`` describes, without building it."""
    widths = (n_inputs, *spec.hidden_widths())
    total = sum(a * b for a, b in itertools.pairwise(widths))
    # Each hidden unit has a bias, or with batch norm (whose shift replaces it) a scale and a shift.
    total += (2 if spec.batch_norm else 1) * sum(widths[1:])
    return total + widths[-1] * n_outputs + n_outputs
