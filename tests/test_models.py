"""Tests of modelsel.models: shapes, parameter counts, activations, inits, batch norm, residuals, dropout."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from modelsel.models import MLP, build_mlp, count_params, mlp_param_count
from modelsel.spec import ModelSpec


def model_spec(**fields: object) -> ModelSpec:
    return ModelSpec.model_validate(fields)


def hidden_output(model: MLP, index: int, x: torch.Tensor) -> torch.Tensor:
    """Output of hidden block ``index`` for input ``x`` (captured with a forward hook)."""
    captured: list[torch.Tensor] = []
    handle = model.blocks[index].register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_output_shape_and_layers_for_each_depth(depth: int) -> None:
    torch.manual_seed(0)
    model = build_mlp(model_spec(depth=depth, width=6), n_inputs=5, n_outputs=3)
    out = model(torch.randn(7, 5))
    assert out.shape == (7, 3)
    layers = list(model.linear_layers())
    assert len(layers) == depth + 1
    assert model.layer_names() == [f"hidden{i + 1}" for i in range(depth)] + ["output"]
    expected_in = [5] + [6] * depth
    expected_out = [6] * depth + [3]
    assert [layer.in_features for layer in layers] == expected_in
    assert [layer.out_features for layer in layers] == expected_out


def test_depth_zero_is_a_linear_model() -> None:
    torch.manual_seed(0)
    model = build_mlp(model_spec(depth=0), n_inputs=4, n_outputs=2)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), model.output(x))
    assert model.n_params == 4 * 2 + 2


def test_per_layer_widths() -> None:
    model = build_mlp(model_spec(depth=3, width=[32, 16, 8]), n_inputs=10, n_outputs=4)
    shapes = [tuple(layer.weight.shape) for layer in model.linear_layers()]
    assert shapes == [(32, 10), (16, 32), (8, 16), (4, 8)]
    assert model(torch.randn(2, 10)).shape == (2, 4)


def test_parameter_count_matches_a_hand_count() -> None:
    spec = model_spec(depth=1, width=256)
    # 784 * 256 weights + 256 biases + 256 * 10 weights + 10 biases
    assert mlp_param_count(spec, n_inputs=784, n_outputs=10) == 203_530
    assert build_mlp(spec, n_inputs=784, n_outputs=10).n_params == 203_530


@pytest.mark.parametrize(
    "fields",
    [
        {"depth": 0},
        {"depth": 1, "width": 7},
        {"depth": 3, "width": [9, 5, 3]},
        {"depth": 2, "width": 4, "batch_norm": True},
        {"depth": 3, "width": 6, "residual": True, "dropout": 0.3},
        {"depth": 2, "width": [8, 8], "batch_norm": True, "residual": True},
    ],
)
def test_mlp_param_count_equals_the_built_model(fields: dict[str, object]) -> None:
    spec = model_spec(**fields)
    model = build_mlp(spec, n_inputs=11, n_outputs=3)
    assert mlp_param_count(spec, n_inputs=11, n_outputs=3) == count_params(model) == model.n_params
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_batch_norm_replaces_each_hidden_bias_by_a_scale_and_a_shift() -> None:
    # The linear layer before a batch norm has no bias: the norm's shift does its job.
    plain = mlp_param_count(model_spec(depth=2, width=[8, 4]), n_inputs=5, n_outputs=2)
    normed = mlp_param_count(model_spec(depth=2, width=[8, 4], batch_norm=True), n_inputs=5, n_outputs=2)
    assert normed - plain == 8 + 4
    built = build_mlp(model_spec(depth=2, width=[8, 4], batch_norm=True), n_inputs=5, n_outputs=2)
    assert built.n_params == normed
    assert all(block.linear.bias is None for block in built.blocks)


_ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


@pytest.mark.parametrize("activation", sorted(_ACTIVATION_FUNCTIONS))
def test_each_activation_is_applied_after_each_hidden_layer(activation: str) -> None:
    torch.manual_seed(0)
    model = build_mlp(model_spec(depth=2, width=6, activation=activation), n_inputs=4, n_outputs=3)
    x = torch.randn(5, 4) * 3
    act = _ACTIVATION_FUNCTIONS[activation]
    hidden1, hidden2 = (block.linear for block in model.blocks)
    expected = model.output(act(hidden2(act(hidden1(x)))))
    torch.testing.assert_close(model(x), expected)


def _weight_stds(model: MLP) -> list[tuple[float, int, int]]:
    return [
        (float(layer.weight.detach().std()), layer.in_features, layer.out_features)
        for layer in model.linear_layers()
    ]


@pytest.mark.parametrize(
    ("init", "activation", "expected_std"),
    [
        ("xavier_uniform", "relu", lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))),
        ("xavier_normal", "tanh", lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))),
        ("kaiming_uniform", "relu", lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
        ("kaiming_normal", "relu", lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
        ("kaiming_normal", "tanh", lambda fan_in, fan_out: (5 / 3) / math.sqrt(fan_in)),
        ("kaiming_uniform", "sigmoid", lambda fan_in, fan_out: 1 / math.sqrt(fan_in)),
    ],
)
def test_init_gives_the_documented_weight_std_and_zero_biases(
    init: str, activation: str, expected_std: Callable[[int, int], float]
) -> None:
    torch.manual_seed(0)
    model = build_mlp(
        model_spec(depth=2, width=[400, 300], activation=activation, init=init), n_inputs=200, n_outputs=100
    )
    *hidden, (output_std, output_fan_in, _) = _weight_stds(model)
    for std, fan_in, fan_out in hidden:
        assert std == pytest.approx(expected_std(fan_in, fan_out), rel=0.05)
    # The output layer feeds no nonlinearity: Kaiming uses the linear gain (1) there.
    if init.startswith("kaiming"):
        assert output_std == pytest.approx(1 / math.sqrt(output_fan_in), rel=0.05)
    else:
        assert output_std == pytest.approx(expected_std(output_fan_in, 100), rel=0.05)
    for layer in model.linear_layers():
        assert torch.count_nonzero(layer.bias) == 0


def test_default_init_is_pytorch_linear_default() -> None:
    # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    torch.manual_seed(0)
    model = build_mlp(model_spec(depth=1, width=400), n_inputs=300, n_outputs=50)
    for std, fan_in, _ in _weight_stds(model):
        assert std == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
    first = model.blocks[0].linear
    assert torch.count_nonzero(first.bias) == first.bias.numel()
    assert float(first.bias.detach().abs().max()) <= 1 / math.sqrt(300)


def test_inits_differ_from_each_other() -> None:
    stds = {}
    for init in ("default", "xavier_normal", "kaiming_normal"):
        torch.manual_seed(0)
        model = build_mlp(model_spec(depth=1, width=300, init=init), n_inputs=300, n_outputs=10)
        stds[init] = float(model.blocks[0].linear.weight.detach().std())
    assert len({round(s, 3) for s in stds.values()}) == 3


def test_batch_norm_normalizes_hidden_units_in_train_mode() -> None:
    torch.manual_seed(0)
    model = build_mlp(model_spec(depth=1, width=16, batch_norm=True, activation="tanh"), n_inputs=5, n_outputs=2)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 1 and norms[0].num_features == 16
    block = model.blocks[0]
    x = torch.randn(64, 5) * 10 + 3
    captured: list[torch.Tensor] = []
    handle = block.norm.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    model.train()
    model(x)
    handle.remove()
    normalized = captured[0]
    torch.testing.assert_close(normalized.mean(dim=0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized.std(dim=0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    assert norms[0].num_batches_tracked.item() == 1
    model.eval()
    assert model(torch.randn(1, 5)).shape == (1, 2)  # eval mode uses running statistics


def test_no_batch_norm_layers_unless_asked() -> None:
    model = build_mlp(model_spec(depth=3, width=8), n_inputs=5, n_outputs=2)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())


def test_residual_links_only_between_equal_widths() -> None:
    torch.manual_seed(0)
    model = build_mlp(
        model_spec(depth=4, width=[8, 8, 4, 4], residual=True, activation="tanh"), n_inputs=5, n_outputs=2
    )
    assert [block.residual for block in model.blocks] == [False, True, False, True]
    x = torch.randn(3, 5)
    h1 = hidden_output(model, 0, x)
    torch.testing.assert_close(h1, torch.tanh(model.blocks[0].linear(x)))
    h2 = hidden_output(model, 1, x)
    torch.testing.assert_close(h2, h1 + torch.tanh(model.blocks[1].linear(h1)))
    h3 = hidden_output(model, 2, x)
    torch.testing.assert_close(h3, torch.tanh(model.blocks[2].linear(h2)))


def test_no_residual_link_from_the_input_into_the_first_hidden_layer() -> None:
    model = build_mlp(model_spec(depth=2, width=5, residual=True), n_inputs=5, n_outputs=2)
    assert [block.residual for block in model.blocks] == [False, True]


def test_no_residual_links_unless_asked() -> None:
    model = build_mlp(model_spec(depth=3, width=8), n_inputs=8, n_outputs=2)
    assert not any(block.residual for block in model.blocks)


def test_dropout_is_active_in_train_mode_only() -> None:
    torch.manual_seed(0)
    model = build_mlp(model_spec(depth=1, width=256, dropout=0.5, activation="sigmoid"), n_inputs=4, n_outputs=2)
    x = torch.randn(32, 4)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    eval_hidden = hidden_output(model, 0, x)
    assert torch.count_nonzero(eval_hidden) == eval_hidden.numel()  # sigmoid is never exactly 0
    model.train()
    train_hidden = hidden_output(model, 0, x)
    zero_share = float((train_hidden == 0).float().mean())
    assert 0.4 < zero_share < 0.6
    kept = train_hidden != 0
    torch.testing.assert_close(train_hidden[kept], eval_hidden[kept] * 2)  # inverted dropout scaling
    assert not torch.equal(model(x), model(x))


def test_zero_dropout_adds_no_randomness() -> None:
    torch.manual_seed(0)
    model = build_mlp(model_spec(depth=2, width=16), n_inputs=4, n_outputs=2)
    model.train()
    x = torch.randn(8, 4)
    torch.testing.assert_close(model(x), model(x))
