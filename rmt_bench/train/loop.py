"""fit / evaluate: the training loop as named steps (set up, training step, evaluate and checkpoint, stop
conditions, final test) over the task interface (tasks/__init__.py); read top to bottom.

The loop owns the device, autocast, the optimiser and schedule; the model knows none of it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rmt_bench.config import ConfigError, TrainerConfig
from rmt_bench.errors import CheckpointError, RunStopped
from rmt_bench.logging import RunLogger
from rmt_bench.models import RecurrentModel, train_segments
from rmt_bench.tasks import Task
from rmt_bench.train.checkpoint import load_checkpoint, rank_payload, save_checkpoint, weights_finite
from rmt_bench.train.curriculum import Curriculum
from rmt_bench.train.distributed import SOLO, Dist
from rmt_bench.train.precision import resolve as resolve_precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", "cuda was asked for but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


def autocast_factory(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


def make_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainerConfig, step: int, budget: int) -> float:
    """Multiplier of the base lr at `step` of a `budget`-step run for warmup and cosine (plateau is applied on
    top, at evaluations). A function of the step and the fixed budget only, so a resumed run is the same run."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule != "cosine":
        return 1.0
    progress = min((step - cfg.warmup_steps) / max(budget - cfg.warmup_steps, 1), 1.0)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainState:
    """Everything a checkpoint needs beyond the model and optimiser."""

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
    st: TrainState,
    seed: int,
    device,
    autocast,
    dist: Dist = SOLO,
    eval_autocast=None,
) -> str | None:
    """Set `st.budget_steps` once; returns a line for the log when it came from `max_minutes`. Then the speed
    is measured on a copy of the model and optimiser (training steps, then one validation) with the RNG put
    back afterwards, so the run does not depend on the measurement, only on the budget it yields; the budget
    is checkpointed and a resumed run keeps it. With several processes all take the training steps (their
    gradients reduced, as in training), rank 0 alone validates and its budget holds for all."""
    if cfg.max_minutes is None:
        st.budget_steps, st.budget_minutes = cfg.max_steps, None
        return None
    if st.budget_steps and st.budget_minutes == cfg.max_minutes:
        return f"step budget: {st.budget_steps} steps, as fixed when the run started"
    start = time.perf_counter()
    probe = copy.deepcopy(model)
    optimizer = make_optimizer(probe, cfg)
    batches = task.train_batches(cfg.batch_size, seed)
    carried = (None, [])
    timed, limit = 0, CALIBRATION_SHARE * cfg.max_minutes * 60
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(CALIBRATION_WARMUP + CALIBRATION_STEPS):
            if i == CALIBRATION_WARMUP:
                t0 = time.perf_counter()
            carried = task.carried_in(i, cfg.batch_size, carried)  # as fit
            batch = dist.shard(next(batches))
            _, carried = train_step(probe, optimizer, batch, cfg, carried, autocast, task.stream, dist)
            timed = i + 1 - CALIBRATION_WARMUP
            if dist.broadcast(timed >= 2 and time.perf_counter() - start > limit):
                break
        st.seconds_per_step = (time.perf_counter() - t0) / timed
        t0 = time.perf_counter()
        if dist.main:
            evaluate(probe, task, "valid", cfg.eval_batch_size, eval_autocast or autocast)
        st.seconds_per_eval = time.perf_counter() - t0
    left = cfg.max_minutes * 60 - st.train_seconds - (time.perf_counter() - start)
    fits = step_budget(left, st.seconds_per_step, st.seconds_per_eval, cfg.eval_every)
    st.budget_steps, st.budget_minutes = min(st.step + fits, cfg.max_steps), cfg.max_minutes
    st.budget_steps, st.seconds_per_step, st.seconds_per_eval = dist.broadcast(
        (st.budget_steps, st.seconds_per_step, st.seconds_per_eval)
    )
    return (
        f"step budget: {st.budget_steps} steps fit trainer.max_minutes={cfg.max_minutes:g} "
        f"({st.seconds_per_step:.3f} s/step, {st.seconds_per_eval:.1f} s per validation); the run is now fixed "
        f"by its step count: trainer.max_steps={st.budget_steps} trainer.max_minutes=null repeats it"
    )


def evaluate(model: RecurrentModel, task: Task, split: str, batch_size: int, autocast, **settings) -> dict:
    """The task's metrics on `split` in eval mode (`Task.evaluate`; settings such as `reset_memory` pass on)."""
    was_training = model.training
    model.eval()
    try:
        return task.evaluate(model, split, batch_size, autocast, **settings)
    finally:
        model.train(was_training)


def score(metrics: dict) -> float:
    """Higher is better: the task's headline (the final answer's exact match, else accuracy), else minus the loss."""
    return metrics.get("final_exact", metrics.get("acc", -metrics["loss"]))


def plateau_step(st: TrainState, cfg: TrainerConfig, val_loss: float) -> None:
    """Sec. 4.1: halve the lr when the validation loss has not improved for `plateau_patience` evaluations."""
    if val_loss < st.plateau_best - 1e-4:
        st.plateau_best, st.plateau_bad = val_loss, 0
        return
    st.plateau_bad += 1
    if st.plateau_bad > cfg.plateau_patience:
        st.plateau_scale = max(st.plateau_scale * cfg.plateau_factor, cfg.min_lr / cfg.lr)
        st.plateau_bad = 0


def train_step(
    model: RecurrentModel,
    optimizer,
    batch,
    cfg: TrainerConfig,
    carried: tuple,
    autocast,
    carried_state: bool = True,
    dist: Dist = SOLO,
):
    """One optimiser step over a batch's segments. `carried` = (state, BPTT history) handed from batch to batch
    on streams (None, [] on the algorithmic tasks, whose batches say carried_state=False: the final state is
    dropped). With several processes `batch` is this rank's shard: the loss is normalised by the answer tokens
    of the global batch and the gradients are summed over the ranks before clipping. -> (global loss, carried)."""
    optimizer.zero_grad(set_to_none=True)
    weights = batch.loss_mask.float()
    state, history = carried
    state = state or model.initial_state(pad=batch.pad_front)  # a fresh example starts at its padding
    norm = dist.sum(weights.sum().item())  # answer tokens of the global batch
    loss, state, history = train_segments(
        model, batch.inputs, batch.targets, weights, norm, model.cfg.bptt_depth, state, history, autocast,
        final_state=carried_state,
    )  # fmt: skip
    dist.all_reduce_grads(model)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return dist.sum(loss), (state, history)


@contextlib.contextmanager
def stop_signals():
    """SIGINT and SIGTERM during training set a flag instead of killing the run: the loop saves a checkpoint
    after the step in progress and stops. -> the list that names the signal once one came."""
    came: list[int] = []
    handler = lambda signum, frame: came.append(signum)  # noqa: E731
    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@dataclass
class Run:
    """What the steps of `fit` share: the model and its optimiser, the task, the train state, and the state
    carried into the next batch (streams)."""

    model: RecurrentModel
    task: Task
    cfg: TrainerConfig
    logger: RunLogger
    optimizer: torch.optim.Optimizer
    st: TrainState
    best_weights: dict
    autocast: Callable
    batches: Iterator
    checkpoint_path: Path | None
    run_config: dict | None
    carried: tuple = (None, [])  # (state, BPTT history) the last step left
    started: float = 0.0  # perf_counter at step 0 of the (possibly resumed) run
    window_start: float = 0.0
    saved_step: int | None = None  # the step of the last checkpoint this run wrote
    bf16: bool = False  # training in bf16 autocast
    eval_bf16: bool = False  # evaluation in bf16 autocast (decided apart: precision.py)
    eval_autocast: Callable = contextlib.nullcontext
    dist: Dist = SOLO  # this process's rank among torchrun's (rank 0 validates, logs, checkpoints, tests)
    signal: int = 0  # the signal that stops the run (rank 0's, on every rank)
    curriculum: Curriculum | None = None  # the stages of the task's settings (trainer.curriculum), or none

    @property
    def budget(self) -> int:
        return self.st.budget_steps

    def checkpoint(self) -> None:
        """Rank 0 writes the checkpoint, with every other rank's random stream and carried state (all ranks
        call this: it gathers them)."""
        ranks = self.dist.gather(rank_payload(self.carried)) if self.dist.world > 1 else [None]
        if self.checkpoint_path is not None and self.dist.main:
            st = self.st
            save_checkpoint(self.checkpoint_path, self.model, self.optimizer, st, self.best_weights, self.carried,
                            self.run_config, ranks[1:])  # fmt: skip
            self.saved_step = st.step


def set_up(model, task, cfg, logger, seed, device, checkpoint_path, resume, run_config, dist=SOLO) -> Run:
    """The optimiser, the resumed state if any, the precision, and the step budget (fixed once)."""
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    st, best_weights, carried = TrainState(), copy.deepcopy(model.state_dict()), (None, [])
    if resume:
        if checkpoint_path is None or not checkpoint_path.exists():
            raise ConfigError("resume", f"no checkpoint at {checkpoint_path}; pass hydra.run.dir=<the run to resume>")
        st, best_weights, carried, warning = load_checkpoint(
            checkpoint_path, model, optimizer, st, run_config, dist.rank, dist.world
        )
        logger.truncate(st.step)  # metrics logged after the checkpoint come again
        logger.info(f"resumed from {checkpoint_path} at step {st.step}")
        if warning:
            logger.info(warning)
    # rank 0 chooses the precisions of training and evaluation (measured once per machine) for all
    bf16, eval_bf16, why = dist.broadcast(resolve_precision(cfg.precision, device) if dist.main else None)
    if cfg.precision == "auto":
        logger.info(why)
    autocast, eval_autocast = autocast_factory(device, bf16), autocast_factory(device, eval_bf16)
    horizon = st.budget_steps
    if how := fix_budget(model, task, cfg, st, seed, device, autocast, dist, eval_autocast):
        logger.info(how)
    if resume and horizon and st.budget_steps != horizon:
        logger.info(
            f"warning: the step budget moves from {horizon} to {st.budget_steps} steps: the schedule follows it, so "
            f"the steps after {st.step} differ from an uninterrupted {horizon}-step run"
        )
    logger.update_config({"trainer": {"max_steps": st.budget_steps}})
    logger.start_progress(st.budget_steps, initial=st.step)
    curriculum = Curriculum(cfg.curriculum, task, device) if cfg.curriculum.on else None
    if curriculum is not None:
        logger.info(f"curriculum: {curriculum.describe()}; stage {st.stage} ({curriculum.value(st.stage)}) at step "
                    f"{st.step}")  # fmt: skip
        batches = curriculum.batches(st, cfg.batch_size, seed)
    else:
        batches = task.train_batches(cfg.batch_size, seed, start_step=st.step)
    now = time.perf_counter()
    return Run(model, task, cfg, logger, optimizer, st, best_weights, autocast, (dist.shard(b) for b in batches),
               checkpoint_path, run_config, carried, started=now - st.train_seconds, window_start=now, bf16=bf16,
               eval_bf16=eval_bf16, eval_autocast=eval_autocast, dist=dist, curriculum=curriculum)  # fmt: skip


def training_step(run: Run) -> str | None:
    """One optimiser step on the next batch, and the training log line when one is due. -> "non_finite_loss" if
    the loss is not finite (nothing of the step is logged or saved), else None."""
    st, cfg, step_start = run.st, run.cfg, time.perf_counter()
    batch = next(run.batches)
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg, st.step, run.budget) * st.plateau_scale
    run.carried = run.task.carried_in(st.step, cfg.batch_size, run.carried)
    loss, run.carried = train_step(
        run.model, run.optimizer, batch, cfg, run.carried, run.autocast, run.task.stream, run.dist
    )
    if not math.isfinite(loss):
        return "non_finite_loss"
    st.step_seconds += time.perf_counter() - step_start
    st.step += 1
    st.window_loss, st.window_steps = st.window_loss + loss, st.window_steps + 1
    st.window_tokens += batch.inputs.numel() * run.dist.world
    st.tokens += batch.inputs.numel() * run.dist.world
    run.logger.advance(loss)
    if st.step % cfg.log_every == 0 or st.step == run.budget:
        elapsed = time.perf_counter() - run.window_start
        run.logger.log({"train/loss": st.window_loss / st.window_steps, "train/lr": run.optimizer.param_groups[0]["lr"],
                        "train/tokens_per_s": st.window_tokens / elapsed}, st.step)  # fmt: skip
        st.window_loss, st.window_steps, st.window_tokens = 0.0, 0, 0
        run.window_start = time.perf_counter()
    return None


def evaluate_and_checkpoint(run: Run) -> str | None:
    """Every `eval_every` steps and at the last: validate, keep the best weights, step the plateau schedule,
    log, checkpoint. -> "non_finite_loss" (weights went non-finite: nothing saved), "early_stop_acc", or None.
    Rank 0 validates; the plateau scale and the early stop reach the other ranks from it."""
    st, cfg = run.st, run.cfg
    if st.step % cfg.eval_every and st.step != run.budget:
        return None
    if not weights_finite(run.model):  # the weights are the same on every rank: so is the answer
        st.step -= 1  # the step that made the weights non-finite
        return "non_finite_loss"
    early_stop, stage_log = False, {}
    if run.dist.main:
        val = evaluate(run.model, run.task, "valid", cfg.eval_batch_size, run.eval_autocast)
        if score(val) > st.best_score:
            st.best_score, st.best_step, st.best_val = score(val), st.step, val
            run.best_weights = copy.deepcopy(run.model.state_dict())
        if cfg.schedule == "plateau":
            plateau_step(st, cfg, val["loss"])
        early_stop = cfg.early_stop_acc is not None and val.get("acc", -1.0) >= cfg.early_stop_acc
        if run.curriculum is not None:
            stage_log = next_stage(run)
    st.plateau_scale, early_stop = run.dist.broadcast((st.plateau_scale, early_stop))
    if run.curriculum is not None:
        st.stage, st.stage_starts = run.dist.broadcast((st.stage, st.stage_starts))
    st.train_seconds = time.perf_counter() - run.started
    if run.dist.main:
        logged = {f"val/{k}": v for k, v in val.items()} | stage_log | {"time/minutes": st.train_seconds / 60}
        run.logger.log(logged, st.step)
    run.checkpoint()
    return "early_stop_acc" if early_stop else None


def next_stage(run: Run) -> dict:
    """The curriculum's stage validation (at the stage's own setting) and the decision to start the next stage.
    -> what to log beside the validation: `curriculum/stage`, the key's value, the stage's accuracy."""
    st, curriculum = run.st, run.curriculum
    metrics = {"curriculum/stage": st.stage, f"curriculum/{curriculum.cfg.key}": curriculum.value(st.stage)}
    if st.stage == curriculum.last:
        return metrics
    stage_val = evaluate(run.model, curriculum.task(st.stage), "valid", run.cfg.eval_batch_size, run.eval_autocast)
    metrics["curriculum/stage_acc"] = stage_val["acc"]
    if st.step < run.budget and curriculum.advance(st, stage_val["acc"]):
        run.logger.info(f"curriculum: stage {st.stage} ({curriculum.cfg.key}={curriculum.value(st.stage)}) from step "
                        f"{st.step} (the last stage's validation: {stage_val['acc']:.4f})")  # fmt: skip
    return metrics


def stop_condition(run: Run, signals: list[int]) -> str | None:
    """The budget is spent, or a signal came (SIGINT / SIGTERM: the step just made is kept; rank 0's decides)."""
    run.signal = run.dist.broadcast(signals[0] if signals else 0)
    if run.signal:
        return "signal"
    if run.st.step >= run.budget:
        return "max_minutes" if run.st.budget_minutes is not None and run.budget < run.cfg.max_steps else "max_steps"
    return None


def stop_early(run: Run, reason: str) -> None:
    """A signal or a non-finite loss ends the run here: one line, the exit status, what was kept."""
    st = run.st
    if reason == "signal":
        st.train_seconds = time.perf_counter() - run.started
        try:
            run.checkpoint()
            kept = f"checkpoint saved at step {st.step}; resume=true continues it"
        except CheckpointError as exc:
            kept = str(exc)
        raise RunStopped(f"stopped: {signal.Signals(run.signal).name} at step {st.step}: {kept}", 128 + run.signal)
    if reason == "non_finite_loss":
        kept = (
            f"checkpoint.pt keeps step {run.saved_step}" if run.saved_step is not None else "no checkpoint was written"
        )
        lr = run.optimizer.param_groups[0]["lr"]
        raise RunStopped(
            f"error: trainer: non-finite loss or weights at step {st.step + 1} (lr {lr:.3g}): the run stopped; "
            f"{kept}; summary.json: stop_reason=non_finite_loss",
            1,
            {"stop_reason": reason, "steps": st.step, "best_step": st.best_step, "budget_steps": run.budget},
        )


def final_test(run: Run, stop_reason: str, device: torch.device) -> dict:
    """Test the best-validation weights (and, with `memory_reset_control`, again with the memory reset at every
    segment); -> the run's summary (rank 0; the other ranks are done: an empty one)."""
    model, st, cfg = run.model, run.st, run.cfg
    if not run.dist.main:
        return {}
    train_seconds = time.perf_counter() - run.started
    model.load_state_dict(run.best_weights)
    test_start = time.perf_counter()
    test = evaluate(model, run.task, "test", cfg.eval_batch_size, run.eval_autocast)
    metrics = {f"test/{k}": v for k, v in test.items()}
    if cfg.memory_reset_control and model.writes(model.initial_state()):
        reset = evaluate(model, run.task, "test", cfg.eval_batch_size, run.eval_autocast, reset_memory=True)
        metrics |= {f"test_memory_reset/{k}": v for k, v in reset.items()}
    run.logger.log(metrics, st.step)
    return metrics | {f"val/best_{k}": v for k, v in st.best_val.items()} | {
        "best_step": st.best_step, "steps": st.step, "stop_reason": stop_reason, "budget_steps": run.budget,
        "seconds_per_step_measured": st.seconds_per_step, "train_minutes": train_seconds / 60,
        "test_minutes": (time.perf_counter() - test_start) / 60,
        "tokens_per_s": st.tokens / max(st.step_seconds, 1e-9), "peak_memory_mb": peak_memory_mb(device),
        "params": sum(p.numel() for p in model.parameters()), "precision": "bf16" if run.bf16 else "fp32",
        "eval_precision": "bf16" if run.eval_bf16 else "fp32",
        "world_size": run.dist.world,
    } | curriculum_summary(run)  # fmt: skip


def curriculum_summary(run: Run) -> dict:
    """What summary.json says of the curriculum: the schedule, and the step at which each stage reached began."""
    if run.curriculum is None:
        return {"curriculum": None}
    starts = {str(run.curriculum.value(i)): step for i, step in enumerate(run.st.stage_starts)}
    return {"curriculum": run.curriculum.describe(), "curriculum_stage": run.st.stage, "curriculum_starts": starts}


def fit(
    model: RecurrentModel,
    task: Task,
    cfg: TrainerConfig,
    logger: RunLogger,
    seed: int,
    device: torch.device,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    dist: Dist = SOLO,
) -> dict:
    """Train for a fixed step budget, validating every `eval_every` steps; test the best-validation weights.
    `run_config` (the resolved config) goes into every checkpoint; a resume with other trajectory keys is refused.
    `dist`: this process's rank of several (torchrun; train/distributed.py)."""
    run = set_up(model, task, cfg, logger, seed, device, checkpoint_path, resume, run_config, dist)
    with stop_signals() as signals:
        reason = stop_condition(run, signals)  # a resumed run may have nothing left to do
        while reason is None:
            reason = training_step(run) or evaluate_and_checkpoint(run) or stop_condition(run, signals)
        logger.close_progress()
        stop_early(run, reason)
    return final_test(run, reason, device)
