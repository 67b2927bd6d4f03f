"""The training engine: k models trained side by side on tensors held in memory.

All members (usually the k fold models of one trial) advance one epoch at a time, so
after every epoch the exact fold-mean validation value exists and can be reported to
an Optuna pruner. Batches are slices of a shuffled index into tensors that already sit
on the device; no per-sample Python runs on the hot loop.

Two engines run the members (``training.engine``, resolved by :func:`choose_engine`):

``sequential``
    One :class:`~modelsel.models.MLP` per member, stepped one after another: the
    reference path. The hot loop gathers a chunk of shuffled rows with one
    ``index_select`` and slices batches from it, drops gradients by setting them to
    ``None``, accumulates loss and accuracy on the device (one sync per epoch), and uses
    the fused single-kernel optimizer with one parameter group when there is no weight
    decay. Evaluation runs under ``inference_mode``; inputs never require gradients.
``stacked``
    All members as one batched model (:mod:`modelsel.stacked`): one ``baddbmm`` per
    layer for every member, one optimizer update over a flat ``[members, params]``
    tensor. Same initial weights and batches, so the results match the sequential
    engine to float rounding (dropout masks aside).

bf16 autocast was measured and left out: on this project's CPU (AVX2, no AVX512-BF16)
it made the D2L MLP's step 3.5x slower (10k vs 36k samples per CPU-second) for the
same accuracy, and on an H100 it was slower too (stacked, batch 256: 0.70M vs 0.90M
samples/s; sequential 0.25M vs 0.27M), since these small steps are launch-bound there;
TF32 changed nothing measurable once the stacked step runs as a CUDA graph. CPUs with
AVX512-BF16/AMX were not available to measure.

Callbacks (as in skorch) plug in pruning, gradient diagnostics and progress without
touching the loop: see :class:`Callback`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from modelsel.models import MLP, build_mlp
from modelsel.spec import EarlyStoppingSpec, ModelSpec, TrainingSpec

Task = Literal["classification", "regression"]
#: Rows per evaluation forward pass. On CPU, chunks whose activations stay in cache: on
#: the 2-core EPYC, evaluating a 784-256-10 MLP on 48k rows took 170-180 ms at 256-1024
#: rows and 323 ms at 8192 (2 threads). On CUDA, big chunks: fewer launches.
_EVAL_BATCH_CPU = 1024
_EVAL_BATCH_CUDA = 8192
#: Bytes of shuffled input rows gathered at once (see ``_run_epoch``): a whole epoch of
#: small inputs (digits: 1,150 x 64 floats), a few batches of large ones (Fashion-MNIST).
GATHER_BYTES = 2 << 20


@dataclass(frozen=True)
class TrainSource:
    """The tensors a fold's training rows are taken from, and which rows (see :class:`FoldData`)."""

    X: torch.Tensor
    y: torch.Tensor
    rows: torch.Tensor


class FoldData:
    """Training and (optional) validation tensors of one member, on any device.

    The training split is given either as tensors (``X_train``, ``y_train``) or as rows
    of larger tensors (``source``: ``X_train`` is ``source.X[source.rows]`` and
    ``y_train`` is ``source.y[source.rows]``, value for value). A fold given only by its
    source holds no copy of its training rows: the engines gather its batches and its
    evaluation passes from the source (so the k folds of a dataset cost no copy of their
    training rows at all), and the stacked engine gathers the batches of every member
    whose folds share a source with one call. Reading ``X_train`` or ``y_train`` of such
    a fold makes a copy each time. Both may be given: the engines then gather from the
    source (the same values), and ``X_train`` returns the tensor given.

    Raises
    ------
    ValueError
        When neither the training tensors nor a source are given.
    """

    def __init__(
        self,
        X_train: torch.Tensor | None = None,
        y_train: torch.Tensor | None = None,
        X_val: torch.Tensor | None = None,
        y_val: torch.Tensor | None = None,
        *,
        source: TrainSource | None = None,
    ) -> None:
        if (X_train is None or y_train is None) and source is None:
            raise ValueError("FoldData needs X_train and y_train, or a source")
        self._X_train = X_train
        self._y_train = y_train
        self.X_val = X_val
        self.y_val = y_val
        self.source = source

    @property
    def X_train(self) -> torch.Tensor:  # noqa: N802 (the name of the sklearn convention, as the argument)
        """The training inputs (a fresh copy for a fold given only by its source)."""
        if self._X_train is not None:
            return self._X_train
        assert self.source is not None
        return self.source.X.index_select(0, self.source.rows)

    @property
    def y_train(self) -> torch.Tensor:
        """The training targets (a fresh copy for a fold given only by its source)."""
        if self._y_train is not None:
            return self._y_train
        assert self.source is not None
        return self.source.y.index_select(0, self.source.rows)

    @property
    def n_train(self) -> int:
        """Training samples."""
        X, _, rows = self.training_rows()
        return int(X.shape[0] if rows is None else rows.shape[0])

    @property
    def n_inputs(self) -> int:
        """Input features."""
        X, _, _ = self.training_rows()
        return int(X.shape[1])

    def training_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(X, y, rows)``: the training split is ``X[rows]``, ``y[rows]`` (all of ``X``
        and ``y`` when ``rows`` is None). Gathering shuffled batches from these gives the
        same values as gathering them from ``X_train``, without its copy."""
        if self.source is not None:
            return self.source.X, self.source.y, self.source.rows
        assert self._X_train is not None and self._y_train is not None
        return self._X_train, self._y_train, None


@dataclass
class History:
    """Per-epoch curves of one trained member.

    ``*_metric`` is accuracy for classification and RMSE for regression. The running
    train values are means over the epoch's batches (dropout on), unless the training
    spec asks for ``train_metrics: full``. ``final_train_*`` always come from a full
    evaluation pass in eval mode over the training data at the end.
    """

    train_loss: list[float] = field(default_factory=list)
    train_metric: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_metric: list[float] = field(default_factory=list)
    best_epoch: int = -1
    final_epoch: int = -1
    stopped_early: bool = False
    final_train_loss: float = math.nan
    final_train_metric: float = math.nan
    fit_seconds: float = 0.0

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)


@dataclass
class TrainedMember:
    """A trained model with its history."""

    model: MLP
    history: History


class Diverged(Exception):
    """Training produced a non-finite loss."""

    def __init__(self, member: int, epoch: int, reason: str) -> None:
        super().__init__(f"member {member} diverged at epoch {epoch + 1}: {reason}")
        self.member = member
        self.epoch = epoch
        self.reason = reason


class Callback:
    """Hooks into the training loop; subclass and override what you need.

    Exceptions raised by a hook (e.g. ``optuna.TrialPruned``) stop training and propagate.
    """

    #: Set to True to receive :meth:`on_grads_computed` (costs a little per epoch).
    wants_grads: bool = False

    def on_train_begin(self, models: Sequence[MLP]) -> None:
        """Called once, after the models are built."""

    def on_grads_computed(self, member: int, model: MLP, epoch: int) -> None:
        """Called after ``backward`` of the first batch of each epoch, before clipping."""

    def on_preactivation_grads(self, member: int, model: MLP, epoch: int, norms: Sequence[float]) -> None:
        """Called with :meth:`on_grads_computed`: per linear layer (input to output), the L2
        norm of the loss's gradient with respect to that layer's output (its pre-activation,
        before batch norm), over the first batch: the backward signal each layer receives."""

    def on_epoch_end(self, epoch: int, histories: Sequence[History]) -> None:
        """Called when every active member has finished ``epoch`` (0-based)."""


def resolve_device(device: str) -> torch.device:
    """Turn ``auto|cpu|cuda`` into a torch device (``auto``: CUDA when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(device)


def describe_device(device: torch.device) -> str:
    """``cpu``, or a CUDA device with its name (``cuda:0 (NVIDIA H100 80GB HBM3)``)."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def member_seed(seed: int, member: int) -> int:
    """Seed of member ``member``: independent of how many members train together."""
    return (seed * 1_000_003 + member * 7919 + 17) % (2**62)


def make_optimizer(model: nn.Module, training: TrainingSpec) -> torch.optim.Optimizer:
    """The optimizer the training spec names; weight decay applies to weights, not biases.

    One parameter group when ``weight_decay`` is 0 (two groups make Adam run its update
    twice per step), and the fused single-kernel implementation where this torch has one
    for the device (CPU and CUDA in torch >= 2.4), else the multi-tensor one.
    """
    params = list(model.parameters())
    groups: list[dict[str, Any]]
    if training.weight_decay > 0:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in model.named_parameters():
            is_weight = name.endswith("weight") and param.ndim >= 2
            (decay if is_weight else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": training.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": 0.0}]
    device_type = params[0].device.type if params else "cpu"
    if device_type in ("cpu", "cuda"):
        try:
            return _optimizer(groups, training, fused=True)
        except (RuntimeError, ValueError, TypeError):  # no fused kernel in this torch for this device
            pass
    return _optimizer(groups, training, fused=False)


def _optimizer(groups: list[dict[str, Any]], training: TrainingSpec, *, fused: bool) -> torch.optim.Optimizer:
    fused_flag = True if fused else None
    foreach_flag = None if fused else True
    if training.optimizer in ("sgd", "momentum"):
        momentum = training.momentum if training.optimizer == "momentum" else 0.0
        return torch.optim.SGD(groups, lr=training.lr, momentum=momentum, fused=fused_flag, foreach=foreach_flag)
    if training.optimizer == "adam":
        return torch.optim.Adam(groups, lr=training.lr, fused=fused_flag, foreach=foreach_flag)
    return torch.optim.AdamW(groups, lr=training.lr, fused=fused_flag, foreach=foreach_flag)


def stop_index(n: int, batch_size: int, *, batch_norm: bool) -> int:
    """Samples a member trains on per epoch: all ``n``, except that batch norm cannot
    train on a last batch of one sample, which is then dropped."""
    batch = min(batch_size, n)
    return n - 1 if (batch_norm and n % batch == 1) else n


def loss_function(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for regression."""
    if task == "classification":
        return F.cross_entropy(output, target)
    return F.mse_loss(output.squeeze(-1), target)


@torch.inference_mode()
def evaluate(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, task: Task, rows: torch.Tensor | None = None
) -> tuple[float, float]:
    """Loss and metric (accuracy, or RMSE for regression) of ``model`` on ``(X, y)`` in eval mode.

    With ``rows``, on ``(X[rows], y[rows])``, gathered a chunk at a time (the same
    numbers, without a copy of those rows).
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=X.device)
    correct = torch.zeros((), device=X.device, dtype=torch.int64)
    chunk = _EVAL_BATCH_CPU if X.device.type == "cpu" else _EVAL_BATCH_CUDA
    n = X.shape[0] if rows is None else rows.shape[0]
    for start in range(0, n, chunk):
        if rows is None:
            xb, yb = X[start : start + chunk], y[start : start + chunk]
        else:
            index = rows[start : start + chunk]
            xb, yb = X.index_select(0, index), y.index_select(0, index)
        out = model(xb)
        if task == "classification":
            loss_sum += F.cross_entropy(out, yb, reduction="sum")
            correct += (out.argmax(dim=1) == yb).sum()
        else:
            loss_sum += F.mse_loss(out.squeeze(-1), yb, reduction="sum")
    model.train(was_training)
    loss = loss_sum.item() / n
    metric = correct.item() / n if task == "classification" else math.sqrt(loss)
    return loss, metric


def _l1_penalty(model: MLP) -> torch.Tensor:
    return torch.stack([layer.weight.abs().sum() for layer in model.linear_layers()]).sum()


class _Member:
    """Mutable training state of one member."""

    def __init__(
        self, index: int, data: FoldData, model: MLP, training: TrainingSpec, *, shuffle_seed: int
    ) -> None:
        self.index = index
        self.data = data
        self.model = model
        self.params = list(model.parameters())
        self.batch_norm = has_batch_norm(model)
        self.optimizer = make_optimizer(model, training)
        self.generator = torch.Generator().manual_seed(shuffle_seed)
        self.history = History()
        self.active = True
        self.best = BestEpoch()
        self.best_state: dict[str, torch.Tensor] | None = None


def check_members(members: Sequence[FoldData], *, task: Task) -> None:
    """Check that the members' tensors are what the models take.

    Raises
    ------
    ValueError
        Naming the member, the tensor and the fix: inputs must be 2-D float32 with
        the same number of columns in every member, targets 1-D, one per input row,
        int64 class indices for classification and float32 for regression.
    """
    if not members:
        raise ValueError("train_models needs at least one member")
    target_dtype = torch.int64 if task == "classification" else torch.float32
    fix = {torch.float32: ".float()", torch.int64: ".long()"}
    first_inputs = members[0].training_rows()[0]
    n_inputs = int(first_inputs.shape[1]) if first_inputs.dim() == 2 else -1
    for index, data in enumerate(members):
        X, y, _ = data.training_rows()
        pairs = [("training", X, y)]
        if data.X_val is not None and data.y_val is not None:
            pairs.append(("validation", data.X_val, data.y_val))
        for split, inputs, targets in pairs:
            where = f"member {index}'s {split}"
            if inputs.dtype != torch.float32:
                raise ValueError(f"{where} inputs are {inputs.dtype}; the models take float32 (convert with .float())")
            if inputs.dim() != 2 or inputs.shape[1] != n_inputs:
                wanted = f"[rows, {n_inputs}] like member 0's" if n_inputs > 0 else "[rows, features]"
                raise ValueError(f"{where} inputs have shape {tuple(inputs.shape)}; they need {wanted}")
            if targets.dtype != target_dtype:
                raise ValueError(
                    f"{where} targets are {targets.dtype}; {task} needs {target_dtype} "
                    f"(convert with {fix[target_dtype]})"
                )
            if targets.dim() != 1 or targets.shape[0] != inputs.shape[0]:
                raise ValueError(
                    f"{where} targets have shape {tuple(targets.shape)}; they need one value per input row "
                    f"([{inputs.shape[0]}])"
                )


def train_sequential(
    members: Sequence[FoldData],
    *,
    model_spec: ModelSpec,
    training: TrainingSpec,
    task: Task,
    n_outputs: int,
    seed: int,
    callbacks: Sequence[Callback],
    device: torch.device,
) -> list[TrainedMember]:
    """The sequential engine: each member is its own MLP; all advance one epoch at a time
    (the members as :func:`modelsel.engines.train_models` checked them)."""
    n_inputs = members[0].n_inputs
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        states: list[_Member] = []
        for index, data in enumerate(members):
            torch.manual_seed(member_seed(seed, index))
            model = build_mlp(model_spec, n_inputs=n_inputs, n_outputs=n_outputs).to(device)
            shuffle_seed = member_seed(seed + 1, index)
            states.append(_Member(index, data, model, training, shuffle_seed=shuffle_seed))
        torch.manual_seed(seed)
        for callback in callbacks:
            callback.on_train_begin([s.model for s in states])
        grad_callbacks = [c for c in callbacks if c.wants_grads]
        for epoch in range(training.epochs):
            for state in states:
                if state.active:
                    _run_epoch(state, epoch, training=training, task=task, grad_callbacks=grad_callbacks)
            histories = [s.history for s in states]
            for callback in callbacks:
                callback.on_epoch_end(epoch, histories)
            if not any(s.active for s in states):
                break
    for state in states:
        _finish(state, task=task)
    return [TrainedMember(model=s.model, history=s.history) for s in states]


class PreactivationGrads:
    """Catches, in the next forward and backward pass of ``model``, the L2 norm of the
    loss's gradient with respect to each linear layer's output (tensor hooks on those
    outputs, put there by forward hooks that :meth:`remove` takes off after that pass).

    A layer's weight gradient is that backward signal times the layer's input, so the
    ratio of two layers' weight gradients also holds the ratio of their inputs: when
    small weights shrink the forward signal layer by layer (deep ReLU or tanh nets at
    PyTorch's default init), the output layer's weight gradient shrinks as much as the
    first layer's and their ratio reads healthy. The backward signal is D2L's product of
    layer Jacobians alone.
    """

    def __init__(self, model: MLP) -> None:
        layers = list(model.linear_layers())
        self.zero = torch.zeros((), dtype=model.output.weight.dtype, device=model.output.weight.device)
        self.norms: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = [layer.register_forward_hook(self._forward_hook(i)) for i, layer in enumerate(layers)]

    def _forward_hook(self, index: int) -> Callable[..., None]:
        def forward_hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(functools.partial(self._record, index))

        return forward_hook

    def _record(self, index: int, grad: torch.Tensor) -> None:
        self.norms[index] = torch.linalg.vector_norm(grad.detach())

    def remove(self) -> None:
        """Take the forward hooks off the model (after the pass, or when it raised)."""
        for handle in self.handles:
            handle.remove()

    def take(self) -> list[float]:
        """The caught norms, input to output (0 for a layer no gradient reached)."""
        return torch.stack([self.zero if n is None else n for n in self.norms]).tolist()


def _run_epoch(
    state: _Member,
    epoch: int,
    *,
    training: TrainingSpec,
    task: Task,
    grad_callbacks: Sequence[Callback],
) -> None:
    started = time.perf_counter()
    model, optimizer, data, params = state.model, state.optimizer, state.data, state.params
    X, y, rows = data.training_rows()
    n = data.n_train
    batch_size = min(training.batch_size, n)
    stop = stop_index(n, training.batch_size, batch_norm=state.batch_norm)
    perm = torch.randperm(n, generator=state.generator)[:stop]
    if X.device.type != "cpu":
        perm = perm.pin_memory().to(X.device, non_blocking=True)
    if rows is not None:
        perm = rows[perm]  # the shuffle as rows of the fold's source
    # Gather a chunk of shuffled rows at once, then take batches as views of it: one
    # index_select per chunk instead of two per step (a whole epoch for small inputs).
    row_bytes = max(1, X.shape[1] * X.element_size())
    chunk = max(batch_size, (GATHER_BYTES // row_bytes) // batch_size * batch_size)
    clip = training.grad_clip
    l1 = training.l1
    classification = task == "classification"
    loss_sum = torch.zeros((), device=X.device)
    correct = torch.zeros((), device=X.device, dtype=torch.int64)
    model.train()
    step = 0
    for chunk_start in range(0, stop, chunk):
        index = perm[chunk_start : chunk_start + chunk]
        X_chunk = X.index_select(0, index)
        y_chunk = y.index_select(0, index)
        for start in range(0, index.shape[0], batch_size):
            xb = X_chunk[start : start + batch_size]
            yb = y_chunk[start : start + batch_size]
            signal = PreactivationGrads(model) if step == 0 and grad_callbacks else None
            try:
                out = model(xb)
                loss = loss_function(task, out, yb)
                objective = loss + l1 * _l1_penalty(model) if l1 > 0 else loss
                for param in params:
                    param.grad = None
                objective.backward()
            finally:
                if signal is not None:
                    signal.remove()  # also when the pass raised: no hook is left on the model
            if step == 0:
                for callback in grad_callbacks:
                    callback.on_grads_computed(state.index, model, epoch)
                if signal is not None:
                    norms = signal.take()
                    for callback in grad_callbacks:
                        callback.on_preactivation_grads(state.index, model, epoch, norms)
            if clip is not None:
                if clip.kind == "norm":
                    nn.utils.clip_grad_norm_(params, clip.threshold, foreach=True)
                else:
                    nn.utils.clip_grad_value_(params, clip.threshold, foreach=True)
            optimizer.step()
            with torch.no_grad():
                loss_sum.add_(loss, alpha=yb.shape[0])
                if classification:
                    correct.add_((out.argmax(dim=1) == yb).sum())
            step += 1
    train_loss = loss_sum.item() / stop
    if not math.isfinite(train_loss):
        raise Diverged(state.index, epoch, f"training loss is {train_loss}")
    history = state.history
    if training.train_metrics == "full":
        train_loss, train_metric = evaluate(model, X, y, task=task, rows=rows)
    else:
        train_metric = correct.item() / stop if classification else math.sqrt(train_loss)
    history.train_loss.append(train_loss)
    history.train_metric.append(train_metric)
    if data.X_val is not None and data.y_val is not None:
        val_loss, val_metric = evaluate(model, data.X_val, data.y_val, task=task)
        if not math.isfinite(val_loss):
            raise Diverged(state.index, epoch, f"validation loss is {val_loss}")
        history.val_loss.append(val_loss)
        history.val_metric.append(val_metric)
        _track_best(state, epoch, val_loss, training)
    history.fit_seconds += time.perf_counter() - started


def step_flops(model_spec: ModelSpec, *, n_inputs: int, n_outputs: int, batch_size: int) -> int:
    """Multiply-adds x 2 of one training step of one model (forward, and backward without
    the input gradient): about ``6 * batch * weights``."""
    widths = (n_inputs, *model_spec.hidden_widths(), n_outputs)
    weights = sum(a * b for a, b in itertools.pairwise(widths))
    return 6 * batch_size * weights


def choose_engine(training: TrainingSpec) -> Literal["sequential", "stacked"]:
    """The engine ``training.engine`` names, resolving ``auto``.

    ``auto`` stacks the members (see :mod:`modelsel.stacked`): on CUDA one set of kernel
    launches serves all members instead of one per member, and on CPU the stacked engine
    was as fast or faster at every shape measured. The rule depends on nothing else (not
    the shape, device or number of members), so a member trains the same (bit for bit,
    without dropout) alone or beside others. ``engine: sequential`` keeps the one-model
    reference path.

    Measured on the 2-core AMD EPYC (AVX2) this was written on, quiet, 5 members,
    ``benchmarks/engine_probe.py`` (median of 2-3 interleaved runs, training and
    per-epoch evaluation), stacked over sequential samples per second:

    ====================================  ==========  =========  =========
    model, batch, optimizer               MFLOP/step  1 thread   2 threads
    ====================================  ==========  =========  =========
    digits 64-32-10, b32, Adam                   0.4  3.8x
    digits 64-64-64-10 + dropout, b64, Adam      3.4  2.9x
    784-128-128-10, b32, momentum                 21             1.20x
    Fashion 784-256-10 (D2L), b64, SGD            78  1.13x      1.23x
    Fashion 784-256-10 (D2L), b256, SGD          312  1.14x      1.30x
    784-512x3-10, b128, Adam                     714             0.95x
    784-1024-10, b256, SGD                      1248             1.05x
    ====================================  ==========  =========  =========

    Re-measured on 2026-11-27 after the stacked engine's parameters became slot-major
    (each weight a contiguous ``[k, out, in]`` block; see :mod:`modelsel.stacked`) and
    plain SGD began to step inside the backward pass, 2 threads: D2L b64 1.46x and 2.0x
    (two runs), D2L b256 1.18-1.19x, 784-1024-10 b256 SGD 1.14x, 784-512x3-10 b128
    Adam 0.95x (unchanged).

    Small steps are overhead-bound (Python, dispatch, the optimizer's per-tensor loops),
    which stacking divides by k. GEMM-bound steps cost about the same either way
    (``bmm`` over k members vs k ``mm``), and stacking still saves the per-member
    gradient allocations and optimizer calls. (The first two rows are from an earlier,
    busier session.) On CUDA, where a step is launch-bound and the stacked step replays
    as one CUDA graph, stacking was 10-12x sequential at batch 256 on an H100 (see
    :mod:`modelsel.stacked`). Set ``engine: stacked`` or ``sequential`` to override.
    """
    if training.engine != "auto":
        return training.engine
    return "stacked"


#: On CPU, train with one thread when one member's step is at most this many FLOPs:
#: every model of the built-in quickstart search (at most 58 MFLOP: depth 3, width 256,
#: batch 64 on digits), not the D2L Fashion-MNIST MLP (78 MFLOP at batch 64, 312 at 256),
#: whose GEMMs are large enough for intra-op threads to pay off on an idle machine.
ONE_THREAD_MAX_STEP_FLOPS = 64_000_000


@contextlib.contextmanager
def thread_policy(
    model_spec: ModelSpec, training: TrainingSpec, *, n_inputs: int, n_outputs: int, device: torch.device
) -> Iterator[None]:
    """Run small CPU models on one thread (restored afterwards).

    A small model's steps are a few tiny kernels each, too small for intra-op threads to
    pay off; and when other processes share the cores, OpenMP threads that spin at every
    kernel's barrier make a 2-thread process many times slower than a 1-thread one.
    """
    flops = step_flops(model_spec, n_inputs=n_inputs, n_outputs=n_outputs, batch_size=training.batch_size)
    if device.type != "cpu" or flops > ONE_THREAD_MAX_STEP_FLOPS:
        yield
        return
    with torch_threads(1):
        yield


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Use ``threads`` intra-op threads inside the block (restored afterwards)."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def has_batch_norm(model: MLP) -> bool:
    """Whether the model has batch-norm layers."""
    return any(isinstance(m, nn.BatchNorm1d) for m in model.modules())


@dataclass
class BestEpoch:
    """Early stopping's bookkeeping for one member (both engines): the best validation
    loss so far and the epochs since it improved."""

    best_val_loss: float = math.inf
    epochs_without_improvement: int = 0

    def update(
        self, val_loss: float, epoch: int, history: History, stopping: EarlyStoppingSpec | None
    ) -> Literal["best", "worse", "stop"]:
        """Record ``epoch``'s validation loss (and the best epoch in ``history``).

        ``best``: a new best (under early stopping, keep these weights); ``worse``: no
        improvement; ``stop``: patience ran out, the member stops (``history`` says so).
        """
        min_delta = stopping.min_delta if stopping is not None else 0.0
        if val_loss < self.best_val_loss - min_delta:
            self.best_val_loss = val_loss
            history.best_epoch = epoch
            self.epochs_without_improvement = 0
            return "best"
        self.epochs_without_improvement += 1
        if stopping is not None and self.epochs_without_improvement >= stopping.patience:
            history.stopped_early = True
            return "stop"
        return "worse"


def _track_best(state: _Member, epoch: int, val_loss: float, training: TrainingSpec) -> None:
    stopping = training.early_stopping
    verdict = state.best.update(val_loss, epoch, state.history, stopping)
    if verdict == "best" and stopping is not None:
        state.best_state = copy.deepcopy(state.model.state_dict())
    elif verdict == "stop":
        state.active = False


def _finish(state: _Member, *, task: Task) -> None:
    history = state.history
    if state.best_state is not None:
        state.model.load_state_dict(state.best_state)
        history.final_epoch = history.best_epoch
    else:
        history.final_epoch = history.epochs_run - 1
    X, y, rows = state.data.training_rows()
    loss, metric = evaluate(state.model, X, y, task=task, rows=rows)
    history.final_train_loss = loss
    history.final_train_metric = metric
