"""Tasks: the paper's benchmarks as seeded data (algorithmic) or ordered streams (language modelling).

Both kinds implement `Task`, all the training loop knows of a task: so the loop has no branch on the kind.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from rmt_bench.config import ClassifyTaskConfig, FactsTaskConfig, LMTaskConfig, MetricSpec, TaskConfig
from rmt_bench.models import StreamState
from rmt_bench.tasks.algorithmic import AlgorithmicTask, Batch

__all__ = ["AlgorithmicTask", "Batch", "Task", "build_task"]


class Task(Protocol):
    name: str
    vocab_size: int
    segments: int  # S: segments per training batch
    segment_len: int  # n
    pad_front: int  # leading padding tokens of every sequence, hidden from attention (retrieval in 3 / 4)
    stream: bool  # whether a batch's final state goes on to the next batch (language modelling)
    metric: MetricSpec  # the headline metric of `evaluate` and which way every metric is better

    def train_batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Batch]:
        """Endless training batches (B, S, n); from `start_step` on, the same as an uninterrupted run's."""

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """One pass over `split` (valid or test)."""

    def carried_in(self, step: int, batch_size: int, carried: StreamState) -> StreamState:
        """The stream state training step `step` starts from, given the one the last step left."""

    def evaluate(self, model, split: str, batch_size: int, autocast, reset_memory: bool = False, **settings) -> dict:
        """The split's metrics (no gradients; the caller puts the model in eval mode)."""


def build_task(
    cfg: TaskConfig | LMTaskConfig | FactsTaskConfig | ClassifyTaskConfig,
    device: torch.device | str = "cpu",
    splits=("train", "valid", "test"),
):
    """The task of `cfg`; an algorithmic task draws only `splits` (evaluation needs no training split)."""
    if isinstance(cfg, LMTaskConfig):
        from rmt_bench.tasks.wikitext import LMTask

        return LMTask(cfg, device)
    if isinstance(cfg, FactsTaskConfig):
        from rmt_bench.tasks.facts import FactsTask

        return FactsTask(cfg, device, splits)
    if isinstance(cfg, ClassifyTaskConfig):
        from rmt_bench.tasks.hyperpartisan import HyperpartisanTask

        return HyperpartisanTask(cfg, device, splits)
    return AlgorithmicTask(cfg, device, splits)
