"""The stacked engine: many MLPs of one architecture trained as one batched model.

The k fold models of a trial (or several configurations of a sweep that share an
architecture) are stacked along a leading *member* axis. All parameters live in one flat
tensor, slot-major: each parameter is one contiguous ``[k, *shape]`` block of it, so a
linear layer's weights are a contiguous ``[k, out, in]`` tensor and run as one
``torch.baddbmm``, and whole-stack updates are single passes over the flat tensor. (With
a member-major ``[k, T]`` layout torch computes an in-place batched product into the
weights one member at a time, outside BLAS's batched path. On a CPU with several
threads, the members beyond a multiple of the thread count multiply one at a time with
every thread: see ``_batched_members``.) Per member there are
separate initial weights (built exactly as the one-model path builds them), shuffles
(the same per-member generators), dropout masks, batch-norm statistics, optimizer
state, weight decay, L1, gradient clipping (the norm is taken per member), early
stopping and divergence detection.

Semantics match :func:`modelsel.engines.train_models` with ``engine: sequential``:

- the same initial weights and the same batches in the same order, so without dropout
  the results agree to float rounding (``tests/test_stacked.py`` checks every feature);
- uneven member sizes (CV folds differ by one sample) are handled by padding the last,
  ragged batch and weighting each member's loss by its own batch size; a member with no
  batch left in a step is not updated (its rows are restored, its optimizer step count
  is not advanced), so every member sees exactly its own batches;
- dropout masks come from one generator for the whole stack (not the global stream of
  the one-model path), so with dropout the two engines agree in distribution only;
- a member that stops early or reaches its epoch count leaves the stack: the remaining
  ones are compacted, so stopped members cost nothing.

Each member keeps a normal :class:`~modelsel.models.MLP` whose parameters are views of
its row, so callbacks (e.g. gradient statistics) and :func:`~modelsel.training.evaluate`
work on it unchanged; at the end every model gets its own storage back.

On CUDA the full steps (every member on a whole batch, no gradient callback) replay one
captured CUDA graph (:meth:`StackedTrainer._graphable` says when): a small MLP's step is
dozens of kernels of a few microseconds, so eagerly the host's launches set the pace.
Measured on an H100 (``benchmarks/engine_probe.py --device cuda``, 5 D2L fold models,
one epoch with evaluation): stacked over sequential 3.2-3.4x eager and 10-12x with the
graph at batch 256, 3.9-4.0x and 22-27x at batch 64; 40 members at batch 256: 8.5-8.7x
and 14-15.5x (two sessions; the second, after the slot-major layout, had a faster host). With
Adam and dropout (digits, 64-64-64-10, batch 64, 5 epochs): 3.4x eager, 9.5x graphed.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch
from torch import nn

from modelsel.models import MLP, HiddenBlock, build_mlp
from modelsel.spec import ModelSpec, TrainingSpec
from modelsel.training import (
    GATHER_BYTES,
    BestEpoch,
    Callback,
    Diverged,
    FoldData,
    History,
    Task,
    TrainedMember,
    TrainSource,
    evaluate,
    member_seed,
    stop_index,
)

#: A stacked product sends its members beyond a multiple of the thread count through
#: per-member products only when one member's product is at least this many
#: multiply-adds (the D2L MLP's 784 -> 256 layer at batch 256 has 51M; at batch 64, 13M).
_SPLIT_MIN_MACS = 1 << 25


def _batched_members(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading members of the stacked product ``a @ b`` go through one batched call.

    torch's CPU ``bmm``/``baddbmm`` hand whole members to their threads, so at 2 threads
    5 members take as long as 6. The members beyond a multiple of the thread count are
    better multiplied one at a time, each with every thread. Measured on the 2-vCPU Xeon
    (2026-11-27, 2 threads, 5 members, batch 256, 784 -> 256): the forward product 2.74
    -> 2.55 ms and the weight-gradient step 2.71 -> 2.38 ms in isolation; one stacked
    epoch of the 5 D2L fold models 1.04x, 1.07x and 1.08x faster (9-15 interleaved pairs
    each, the same losses). Smaller products gained nothing (784 -> 64 at batch 256:
    0.99x) or lost (784 -> 256 at batch 64: 0.97x), hence ``_SPLIT_MIN_MACS``.
    """
    k, rows, inner = a.shape
    # The cheapest test first: this runs for every product of every step.
    if rows * inner * b.shape[2] < _SPLIT_MIN_MACS:
        return k
    threads = torch.get_num_threads()
    if threads < 2 or a.device.type != "cpu" or a.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return k
    return k - k % threads


def _stacked_product(
    bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``bias + a @ b`` (``a @ b`` without bias) for every member, into ``out`` if given."""
    k = a.shape[0]
    split = _batched_members(a, b)
    if split == k and out is None:
        return torch.bmm(a, b) if bias is None else torch.baddbmm(bias, a, b)
    if out is None:
        out = a.new_empty(k, a.shape[1], b.shape[2])
    if split:
        if bias is None:
            torch.bmm(a[:split], b[:split], out=out[:split])
        else:
            torch.baddbmm(bias[:split], a[:split], b[:split], out=out[:split])
    for i in range(split, k):
        if bias is None:
            torch.mm(a[i], b[i], out=out[i])
        else:
            torch.addmm(bias[i], a[i], b[i], out=out[i])
    return out


def _stacked_accumulate_(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float, alpha: float) -> None:
    """``target <- beta * target + alpha * a @ b`` for every member, in place."""
    k = a.shape[0]
    split = _batched_members(a, b)
    if split == k:
        target.baddbmm_(a, b, beta=beta, alpha=alpha)
        return
    if split:
        target[:split].baddbmm_(a[:split], b[:split], beta=beta, alpha=alpha)
    for i in range(split, k):
        target[i].addmm_(a[i], b[i], beta=beta, alpha=alpha)


@dataclass(frozen=True)
class _FusedSGD:
    """A plain SGD step taken inside the backward pass (see :class:`_StackedLinear`).

    ``neg_lr`` is ``-lr``, a Python float or a ``[k, 1, 1]`` column (shaped once, for the
    batched weights); ``decay`` is ``1 - lr * weight_decay`` (the same forms), or None
    without weight decay.
    """

    neg_lr: float | torch.Tensor
    decay: float | torch.Tensor | None


class _StackedLinear(torch.autograd.Function):
    """``x @ W.mT + b`` for every member at once, writing the weight and bias gradients
    straight into their rows of the flat gradient buffer.

    Autograd would allocate each gradient and then add it into the preassigned buffer
    (one more pass over every parameter per step, plus zeroing the buffer); writing with
    ``out=`` saves both, which is ~20% of a step for a D2L-sized layer.

    With ``update`` (plain SGD, see :meth:`StackedTrainer._fused_update`) the backward takes
    the optimizer step itself: ``W <- decay * W - lr * dOut^T x`` is one ``baddbmm_``, so
    the gradient is never written nor read back by a separate update pass. The input
    gradient is taken first, from the weights of the forward pass.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grad_weight: torch.Tensor,
        grad_bias: torch.Tensor | None,
        update: _FusedSGD | None = None,
    ) -> torch.Tensor:
        if update is None:
            ctx.save_for_backward(x, weight)
            ctx.grad_buffers = (grad_weight, grad_bias)
        else:
            # The weights change in place during this backward pass, and every layer's
            # weights are views of one flat tensor: saved through save_for_backward, the
            # layers below would fail autograd's version check. No gradient is written.
            ctx.save_for_backward(x)
            ctx.parameters = (weight, bias)
        ctx.update = update
        return _stacked_product(bias, x, weight.mT)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        update: _FusedSGD | None = ctx.update
        if update is not None:
            return _StackedLinear._backward_with_step(ctx, grad_out, update)
        x, weight = ctx.saved_tensors
        grad_weight, grad_bias = ctx.grad_buffers
        if grad_out.dtype == grad_weight.dtype:
            _stacked_product(None, grad_out.mT, x, out=grad_weight)
            if grad_bias is not None:
                torch.sum(grad_out, dim=1, keepdim=True, out=grad_bias)
        else:
            # Under autocast the forward ran in low precision: so do these products, and
            # the float32 gradient buffers take their results.
            grad_weight.copy_(torch.bmm(grad_out.mT, x.to(grad_out.dtype)))
            if grad_bias is not None:
                grad_bias.copy_(grad_out.sum(dim=1, keepdim=True))
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        return _stacked_product(None, grad_out, weight.to(grad_out.dtype)), None, None, None, None, None

    @staticmethod
    def _backward_with_step(ctx: Any, grad_out: torch.Tensor, update: _FusedSGD) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        weight, bias = ctx.parameters
        grad_input = _stacked_product(None, grad_out, weight) if ctx.needs_input_grad[0] else None
        if isinstance(update.neg_lr, torch.Tensor):
            scaled, alpha = grad_out * update.neg_lr, 1.0
        else:
            scaled, alpha = grad_out, update.neg_lr
        beta = 1.0
        if isinstance(update.decay, torch.Tensor):
            weight.mul_(update.decay)
        elif update.decay is not None:
            beta = update.decay
        _stacked_accumulate_(weight, scaled.mT, x, beta=beta, alpha=alpha)
        if bias is not None:  # a layer before batch norm has none
            bias.add_(scaled.sum(dim=1, keepdim=True), alpha=alpha)
        return grad_input, None, None, None, None, None


def _member_norms_into(signal: list[torch.Tensor | None], layer: int, grad: torch.Tensor) -> None:
    """Tensor hook: each member's L2 norm of ``grad`` (``[k, batch, width]``) into ``signal[layer]``."""
    signal[layer] = torch.linalg.vector_norm(grad.detach().flatten(1), dim=1)


class _InplaceReLU(torch.autograd.Function):
    """ReLU that overwrites its input, and in the backward pass the gradient it receives.

    Used only where nothing else reads either: the input is a fresh layer output, and
    the output feeds one consumer that hands back a fresh gradient (the next layer or a
    dropout product; not a residual sum, which gives the same gradient tensor to both of
    its inputs). Writing the backward's result into a freshly allocated ``[k, batch,
    width]`` tensor, as ``torch.relu`` does, cost more than the pass itself: one stacked
    epoch of the 5 D2L fold models (batch 256, 2026-11-27, Xeon, 21 interleaved pairs,
    the same losses) ran 1.055x and 1.029x faster at one thread and 1.025x at two; with
    an in-place forward only, 0.99-1.01x.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        z.relu_()
        ctx.mark_dirty(z)
        ctx.save_for_backward(z)
        return z

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        if not grad.is_contiguous():
            return torch.ops.aten.threshold_backward(grad, out, 0.0)
        # out > 0 exactly where the input was > 0, so the output serves as the mask.
        return torch.ops.aten.threshold_backward.grad_input(grad, out, 0.0, grad_input=grad)


class _StackedCrossEntropy(torch.autograd.Function):
    """Per-sample cross-entropy of ``[k, batch, classes]`` logits, and which samples the
    model classifies right, from one pass over the logits.

    ``F.cross_entropy`` plus a separate ``argmax`` made three passes over these logits
    and, on the CPU, its ``log_softmax`` kernel is slow for a last dimension of 10 (260 us
    for 5 x 256 x 10 on the 2-core Xeon). Here ``torch.max`` gives both the shift and the
    prediction (the first maximal class, as ``argmax``), and the backward is
    ``softmax - one_hot`` from the saved exponentials. The loss agrees with
    ``F.cross_entropy`` to float rounding (the same formula, summed in another order).
    One stacked epoch of 5 D2L fold models against ``F.cross_entropy`` + ``argmax``
    (2026-11-27, 2-core Xeon, 11 interleaved pairs each, geometric means): 1.047x at
    batch 64 and 1 thread, 1.019x at 2 threads; 1.019x and 1.018x at batch 256.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()  # as F.cross_entropy under autocast
        top, predicted = logits.max(dim=-1, keepdim=True)
        index = target.unsqueeze(-1)
        shifted = logits - top
        exponentials = shifted.exp()
        total = exponentials.sum(dim=-1, keepdim=True)
        per_sample = total.log().sub_(shifted.gather(-1, index)).squeeze(-1)
        hits = predicted.squeeze(-1) == target
        ctx.save_for_backward(exponentials, total, index)
        ctx.mark_non_differentiable(hits)
        return per_sample, hits

    @staticmethod
    def backward(ctx: Any, grad_per_sample: torch.Tensor, grad_hits: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        exponentials, total, index = ctx.saved_tensors
        grad = exponentials / total
        grad.scatter_add_(-1, index, torch.full(index.shape, -1.0, dtype=grad.dtype, device=grad.device))
        return grad.mul_(grad_per_sample.unsqueeze(-1)), None


#: Eager steps run on the capture stream before a CUDA graph is captured, so that lazy
#: initialisation (cuBLAS workspaces, autograd's stream bookkeeping) stays out of the graph.
_GRAPH_WARMUP_STEPS = 2

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_BN_EPS = 1e-5
_BN_MOMENTUM = 0.1


@dataclass
class StackJob:
    """One member of a stack: its data, configuration and identity.

    ``seed`` and ``index`` give the member the initial weights and shuffles that
    :func:`~modelsel.engines.train_models` gives its member ``index`` under ``seed``.
    """

    data: FoldData
    model: ModelSpec
    training: TrainingSpec
    seed: int
    index: int = 0


@dataclass
class StackResult:
    """A trained member, and the divergence that stopped it (if any)."""

    member: TrainedMember
    diverged: Diverged | None = None


def stack_signature(model: ModelSpec, training: TrainingSpec) -> tuple[Any, ...]:
    """What must be equal for members to share a stack.

    The architecture (widths, activation, batch norm, residual links), the optimizer
    kind, the batch size and the train-metric mode. Learning rate, momentum, weight
    decay, L1, dropout, init, clipping, early stopping, epochs and seed may differ.
    """
    return (
        model.hidden_widths(),
        model.activation,
        model.batch_norm,
        model.residual,
        training.optimizer,
        training.batch_size,
        training.train_metrics,
    )


def _column(values: Sequence[float], like: torch.Tensor) -> float | torch.Tensor:
    """A per-member value: a Python float when all members agree, else a ``[k, 1]`` column."""
    first = values[0]
    if all(v == first for v in values):
        return float(first)
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, 1)


def _scaled_add_(target: torch.Tensor, tensor: torch.Tensor, scale: float | torch.Tensor) -> None:
    """``target += scale * tensor`` for a scalar or a per-member column ``scale``."""
    if isinstance(scale, torch.Tensor):
        target.addcmul_(tensor, scale)
    else:
        target.add_(tensor, alpha=scale)


@dataclass
class _Slot:
    """One parameter: its block of the flat tensor is ``[k * offset, k * (offset + numel))``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    linear_weight: bool


@dataclass
class _MemberState:
    """Bookkeeping of one member (the Python side; tensors live in the stack)."""

    position: int
    job: StackJob
    model: MLP
    n_train: int
    stop: int
    generator: torch.Generator
    history: History = field(default_factory=History)
    active: bool = True
    optimizer_steps: int = 0
    best: BestEpoch = field(default_factory=BestEpoch)
    best_row: list[torch.Tensor] | None = None
    best_buffers: list[torch.Tensor] | None = None
    best_bn_steps: int = 0
    diverged: Diverged | None = None
    stopped: bool = False


class StackedTrainer:
    """Trains :class:`StackJob` members of one :func:`stack_signature` as one model."""

    def __init__(
        self,
        jobs: Sequence[StackJob],
        *,
        task: Task,
        n_outputs: int,
        device: torch.device,
        callbacks: Sequence[Callback] = (),
        raise_on_divergence: bool = True,
        cuda_graph: bool = True,
        fused_sgd: bool = True,
    ) -> None:
        if not jobs:
            raise ValueError("a stack needs at least one member")
        signatures = {stack_signature(j.model, j.training) for j in jobs}
        if len(signatures) != 1:
            raise ValueError("stacked members must share architecture, optimizer, batch size and metric mode")
        self.jobs = list(jobs)
        self.task = task
        self.device = device
        self.callbacks = list(callbacks)
        self.grad_callbacks = [c for c in callbacks if c.wants_grads]
        self.raise_on_divergence = raise_on_divergence
        self.cuda_graph = cuda_graph and device.type == "cuda"
        # The CUDA steps are graph-bound, not update-bound: they keep the separate update.
        self.fused_sgd = fused_sgd and device.type == "cpu"
        self._graph_stream: torch.cuda.Stream | None = None
        self.graph_replays = 0  # steps that ran as a replay of the captured graph
        self.fused_steps = 0  # steps whose SGD update ran inside the backward pass
        first = jobs[0]
        self.optimizer_kind = first.training.optimizer
        self.batch_size = first.training.batch_size
        self.full_train_metrics = first.training.train_metrics == "full"
        self.classification = task == "classification"
        self.batch_norm = first.model.normalizes_batches  # a linear model (depth 0) has no batch-norm layer
        self.n_inputs = first.data.n_inputs
        # Members seed the global RNG for their initial weights; the caller's RNG state stays as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.members = [self._build_member(p, job, n_outputs) for p, job in enumerate(jobs)]
        reference = self.members[0].model
        self.slots = self._layout(reference)
        self.row_size = sum(s.numel for s in self.slots)
        self.residual = [block.residual for block in _blocks(reference)]
        self.activation = _blocks(reference)[0].activation if reference.blocks else None
        # A residual sum passes one gradient tensor to both of its inputs: no in-place ReLU there.
        self.inplace_relu = [isinstance(self.activation, nn.ReLU) and not residual for residual in self.residual]
        self.dtype = reference.output.weight.dtype
        self.dropout_generator = torch.Generator(device=device)
        self.dropout_generator.manual_seed(member_seed(first.seed + 2, 0))
        # On the CPU the masks' random bits come from numpy's PCG64 (see _dropout_mask).
        self.dropout_bits = np.random.PCG64(member_seed(first.seed + 2, 0)) if device.type == "cpu" else None
        self.stack: list[_MemberState] = []
        self.flat = torch.empty(0)
        self.grad = torch.empty(0)
        self.buffers: list[torch.Tensor] = []
        self.opt_state: list[torch.Tensor] = []
        self._restack(self.members, initial=True)

    # ------------------------------------------------------------------ building

    def _build_member(self, position: int, job: StackJob, n_outputs: int) -> _MemberState:
        torch.manual_seed(member_seed(job.seed, job.index))
        model = build_mlp(job.model, n_inputs=self.n_inputs, n_outputs=n_outputs).to(self.device)
        n = job.data.n_train
        generator = torch.Generator().manual_seed(member_seed(job.seed + 1, job.index))
        stop = stop_index(n, self.batch_size, batch_norm=job.model.normalizes_batches)
        return _MemberState(position, job, model, n, stop, generator)

    @staticmethod
    def _layout(model: MLP) -> list[_Slot]:
        linear = {id(layer.weight) for layer in model.linear_layers()}
        slots, offset = [], 0
        for name, param in model.named_parameters():
            slots.append(_Slot(name, tuple(param.shape), offset, param.numel(), id(param) in linear))
            offset += param.numel()
        return slots

    def _restack(self, members: list[_MemberState], *, initial: bool = False) -> None:
        """(Re)build the stacked tensors for ``members`` (compacting away the others)."""
        old = {id(m): i for i, m in enumerate(self.stack)}
        k = len(members)
        device, T = self.device, self.row_size
        if initial:
            flat = torch.empty(k * T, device=device, dtype=self.dtype)
            for i, m in enumerate(members):
                params = dict(m.model.named_parameters())
                for slot, block in zip(self.slots, self._blocks(flat), strict=True):
                    block[i] = params[slot.name].detach().reshape(-1)
            norms = [_norms(m.model) for m in members]
            buffers = [
                torch.stack([getattr(member_norms[b], name).detach() for member_norms in norms])
                for b in range(len(self.residual))
                for name in ("running_mean", "running_var")
            ] if self.batch_norm else []
            state: list[torch.Tensor] = []
        else:
            rows = torch.tensor([old[id(m)] for m in members], device=device)
            flat = self._select_rows(self.flat, rows)
            buffers = [b.index_select(0, rows) for b in self.buffers]
            state = [self._select_rows(s, rows) for s in self.opt_state]
        self.flat = flat
        self.grad = torch.zeros_like(flat)
        self.param_blocks = self._blocks(flat)
        self.grad_blocks = self._blocks(self.grad)
        # Running sums of one epoch, kept at fixed addresses for the captured step.
        self.loss_sum = torch.zeros(k, device=device)
        self.correct = torch.zeros(k, device=device, dtype=torch.int64)
        # A captured step belongs to these tensors: a new stack captures again.
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graph_warmups = 0
        self.buffers = buffers
        self.opt_state = state
        self.stack = members
        self._make_views()
        self._make_hyperparameters()

    def _make_views(self) -> None:
        k = len(self.stack)
        views: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}
        for slot, view, grad in zip(self.slots, self.param_blocks, self.grad_blocks, strict=True):
            if len(slot.shape) == 1:  # biases and batch-norm affine: [k, 1, h] broadcasts over the batch
                shape: tuple[int, ...] = (k, 1, slot.shape[0])
            else:
                shape = (k, *slot.shape)
            leaf = view.view(shape)
            leaf.requires_grad_(True)
            # Linear layers: _StackedLinear writes the gradient rows itself; batch-norm
            # affine gradients are copied there after each backward.
            grads[slot.name] = grad.view(shape)
            views[slot.name] = leaf
        self.views = views
        n_blocks = len(self.residual)
        names = [f"blocks.{b}.linear" for b in range(n_blocks)] + ["output"]
        self.layers = [
            # A layer before batch norm has no bias (see HiddenBlock).
            (views[f"{n}.weight"], views.get(f"{n}.bias"), grads[f"{n}.weight"], grads.get(f"{n}.bias"))
            for n in names
        ]
        self.norms = (
            [(views[f"blocks.{b}.norm.weight"], views[f"blocks.{b}.norm.bias"]) for b in range(n_blocks)]
            if self.batch_norm
            else []
        )
        self.norm_grads = [
            (views[slot.name], grads[slot.name]) for slot in self.slots if ".norm." in slot.name
        ]
        for row, member in enumerate(self.stack):
            values, grads_of_row = [v[row] for v in self.param_blocks], [g[row] for g in self.grad_blocks]
            _point_model_at(member.model, self.slots, values, grads_of_row)
            for b, norm in enumerate(_norms(member.model)):
                norm.running_mean = self.buffers[2 * b][row]
                norm.running_var = self.buffers[2 * b + 1][row]

    def _make_hyperparameters(self) -> None:
        trainings = [m.job.training for m in self.stack]
        like = self.flat
        # Weight decay and L1 act on linear weights only: applied slot by slot (a mask
        # over every parameter would cost a full extra pass).
        self.weight_slots = [i for i, s in enumerate(self.slots) if s.linear_weight]
        lr = [t.lr for t in trainings]
        wd = [t.weight_decay for t in trainings]
        l1 = [t.l1 for t in trainings]
        self.lr = _column(lr, like)
        self.lr_values = lr  # for Adam's per-step bias correction, without reading self.lr back
        # Under a CUDA graph Adam's bias corrections cannot be Python numbers (a replay
        # repeats the captured constants): the step counts then live on the device.
        self.adam_steps: torch.Tensor | None = None
        if self.cuda_graph and self.optimizer_kind in ("adam", "adamw"):
            self.adam_steps = torch.tensor(
                [float(m.optimizer_steps) for m in self.stack], device=self.device, dtype=self.dtype
            ).view(-1, 1)
            self.lr_column = torch.tensor(lr, device=self.device, dtype=self.dtype).view(-1, 1)
        self.momentum = _column([t.momentum if t.optimizer == "momentum" else 0.0 for t in trainings], like)
        self.has_momentum = self.optimizer_kind == "momentum"
        self.weight_decay: float | torch.Tensor | None = _column(wd, like) if any(wd) else None
        # What the weights are multiplied by each step where the decay acts on them directly
        # (AdamW, and the SGD step inside the backward pass).
        shrink = _column([1.0 - rate * decay for rate, decay in zip(lr, wd, strict=True)], like) if any(wd) else None
        self.decoupled_decay = shrink if self.optimizer_kind == "adamw" else None
        self.l1: float | torch.Tensor | None = _column(l1, like) if any(l1) else None
        clips = [t.grad_clip for t in trainings]
        norm = [c.threshold if c is not None and c.kind == "norm" else math.inf for c in clips]
        value = [c.threshold if c is not None and c.kind == "value" else math.inf for c in clips]
        self.clip_norm = _column(norm, like) if any(math.isfinite(v) for v in norm) else None
        self.clip_value = (
            torch.tensor(value, device=self.device, dtype=self.dtype).view(-1, 1)
            if any(math.isfinite(v) for v in value)
            else None
        )
        # Plain SGD without L1, clipping or batch norm can take its step inside the
        # backward pass (_StackedLinear): see _fused_update for when a step does.
        self.fused_update: _FusedSGD | None = None
        if (
            self.fused_sgd
            and self.optimizer_kind == "sgd"
            and self.l1 is None
            and self.clip_norm is None
            and self.clip_value is None
            and not self.batch_norm
        ):
            self.fused_update = _FusedSGD(neg_lr=_batched(-self.lr), decay=_batched(shrink))
        p = [m.job.model.dropout for m in self.stack]
        self.dropout = any(p)
        if self.dropout:
            # Masks compare 16 random bits with a threshold: P(keep) = 1 - p to within 2**-16.
            thresholds = [min(round(q * 65536), 65535) - 32768 for q in p]
            scales = [1.0 / (1.0 - q) for q in p]
            if len(set(p)) == 1:  # one rate: one threshold and scale for the whole stack
                thresholds, scales = thresholds[:1], scales[:1]
            if self.dropout_bits is not None:  # the CPU's masks are drawn in numpy
                self.np_drop_threshold = np.array(thresholds, dtype=np.int16).reshape(-1, 1, 1)
                self.np_drop_scale = np.array(scales, dtype=np.float32).reshape(-1, 1, 1)
            else:
                self.drop_threshold: int | torch.Tensor = _int16_column(thresholds, self.device)
                self.drop_scale: float | torch.Tensor = (
                    scales[0] if len(scales) == 1 else torch.tensor(scales, device=self.device).view(-1, 1, 1)
                )

    # ------------------------------------------------------------------ callers

    def stop_members(self, positions: Sequence[int]) -> None:
        """Take the members at ``positions`` (job order) out of training after this epoch.

        For a caller that has no more use for them (e.g. a pruned trial's folds): they
        leave the stack at the end of the epoch and skip the final training-set pass.
        """
        for position in positions:
            member = self.members[position]
            member.active = False
            member.stopped = True

    def divergence(self, position: int) -> Diverged | None:
        """Why the member at ``position`` (job order) diverged, or None."""
        return self.members[position].diverged

    # ------------------------------------------------------------------ training

    def train(self) -> list[StackResult]:
        """Train every member to its epoch count, early stop or divergence."""
        for callback in self.callbacks:
            callback.on_train_begin([m.model for m in self.members])
        max_epochs = max(m.job.training.epochs for m in self.members)
        for epoch in range(max_epochs):
            self._run_epoch(epoch)
            histories = [m.history for m in self.members]
            for callback in self.callbacks:
                callback.on_epoch_end(epoch, histories)
            staying = [m for m in self.stack if m.active]
            if not staying:
                break
            if len(staying) != len(self.stack):
                self._leave([m for m in self.stack if not m.active])
                self._restack(staying)
        if self.stack:
            self._leave(list(self.stack))
            self.stack = []
        return [self._finish(m) for m in self.members]

    def _run_epoch(self, epoch: int) -> None:
        started = time.perf_counter()
        stack = self.stack
        k = len(stack)
        n_max = max(m.n_train for m in stack)
        width = min(self.batch_size, n_max)
        stops = [m.stop for m in stack]
        length = max(stops)
        index = torch.zeros(k, length, dtype=torch.long, pin_memory=self.device.type == "cuda")
        for row, m in enumerate(stack):
            index[row, : m.stop] = torch.randperm(m.n_train, generator=m.generator)[: m.stop]
        index = index.to(self.device, non_blocking=True)
        parts = [m.job.data.training_rows() for m in stack]
        if any(rows is not None for _, _, rows in parts):
            # Each member's shuffle as rows of the tensors its batches are gathered from.
            index = torch.stack([i if rows is None else rows[i] for (_, _, rows), i in zip(parts, index, strict=True)])
        # With one shared source, one gather per chunk serves every member.
        source = self._shared_source()
        self.loss_sum.zero_()
        self.correct.zero_()
        row_bytes = self.n_inputs * parts[0][0].element_size()
        chunk = max(width, (GATHER_BYTES // max(1, k * row_bytes)) // width * width)
        x_buffer = torch.empty(k, min(chunk, length), self.n_inputs, device=self.device, dtype=self.dtype)
        y_buffer = torch.empty(k, min(chunk, length), device=self.device, dtype=parts[0][1].dtype)
        step = 0
        for chunk_start in range(0, length, chunk):
            chunk_end = min(chunk_start + chunk, length)
            if source is not None and chunk_end - chunk_start == x_buffer.shape[1]:
                rows = index[:, chunk_start:chunk_end].reshape(-1)
                torch.index_select(source.X, 0, rows, out=x_buffer.view(-1, self.n_inputs))
                torch.index_select(source.y, 0, rows, out=y_buffer.view(-1))
            else:
                for row, (X, y, _) in enumerate(parts):
                    rows = index[row, chunk_start:chunk_end]
                    torch.index_select(X, 0, rows, out=x_buffer[row, : chunk_end - chunk_start])
                    torch.index_select(y, 0, rows, out=y_buffer[row, : chunk_end - chunk_start])
            for start in range(chunk_start, chunk_end, width):
                end = min(start + width, chunk_end)
                counts = [min(max(s - start, 0), end - start) for s in stops]
                xb = x_buffer[:, start - chunk_start : end - chunk_start]
                yb = y_buffer[:, start - chunk_start : end - chunk_start]
                if step > 0 and self._graphable(xb) and all(c == end - start for c in counts):
                    self._graph_step(xb, yb, counts, epoch=epoch)
                else:
                    self._step(xb, yb, counts, epoch=epoch, first=step == 0)
                for row, m in enumerate(stack):
                    if counts[row] > 0:
                        m.optimizer_steps += 1
                step += 1
        seconds = (time.perf_counter() - started) / k
        self._end_epoch(epoch, seconds)

    def _shared_source(self) -> TrainSource | None:
        """The training source every member's rows come from, if they share one (see
        :class:`~modelsel.training.FoldData`), in the stack's dtype and on its device.

        Then one ``index_select`` per chunk gathers every member's batch, instead of one
        per member. The values are the same; the calls and the memory touched are fewer.
        Measured on the 2-vCPU Xeon (5 D2L-shaped fold models, batch 256, one epoch on
        12k rows per fold, 31 interleaved pairs in each creation order, the same losses):
        width 64 1.017x at one thread and 1.055x at two; width 256 1.00x and 1.01x.
        """
        sources = [m.job.data.source for m in self.stack]
        first = sources[0]
        if first is None or first.X.dtype != self.dtype or first.X.device != self.device:
            return None
        if any(s is None or s.X is not first.X or s.y is not first.y for s in sources):
            return None
        return first

    def _step(
        self,
        xb: torch.Tensor,
        yb: torch.Tensor,
        counts: list[int],
        *,
        epoch: int,
        first: bool,
    ) -> None:
        width = xb.shape[1]
        ragged = any(c != width for c in counts)
        idle = [row for row, c in enumerate(counts) if c == 0]
        saved = self._save_rows(idle) if idle else None
        mask: torch.Tensor | None = None
        weights: torch.Tensor | None = None
        if ragged:
            count_tensor = torch.tensor(counts, device=self.device)
            mask = torch.arange(width, device=self.device).view(1, -1) < count_tensor.view(-1, 1)
            weights = mask / count_tensor.clamp(min=1).view(-1, 1).to(self.dtype)
        update = self._fused_update(first)
        # The backward signal of each layer (Callback.on_preactivation_grads), caught by
        # tensor hooks on the first batch of an epoch only.
        signal: list[torch.Tensor | None] | None = [None] * len(self.layers) if first and self.grad_callbacks else None
        out = self._forward(xb, mask, update, signal)
        hits: torch.Tensor | None = None
        if self.classification:
            per_sample, hits = _StackedCrossEntropy.apply(out, yb)
        else:
            per_sample = (out.squeeze(-1) - yb).square()
        objective = per_sample.sum() / width if weights is None else (per_sample * weights).sum()
        objective.backward()
        for leaf, grad in self.norm_grads:
            grad.copy_(leaf.grad)  # type: ignore[arg-type]
            leaf.grad = None
        with torch.no_grad():
            if self.l1 is not None:
                for i in self.weight_slots:
                    _scaled_add_(self.grad_blocks[i], self.param_blocks[i].sign(), self.l1)
            if first:
                for m in self.stack:
                    for callback in self.grad_callbacks:
                        callback.on_grads_computed(m.position, m.model, epoch)
            if signal is not None:
                zero = torch.zeros(len(self.stack), device=self.device)
                per_layer = torch.stack([zero if n is None else n.to(zero.dtype) for n in signal], dim=1).tolist()
                for m, norms in zip(self.stack, per_layer, strict=True):
                    for callback in self.grad_callbacks:
                        callback.on_preactivation_grads(m.position, m.model, epoch, norms)
            if update is None:
                self._clip()
                self._optimizer_step([c > 0 for c in counts] if idle else None)
            else:
                self.fused_steps += 1
            detached = per_sample.detach()
            if mask is None:
                self.loss_sum += detached.sum(dim=1)
                if hits is not None:
                    self.correct += hits.sum(dim=1)
            else:
                self.loss_sum += (detached * mask).sum(dim=1)
                if hits is not None:
                    self.correct += (hits & mask).sum(dim=1)
            if saved is not None:
                self._restore_rows(idle, saved)

    # ------------------------------------------------------------ CUDA graph

    def _graphable(self, xb: torch.Tensor) -> bool:
        """Whether a full step (every member trains on the whole batch, no callbacks) of
        this stack may run as a captured CUDA graph.

        On CUDA a small MLP's step is dozens of kernels of a few microseconds each, so
        the host's kernel launches, not the GPU, set the pace; one graph replay launches
        them all at once. Every optimizer qualifies once its state exists (Adam's step
        counts then live on the device); dropout needs a torch that can register the
        stack's generator with a graph.
        """
        if not self.cuda_graph:
            return False
        if self.optimizer_kind != "sgd" and not self.opt_state:
            return False  # the step that creates the optimizer state stays eager
        if self.dropout and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return False
        return self._graph_inputs is None or self._graph_inputs[0].shape == xb.shape

    def _graph_step(self, xb: torch.Tensor, yb: torch.Tensor, counts: list[int], *, epoch: int) -> None:
        """One full step through the captured graph (warming up and capturing it first)."""
        if self._graph is None:
            current = torch.cuda.current_stream(self.device)
            if self._graph_stream is None:
                self._graph_stream = torch.cuda.Stream(self.device)
            stream = self._graph_stream
            stream.wait_stream(current)
            if self._graph_warmups < _GRAPH_WARMUP_STEPS:
                with torch.cuda.stream(stream):
                    self._step(xb, yb, counts, epoch=epoch, first=False)
                current.wait_stream(stream)
                self._graph_warmups += 1
                return
            inputs = (xb.clone(), yb.clone())
            graph = torch.cuda.CUDAGraph()
            if self.dropout:  # each replay then draws fresh masks from the stack's generator
                graph.register_generator_state(self.dropout_generator)
            try:
                # Capturing records the step's kernels without running them: the replay below runs it.
                with torch.cuda.graph(graph, stream=stream):
                    self._step(*inputs, counts, epoch=epoch, first=False)
            except RuntimeError:  # an operation this torch cannot capture: stay eager
                self.cuda_graph = False
                self._step(xb, yb, counts, epoch=epoch, first=False)
                return
            self._graph, self._graph_inputs = graph, inputs
        else:
            assert self._graph_inputs is not None
            self._graph_inputs[0].copy_(xb)
            self._graph_inputs[1].copy_(yb)
        self._graph.replay()
        self.graph_replays += 1

    def _fused_update(self, first: bool) -> _FusedSGD | None:
        """The SGD step to take inside this step's backward pass, or None.

        None when the optimizer or a feature needs the gradient itself (see
        ``_make_hyperparameters``), on the first step of an epoch when a callback reads
        the gradients, and under autocast (the products would round differently).
        Measured on the 2-vCPU EPYC (5 D2L fold models, one epoch, 30 interleaved pairs
        against ``fused_sgd=False``, geometric means): 1.05x (one thread) and 1.10x (two
        threads) at batch 64, 1.02x and 1.00x at batch 256.
        """
        if self.fused_update is None or (first and self.grad_callbacks):
            return None
        if torch.is_autocast_enabled(self.device.type):
            return None
        return self.fused_update

    def _forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        update: _FusedSGD | None = None,
        signal: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """The stacked logits; with ``signal``, each layer's per-member norm of the loss's
        gradient with respect to its output is written there during the backward pass."""
        h = x
        for b, (weight, bias, grad_weight, grad_bias) in enumerate(self.layers[:-1]):
            z = _StackedLinear.apply(h, weight, bias, grad_weight, grad_bias, update)
            if signal is not None:
                z.register_hook(functools.partial(_member_norms_into, signal, b))
            if self.batch_norm:
                z = self._batch_norm(z, b, mask)
            assert self.activation is not None
            a = _InplaceReLU.apply(z) if self.inplace_relu[b] else self.activation(z)
            if self.dropout:
                a = a * self._dropout_mask(a)
            h = h + a if self.residual[b] else a
        weight, bias, grad_weight, grad_bias = self.layers[-1]
        out: torch.Tensor = _StackedLinear.apply(h, weight, bias, grad_weight, grad_bias, update)
        if signal is not None:
            out.register_hook(functools.partial(_member_norms_into, signal, len(self.layers) - 1))
        return out

    def _batch_norm(self, z: torch.Tensor, block: int, mask: torch.Tensor | None) -> torch.Tensor:
        gamma, beta = self.norms[block]
        running_mean, running_var = self.buffers[2 * block], self.buffers[2 * block + 1]
        if mask is None:
            n = z.shape[1]
            var, mean = torch.var_mean(z, dim=1, keepdim=True, correction=0)
            unbias: float | torch.Tensor = n / max(n - 1, 1)
        else:
            m = mask.unsqueeze(-1).to(z.dtype)
            count = m.sum(dim=1, keepdim=True)
            safe = count.clamp(min=1.0)
            mean = (z * m).sum(dim=1, keepdim=True) / safe
            var = ((z - mean).square() * m).sum(dim=1, keepdim=True) / safe
            unbias = (safe / (count - 1.0).clamp(min=1.0)).squeeze(1)
        normalized = (z - mean) * torch.rsqrt(var + _BN_EPS)
        if mask is not None:
            # The padded rows (all of an idle member's) carry no statistics: scaled by
            # rsqrt(eps) at every layer they would overflow in a deep net, and inf * 0 in
            # the masked sums is NaN. Zeroed, they leave each layer as its shift.
            normalized = normalized * m
        with torch.no_grad():
            running_mean.lerp_(mean.detach().squeeze(1), _BN_MOMENTUM)
            running_var.lerp_(var.detach().squeeze(1) * unbias, _BN_MOMENTUM)
        return torch.addcmul(beta, normalized, gamma)

    def _dropout_mask(self, a: torch.Tensor) -> torch.Tensor:
        """Each member's keep mask for activations ``a`` (``[k, batch, width]``), scaled by
        ``1 / (1 - p)``: 16 random bits per unit against the member's threshold.

        On the CPU the bits come from numpy's PCG64 rather than torch's CPU generator, and
        the comparison and scaling run in numpy too: 40 against 183 us for a 5 x 64 x 64
        mask, 515 against 1,978 us for 5 x 256 x 256 (one thread, the 2-vCPU Xeon).
        """
        numel = a.numel()
        if self.dropout_bits is not None:
            words = self.dropout_bits.random_raw((numel + 3) // 4)
            bits16 = words.view(np.int16)[:numel].reshape(a.shape)
            mask = np.multiply(bits16 >= self.np_drop_threshold, self.np_drop_scale, dtype=np.float32)
            return torch.from_numpy(mask).to(a.dtype)
        bits = torch.empty((numel + 3) // 4, dtype=torch.int64, device=a.device)
        bits.random_(-(2**63), 2**63 - 1, generator=self.dropout_generator)
        draws = bits.view(torch.int16)[:numel].view(a.shape)
        keep = draws >= self.drop_threshold
        return keep.to(a.dtype).mul_(self.drop_scale)

    def _clip(self) -> None:
        if self.clip_norm is not None:
            # As torch's clip_grad_norm_: the norm of the parameters' norms, per member.
            slot_norms = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in self.grad_blocks], dim=1)
            norms = torch.linalg.vector_norm(slot_norms, dim=1, keepdim=True)
            coefficient = (self.clip_norm / (norms + 1e-6)).clamp_(max=1.0)
            for g in self.grad_blocks:
                g.mul_(coefficient)
        if self.clip_value is not None:
            for g in self.grad_blocks:
                g.clamp_(min=-self.clip_value, max=self.clip_value)

    def _optimizer_step(self, stepping: list[bool] | None) -> None:
        p, g = self.flat, self.grad
        kind = self.optimizer_kind
        if kind in ("sgd", "momentum"):
            self._decay_gradient()
            update = g
            if self.has_momentum:
                if not self.opt_state:
                    self.opt_state = [g.clone()]
                else:
                    for (state,) in self._per_member(self.momentum, self.opt_state[0]):
                        state.mul_(self.momentum)
                    self.opt_state[0].add_(g)
                update = self.opt_state[0]
            for params, change in self._per_member(self.lr, p, update):
                _scaled_add_(params, change, -self.lr)
            return
        if not self.opt_state:
            self.opt_state = [torch.zeros_like(p), torch.zeros_like(p)]
        exp_avg, exp_avg_sq = self.opt_state
        beta1, beta2 = _ADAM_BETAS
        step_size: float | torch.Tensor
        correction: float | torch.Tensor
        if self.adam_steps is not None:
            if stepping is None:
                self.adam_steps.add_(1.0)
            else:
                self.adam_steps.add_(torch.tensor(stepping, device=self.device, dtype=self.dtype).view(-1, 1))
            counts = self.adam_steps.clamp(min=1.0)
            step_size = self.lr_column / (1.0 - torch.pow(beta1, counts))
            correction = (1.0 - torch.pow(beta2, counts)).sqrt_()
        else:
            steps = [m.optimizer_steps + 1 for m in self.stack]
            if stepping is not None:
                steps = [s if go else max(s - 1, 1) for s, go in zip(steps, stepping, strict=True)]
            step_size = _column([lr / (1 - beta1**s) for lr, s in zip(self.lr_values, steps, strict=True)], p)
            correction = _column([math.sqrt(1 - beta2**s) for s in steps], p)
        if self.decoupled_decay is not None:
            for i in self.weight_slots:
                self.param_blocks[i].mul_(self.decoupled_decay)
        else:
            self._decay_gradient()
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = exp_avg_sq.sqrt()
        for (part,) in self._per_member(correction, denom):
            part.div_(correction)
        denom.add_(_ADAM_EPS)
        if isinstance(step_size, torch.Tensor):
            # (value * exp_avg) / denom, rounded as addcdiv_ rounds it: a member's numbers do
            # not depend on whether its neighbours made the same number of steps.
            for params, avg, den in self._per_member(step_size, p, exp_avg, denom):
                params.add_(avg.mul(-step_size).div_(den))
        else:
            p.addcdiv_(exp_avg, denom, value=-step_size)

    def _decay_gradient(self) -> None:
        """L2 through the gradient (as torch's SGD/Adam ``weight_decay``), weights only."""
        if self.weight_decay is None:
            return
        for i in self.weight_slots:
            _scaled_add_(self.grad_blocks[i], self.param_blocks[i], self.weight_decay)

    # -------------------------------------------------- the slot-major parameter layout

    def _blocks(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The ``[k, numel]`` block of each slot (parameter) in a slot-major tensor (``self.flat``'s layout)."""
        k = tensor.numel() // self.row_size
        return [tensor[k * slot.offset : k * (slot.offset + slot.numel)].view(k, slot.numel) for slot in self.slots]

    def _select_rows(self, tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A slot-major tensor of the members at ``rows`` of ``tensor``."""
        return torch.cat([block.index_select(0, rows).reshape(-1) for block in self._blocks(tensor)])

    def _per_member(self, factor: float | torch.Tensor, *tensors: torch.Tensor) -> Iterable[tuple[torch.Tensor, ...]]:
        """Slot-major ``tensors`` in the parts an elementwise operation with ``factor`` runs on:
        whole for a float (one pass), slot block by slot block (``[k, numel]``, where a
        ``[k, 1]`` column broadcasts per member) for a column."""
        if isinstance(factor, torch.Tensor):
            return zip(*(self._blocks(tensor) for tensor in tensors), strict=True)
        return [tensors]

    def _save_rows(self, rows: list[int]) -> list[torch.Tensor]:
        index = torch.tensor(rows, device=self.device)
        return [t.index_select(0, index) for t in self._row_tensors()]

    def _restore_rows(self, rows: list[int], saved: list[torch.Tensor]) -> None:
        index = torch.tensor(rows, device=self.device)
        # Optimizer state created during the step (after the save) is not restored.
        for tensor, values in zip(self._row_tensors(), saved, strict=False):
            tensor.index_copy_(0, index, values)

    def _row_tensors(self) -> list[torch.Tensor]:
        """Every per-member tensor with the member on dim 0: parameters, buffers, then state."""
        state_blocks = [block for state in self.opt_state for block in self._blocks(state)]
        return [*self.param_blocks, *self.buffers, *state_blocks]

    # ------------------------------------------------------------ epoch end

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        losses = self.loss_sum.tolist()
        corrects = self.correct.tolist()
        for row, m in enumerate(self.stack):
            started = time.perf_counter()
            history = m.history
            data = m.job.data
            train_loss = losses[row] / m.stop
            if not math.isfinite(train_loss):
                self._diverge(m, epoch, f"training loss is {train_loss}")
                continue
            if self.full_train_metrics:
                X, y, rows = data.training_rows()
                train_loss, train_metric = evaluate(m.model, X, y, task=self.task, rows=rows)
            else:
                train_metric = corrects[row] / m.stop if self.classification else math.sqrt(train_loss)
            history.train_loss.append(train_loss)
            history.train_metric.append(train_metric)
            if data.X_val is not None and data.y_val is not None:
                val_loss, val_metric = evaluate(m.model, data.X_val, data.y_val, task=self.task)
                if not math.isfinite(val_loss):
                    history.fit_seconds += seconds + time.perf_counter() - started
                    self._diverge(m, epoch, f"validation loss is {val_loss}")
                    continue
                history.val_loss.append(val_loss)
                history.val_metric.append(val_metric)
                self._track_best(m, row, epoch, val_loss)
            if history.epochs_run >= m.job.training.epochs:
                m.active = False
            history.fit_seconds += seconds + time.perf_counter() - started

    def _diverge(self, m: _MemberState, epoch: int, reason: str) -> None:
        m.active = False
        m.diverged = Diverged(m.position, epoch, reason)
        if self.raise_on_divergence:
            raise m.diverged

    def _track_best(self, m: _MemberState, row: int, epoch: int, val_loss: float) -> None:
        stopping = m.job.training.early_stopping
        verdict = m.best.update(val_loss, epoch, m.history, stopping)
        if verdict == "best" and stopping is not None:
            m.best_row = [block[row].clone() for block in self.param_blocks]
            m.best_buffers = [b[row].clone() for b in self.buffers]
            m.best_bn_steps = m.optimizer_steps
        elif verdict == "stop":
            m.active = False

    def _leave(self, members: list[_MemberState]) -> None:
        """Give the members' models their own storage (their rows are about to go)."""
        for m in members:
            for param in m.model.parameters():
                param.data = param.data.clone()
                param.grad = None
            for norm in _norms(m.model):
                norm.running_mean = norm.running_mean.clone()
                norm.running_var = norm.running_var.clone()
                norm.num_batches_tracked.fill_(m.optimizer_steps)

    def _finish(self, m: _MemberState) -> StackResult:
        history = m.history
        if m.best_row is not None:
            _load_row(m.model, self.slots, m.best_row)
            if m.best_buffers:
                for b, norm in enumerate(_norms(m.model)):
                    norm.running_mean.copy_(m.best_buffers[2 * b])
                    norm.running_var.copy_(m.best_buffers[2 * b + 1])
                    norm.num_batches_tracked.fill_(m.best_bn_steps)
            history.final_epoch = history.best_epoch
        else:
            history.final_epoch = history.epochs_run - 1
        if m.diverged is None and not m.stopped:
            X, y, rows = m.job.data.training_rows()
            loss, metric = evaluate(m.model, X, y, task=self.task, rows=rows)
            history.final_train_loss = loss
            history.final_train_metric = metric
        return StackResult(TrainedMember(model=m.model, history=history), m.diverged)


def _blocks(model: MLP) -> list[HiddenBlock]:
    return [block for block in model.blocks if isinstance(block, HiddenBlock)]


def _norms(model: MLP) -> list[Any]:
    """The batch-norm layers of ``model`` (typed loosely: their buffers are plain tensors)."""
    return [module for module in model.modules() if isinstance(module, nn.BatchNorm1d)]


@overload
def _batched(value: float | torch.Tensor) -> float | torch.Tensor: ...


@overload
def _batched(value: float | torch.Tensor | None) -> float | torch.Tensor | None: ...


def _batched(value: float | torch.Tensor | None) -> float | torch.Tensor | None:
    """A per-member ``[k, 1]`` column as ``[k, 1, 1]``, to broadcast over batched weights."""
    return value.view(-1, 1, 1) if isinstance(value, torch.Tensor) else value


def _int16_column(values: Sequence[int], device: torch.device) -> int | torch.Tensor:
    if len(set(values)) == 1:
        return values[0]
    return torch.tensor(list(values), dtype=torch.int16, device=device).view(-1, 1, 1)


def _point_model_at(
    model: MLP, slots: Sequence[_Slot], row: Sequence[torch.Tensor], grad_row: Sequence[torch.Tensor]
) -> None:
    """Make ``model``'s parameters (and their grads) views of one member's row of each slot."""
    params = dict(model.named_parameters())
    for slot, values, grad in zip(slots, row, grad_row, strict=True):
        param = params[slot.name]
        param.data = values.view(slot.shape)
        param.grad = grad.view(slot.shape)


def _load_row(model: MLP, slots: Sequence[_Slot], row: Sequence[torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for slot, values in zip(slots, row, strict=True):
            params[slot.name].copy_(values.view(slot.shape))


def train_stacked(
    jobs: Sequence[StackJob],
    *,
    task: Task,
    n_outputs: int,
    callbacks: Sequence[Callback] = (),
    device: torch.device | str = "cpu",
    raise_on_divergence: bool = False,
    cuda_graph: bool = True,
    fused_sgd: bool = True,
) -> list[StackResult]:
    """Train several members of one :func:`stack_signature` as one stacked model.

    Parameters
    ----------
    jobs
        The members: data (on ``device``), model and training specs, seed and index.
        Members may differ in learning rate, momentum, weight decay, L1, dropout, init,
        clipping, early stopping, epochs and seed (e.g. the trials of a sweep).
    task, n_outputs
        As in :func:`~modelsel.engines.train_models`.
    callbacks
        ``on_epoch_end`` receives every member's history, in job order.
    device
        Where the members train.
    raise_on_divergence
        Raise :class:`~modelsel.training.Diverged` for the first member whose loss
        becomes non-finite (the fold semantics); by default such a member leaves the
        stack, the others go on, and its :class:`StackResult` carries the reason.
    cuda_graph
        On CUDA, run the full steps as one captured CUDA graph where the stack allows it
        (see :meth:`StackedTrainer._graphable`); ``False`` keeps every step eager.
    fused_sgd
        On the CPU, take plain SGD steps inside the backward pass where the stack allows
        it (see :meth:`StackedTrainer._fused_update`); ``False`` keeps the separate update
        (for measuring it).
    """
    trainer = StackedTrainer(
        jobs,
        task=task,
        n_outputs=n_outputs,
        device=torch.device(device),
        callbacks=callbacks,
        raise_on_divergence=raise_on_divergence,
        cuda_graph=cuda_graph,
        fused_sgd=fused_sgd,
    )
    return trainer.train()

