"""Which engine trains a set of models: :func:`train_models` checks the members and hands
them to the sequential engine (:mod:`modelsel.training`, one model after another) or the
stacked one (:mod:`modelsel.stacked`, every member in one batched model), as
:func:`~modelsel.training.choose_engine` picks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelsel.spec import ModelSpec, Task, TrainingSpec, batch_norm_batch_problem
from modelsel.stacked import StackJob, train_stacked
from modelsel.training import (
    Callback,
    FoldData,
    TrainedMember,
    check_members,
    choose_engine,
    thread_policy,
    train_sequential,
)


def train_models(
    members: Sequence[FoldData],
    *,
    model_spec: ModelSpec,
    training: TrainingSpec,
    task: Task,
    n_outputs: int,
    seed: int,
    callbacks: Sequence[Callback] = (),
    device: torch.device | str = "cpu",
    cuda_graph: bool = True,
    fused_sgd: bool = True,
) -> list[TrainedMember]:
    """Train one MLP per member, all advancing an epoch at a time.

    Parameters
    ----------
    members
        Data of each model (e.g. the k CV folds), already on ``device``.
    model_spec, training
        What to build and how to train it (epochs, batch size, optimizer, L1/L2,
        clipping, early stopping on validation loss, and ``engine``: the members one
        after another, or stacked into one batched model; see :func:`~modelsel.training.choose_engine`).
    task
        ``classification`` (cross-entropy) or ``regression`` (MSE).
    n_outputs
        Output units: number of classes, or 1.
    seed
        Seeds initialisation, shuffling and dropout; same seed, same numbers on CPU.
    callbacks
        Hooks called at train begin, after the first backward of each epoch and at
        each epoch end.
    device
        Where the models live; the data must already be there.
    cuda_graph
        With the stacked engine on CUDA, replay the full steps as one captured CUDA
        graph (see :mod:`modelsel.stacked`); ``False`` launches every step eagerly.
    fused_sgd
        With the stacked engine on the CPU, take plain SGD steps inside the backward
        pass where it can; ``False`` keeps the separate update (for measuring it).

    Returns
    -------
    list of TrainedMember
        Each member's model (best weights under early stopping) and history.

    Raises
    ------
    Diverged
        When a member's training loss becomes NaN or infinite.
    ValueError
        When a member's tensors are not what the models take (2-D float32 inputs with
        one width for all members; int64 class indices or float32 targets, one per
        row), or batch norm would see a batch of one sample (``batch_size`` 1, or a
        member with one training sample).
    """
    device = torch.device(device)
    check_members(members, task=task)
    problem = batch_norm_batch_problem(model_spec, training)
    if problem:
        raise ValueError(problem)
    if model_spec.normalizes_batches:
        for index, data in enumerate(members):
            if data.n_train < 2:
                raise ValueError(
                    f"model.batch_norm needs 2 training samples or more per model; member {index} has {data.n_train}"
                )
    n_inputs = members[0].n_inputs
    engine = choose_engine(training)
    with thread_policy(model_spec, training, n_inputs=n_inputs, n_outputs=n_outputs, device=device):
        if engine == "stacked":
            jobs = [
                StackJob(data=data, model=model_spec, training=training, seed=seed, index=index)
                for index, data in enumerate(members)
            ]
            results = train_stacked(
                jobs,
                task=task,
                n_outputs=n_outputs,
                callbacks=callbacks,
                device=device,
                raise_on_divergence=True,
                cuda_graph=cuda_graph,
                fused_sgd=fused_sgd,
            )
            return [r.member for r in results]
        return train_sequential(
            members,
            model_spec=model_spec,
            training=training,
            task=task,
            n_outputs=n_outputs,
            seed=seed,
            callbacks=callbacks,
            device=device,
        )
