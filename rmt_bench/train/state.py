"""What the training loop keeps between steps besides the model and the optimiser, and why a run stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


@dataclass
class TrainState:
    """The step, the schedule, the best validation, the budget, the logging window in progress and the curriculum's
    stage: one part of the checkpoint (`train_state`), so a resumed run continues exactly."""

    step: int = 0
    plateau_scale: float = 1.0
    plateau_best: float = math.inf
    plateau_bad: int = 0
    best_score: float = -math.inf
    best_val: dict = field(default_factory=dict)  # validation metrics at the best step
    best_step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    step_seconds: float = 0.0  # time inside training steps only (tokens/s)
    # the step budget, fixed once: max_steps, or what `budget_minutes` allows at the measured speed
    budget_steps: int = 0
    budget_minutes: float | None = None
    seconds_per_step: float = 0.0  # measured before step 0 when the budget comes from minutes
    seconds_per_eval: float = 0.0
    # the logging window in progress (a checkpoint between two log lines resumes it exactly)
    window_loss: float = 0.0
    window_steps: int = 0
    window_tokens: int = 0
    # the curriculum's stage (trainer.curriculum) and the step at which each stage so far started
    stage: int = 0
    stage_starts: list = field(default_factory=lambda: [0])


class StopReason(str, Enum):
    """Why the loop ended; summary.json's `stop_reason` is the value."""

    MAX_STEPS = "max_steps"  # the step budget of max_steps
    MAX_MINUTES = "max_minutes"  # the step budget that max_minutes allowed, below max_steps
    EARLY_STOP = "early_stop_acc"  # validation accuracy reached trainer.early_stop_acc
    SIGNAL = "signal"  # SIGINT / SIGTERM: checkpointed, the run can be resumed
    NON_FINITE = "non_finite_loss"  # the loss or the weights went non-finite
