"""Tasks: the paper's benchmarks as seeded data, served in segmented batches."""

from __future__ import annotations

import torch

from rmt_bench.config import TaskConfig
from rmt_bench.tasks.algorithmic import AlgorithmicTask, Batch

__all__ = ["AlgorithmicTask", "Batch", "build_task"]


def build_task(cfg: TaskConfig, device: torch.device | str = "cpu") -> AlgorithmicTask:
    return AlgorithmicTask(cfg, device)
