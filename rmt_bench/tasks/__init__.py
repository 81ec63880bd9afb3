"""Tasks: the paper's benchmarks as seeded data (algorithmic) or ordered streams (language modelling)."""

from __future__ import annotations

import torch

from rmt_bench.config import LMTaskConfig, TaskConfig
from rmt_bench.tasks.algorithmic import AlgorithmicTask, Batch

__all__ = ["AlgorithmicTask", "Batch", "build_task"]


def build_task(cfg: TaskConfig | LMTaskConfig, device: torch.device | str = "cpu"):
    if isinstance(cfg, LMTaskConfig):
        from rmt_bench.tasks.wikitext import LMTask

        return LMTask(cfg, device)
    return AlgorithmicTask(cfg, device)
