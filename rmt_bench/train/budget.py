"""The step budget of a run, fixed once before step 0: `max_steps`, or the steps that fit in `max_minutes` at this
machine's measured speed. The clock never stops a run, so a run is a function of its seed and step count."""

from __future__ import annotations

import copy
import time

import torch

from rmt_bench.config import TrainerConfig
from rmt_bench.models import StreamState
from rmt_bench.tasks import Task
from rmt_bench.train.distributed import SOLO, Dist
from rmt_bench.train.state import TrainState

# before the budget of a `max_minutes` run is fixed: untimed steps, then timed ones (at most this share of it)
CALIBRATION_WARMUP, CALIBRATION_STEPS, CALIBRATION_SHARE = 2, 10, 0.05


def step_budget(seconds: float, seconds_per_step: float, seconds_per_eval: float, eval_every: int) -> int:
    """How many steps fit in `seconds` when every step costs `seconds_per_step` and every `eval_every` steps
    a validation costs `seconds_per_eval` (at least one step)."""
    per_step = seconds_per_step + seconds_per_eval / eval_every
    return max(int(seconds / per_step), 1)


def fix_budget(
    model,
    task: Task,
    cfg: TrainerConfig,
    train_state: TrainState,
    seed: int,
    device,
    autocast,
    dist: Dist = SOLO,
    eval_autocast=None,
) -> str | None:
    """Set `train_state.budget_steps` once; returns a line for the log when it came from `max_minutes`. Then the
    speed is measured on a copy of the model and optimiser (training steps, then one validation, at the task's own
    setting) with the RNG put back afterwards, so the run does not depend on the measurement, only on the budget
    it yields; the budget is checkpointed and a resumed run keeps it. With several processes all take the
    training steps (their gradients reduced, as in training), rank 0 alone validates and its budget holds."""
    from rmt_bench.train.loop import evaluate, make_optimizer, train_step

    ts = train_state
    if cfg.max_minutes is None:
        ts.budget_steps, ts.budget_minutes = cfg.max_steps, None
        return None
    if ts.budget_steps and ts.budget_minutes == cfg.max_minutes:
        return f"step budget: {ts.budget_steps} steps, as fixed when the run started"
    start = time.perf_counter()
    probe = copy.deepcopy(model)
    optimizer = make_optimizer(probe, cfg)
    batches = task.train_batches(cfg.batch_size, seed)
    carried = StreamState()
    timed, limit = 0, CALIBRATION_SHARE * cfg.max_minutes * 60
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(CALIBRATION_WARMUP + CALIBRATION_STEPS):
            if i == CALIBRATION_WARMUP:
                t0 = time.perf_counter()
            carried = task.carried_in(i, cfg.batch_size, carried)  # as fit
            _, carried = train_step(
                model=probe, optimizer=optimizer, batch=dist.shard(next(batches)), cfg=cfg, carried=carried,
                autocast=autocast, keep_final_state=task.stream, dist=dist,
            )  # fmt: skip
            timed = i + 1 - CALIBRATION_WARMUP
            if dist.broadcast(timed >= 2 and time.perf_counter() - start > limit):
                break
        ts.seconds_per_step = (time.perf_counter() - t0) / timed
        t0 = time.perf_counter()
        if dist.main:
            evaluate(probe, task, "valid", cfg.eval_batch_size, eval_autocast or autocast)
        ts.seconds_per_eval = time.perf_counter() - t0
    left = cfg.max_minutes * 60 - ts.train_seconds - (time.perf_counter() - start)
    fits = step_budget(left, ts.seconds_per_step, ts.seconds_per_eval, cfg.eval_every)
    ts.budget_steps, ts.budget_minutes = min(ts.step + fits, cfg.max_steps), cfg.max_minutes
    ts.budget_steps, ts.seconds_per_step, ts.seconds_per_eval = dist.broadcast(
        (ts.budget_steps, ts.seconds_per_step, ts.seconds_per_eval)
    )
    return (
        f"step budget: {ts.budget_steps} steps fit trainer.max_minutes={cfg.max_minutes:g} "
        f"({ts.seconds_per_step:.3f} s/step, {ts.seconds_per_eval:.1f} s per validation); the run is now fixed "
        f"by its step count: trainer.max_steps={ts.budget_steps} trainer.max_minutes=null repeats it"
    )
