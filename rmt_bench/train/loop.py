"""fit / evaluate: the training loop as named steps (set up, training step, evaluate and checkpoint, stop
conditions, final test) over the task interface (tasks/__init__.py); read top to bottom.

The loop owns the device, autocast, the optimiser and schedule; the model knows none of it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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
from rmt_bench.models import RecurrentModel, StreamState, train_segments
from rmt_bench.tasks import Batch, Task
from rmt_bench.train.budget import fix_budget, step_budget  # noqa: F401 (step_budget: part of the loop's API)
from rmt_bench.train.checkpoint import (
    Part,
    Value,
    load_checkpoint,
    random_streams,
    save_checkpoint,
    stream_from_payload,
    stream_to_payload,
    weights_finite,
)
from rmt_bench.train.curriculum import Curriculum
from rmt_bench.train.distributed import SOLO, Dist
from rmt_bench.train.precision import resolve as resolve_precision
from rmt_bench.train.state import StopReason, TrainState


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


@dataclass(frozen=True)
class Precision:
    """bf16 autocast or not, for training and for evaluation apart (train/precision.py decides), and the context
    factories that apply it."""

    train_bf16: bool = False
    eval_bf16: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def train(self) -> Callable:
        return autocast_factory(self.device, self.train_bf16)

    @property
    def eval(self) -> Callable:
        return autocast_factory(self.device, self.eval_bf16)


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


def evaluate(model: RecurrentModel, task: Task, split: str, batch_size: int, autocast, **settings) -> dict:
    """The task's metrics on `split` in eval mode (`Task.evaluate`; settings such as `reset_memory` pass on)."""
    was_training = model.training
    model.eval()
    try:
        return task.evaluate(model, split, batch_size, autocast, **settings)
    finally:
        model.train(was_training)


def plateau_step(train_state: TrainState, cfg: TrainerConfig, val_loss: float) -> None:
    """Sec. 4.1: halve the lr when the validation loss has not improved for `plateau_patience` evaluations."""
    ts = train_state
    if val_loss < ts.plateau_best - 1e-4:
        ts.plateau_best, ts.plateau_bad = val_loss, 0
        return
    ts.plateau_bad += 1
    if ts.plateau_bad > cfg.plateau_patience:
        ts.plateau_scale = max(ts.plateau_scale * cfg.plateau_factor, cfg.min_lr / cfg.lr)
        ts.plateau_bad = 0


def train_step(
    *,
    model: RecurrentModel,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: TrainerConfig,
    carried: StreamState,
    autocast,
    keep_final_state: bool,
    dist: Dist = SOLO,
) -> tuple[float, StreamState]:
    """One optimiser step over a batch's segments, starting from `carried` (the last batch's stream state on
    streams; empty for fresh examples, which start at the batch's front padding). `keep_final_state` false (fresh
    examples: nothing goes on to the next batch) spares the last segment's write block. With several processes
    `batch` is this rank's shard: the loss is normalised by the answer tokens of the global batch and the gradients
    are summed over the ranks before clipping. -> (the global loss, the stream state for the next batch)."""
    optimizer.zero_grad(set_to_none=True)
    weights = batch.loss_mask.float()
    norm = dist.sum(weights.sum().item())  # answer tokens of the global batch
    loss, state, history = train_segments(
        model, batch.inputs, batch.targets, weights, norm, model.cfg.bptt_depth, carried.state, carried.history,
        autocast, final_state=keep_final_state, pad=batch.pad_front,
    )  # fmt: skip
    dist.all_reduce_grads(model)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return dist.sum(loss), StreamState(state, history)


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
    """What the steps of `fit` share: the model and its optimiser, the task (and the curriculum over its settings),
    the train state, the stream state carried into the next batch, and where the checkpoint goes."""

    model: RecurrentModel
    task: Task
    cfg: TrainerConfig
    logger: RunLogger
    optimizer: torch.optim.Optimizer
    train_state: TrainState
    best_weights: dict  # the weights of the best validation so far (tested at the end)
    precision: Precision
    batches: Iterator[Batch]
    checkpoint_path: Path | None
    run_config: dict | None  # the resolved config, written into every checkpoint
    carried: StreamState = field(default_factory=StreamState)  # what the last step left for the next
    curriculum: Curriculum | None = None  # the stages of the task's settings (trainer.curriculum), or none
    dist: Dist = SOLO  # this process's rank among torchrun's (rank 0 validates, logs, checkpoints, tests)
    started: float = 0.0  # perf_counter at step 0 of the (possibly resumed) run
    window_start: float = 0.0  # perf_counter when the logging window began
    saved_step: int | None = None  # the step of the last checkpoint this run wrote
    signal: int = 0  # the signal that stops the run (rank 0's, on every rank)

    @property
    def budget(self) -> int:
        return self.train_state.budget_steps

    def parts(self) -> dict[str, Part]:
        """The checkpoint's parts every process shares, by name (train/checkpoint.py)."""

        def put_train_state(data: dict) -> None:
            self.train_state = TrainState(**data)

        def put_best(weights: dict | None) -> None:
            self.best_weights = weights or self.model.state_dict()

        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "train_state": Value(lambda: dataclasses.asdict(self.train_state), put_train_state),
            "best_model": Value(lambda: self.best_weights, put_best),
        }

    def rank_parts(self) -> dict[str, Part]:
        """This process's own parts: its random streams and the stream state it carries."""
        device = next(self.model.parameters()).device

        def put_carried(data: dict | None) -> None:
            self.carried = stream_from_payload(data, device)

        return random_streams() | {"carried": Value(lambda: stream_to_payload(self.carried), put_carried)}

    def checkpoint(self) -> None:
        """Rank 0 writes the checkpoint, with every other rank's own parts (all ranks call this: it gathers them)."""
        own = {name: part.state_dict() for name, part in self.rank_parts().items()}
        ranks = self.dist.gather(own) if self.dist.world > 1 else [own]
        if self.checkpoint_path is not None and self.dist.main:
            save_checkpoint(self.checkpoint_path, self.parts() | self.rank_parts(), self.run_config, ranks[1:])
            self.saved_step = self.train_state.step


def set_up(model, task, cfg, logger, seed, device, checkpoint_path, resume, run_config, dist=SOLO) -> Run:
    """The optimiser, the resumed state if any, the precision, the step budget (fixed once) and the batches."""
    model.to(device).train()
    run = Run(model=model, task=task, cfg=cfg, logger=logger, optimizer=make_optimizer(model, cfg),
              train_state=TrainState(), best_weights=copy.deepcopy(model.state_dict()), precision=Precision(),
              batches=iter(()), checkpoint_path=checkpoint_path, run_config=run_config, dist=dist)  # fmt: skip
    if resume:
        if checkpoint_path is None or not checkpoint_path.exists():
            raise ConfigError("resume", f"no checkpoint at {checkpoint_path}; pass hydra.run.dir=<the run to resume>")
        warning = load_checkpoint(checkpoint_path, run.parts(), run.rank_parts(), run_config, dist.rank, dist.world)
        logger.truncate(run.train_state.step)  # metrics logged after the checkpoint come again
        logger.info(f"resumed from {checkpoint_path} at step {run.train_state.step}")
        if warning:
            logger.info(warning)
    ts = run.train_state
    # rank 0 chooses the precisions of training and evaluation (measured once per machine) for all
    bf16, eval_bf16, why = dist.broadcast(resolve_precision(cfg.precision, device) if dist.main else None)
    if cfg.precision == "auto":
        logger.info(why)
    run.precision = Precision(bf16, eval_bf16, device)
    horizon = ts.budget_steps
    if how := fix_budget(model, task, cfg, ts, seed, device, run.precision.train, dist, run.precision.eval):
        logger.info(how)
    if resume and horizon and ts.budget_steps != horizon:
        logger.info(
            f"warning: the step budget moves from {horizon} to {ts.budget_steps} steps: the schedule follows it, so "
            f"the steps after {ts.step} differ from an uninterrupted {horizon}-step run"
        )
    logger.update_config({"trainer": {"max_steps": ts.budget_steps}})
    logger.start_progress(ts.budget_steps, initial=ts.step)
    if cfg.curriculum.on:
        run.curriculum = Curriculum(cfg.curriculum, task, device)
        logger.info(f"curriculum: {run.curriculum.describe()}; stage {ts.stage} ({run.curriculum.value(ts.stage)}) "
                    f"at step {ts.step}")  # fmt: skip
        batches = run.curriculum.batches(ts, cfg.batch_size, seed)  # reads the stage as the loop advances it
    else:
        batches = task.train_batches(cfg.batch_size, seed, start_step=ts.step)
    run.batches = (dist.shard(b) for b in batches)
    run.started = run.window_start = time.perf_counter()
    run.started -= ts.train_seconds
    return run


def training_step(run: Run) -> StopReason | None:
    """One optimiser step on the next batch, and the training log line when one is due. -> NON_FINITE if the loss
    is not finite (nothing of the step is logged or saved), else None."""
    ts, cfg, step_start = run.train_state, run.cfg, time.perf_counter()
    batch = next(run.batches)
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg, ts.step, run.budget) * ts.plateau_scale
    run.carried = run.task.carried_in(ts.step, cfg.batch_size, run.carried)
    loss, run.carried = train_step(
        model=run.model, optimizer=run.optimizer, batch=batch, cfg=cfg, carried=run.carried,
        autocast=run.precision.train, keep_final_state=run.task.stream, dist=run.dist,
    )  # fmt: skip
    if not math.isfinite(loss):
        return StopReason.NON_FINITE
    ts.step_seconds += time.perf_counter() - step_start
    ts.step += 1
    ts.window_loss, ts.window_steps = ts.window_loss + loss, ts.window_steps + 1
    ts.window_tokens += batch.inputs.numel() * run.dist.world
    ts.tokens += batch.inputs.numel() * run.dist.world
    run.logger.advance(loss)
    if ts.step % cfg.log_every == 0 or ts.step == run.budget:
        elapsed = time.perf_counter() - run.window_start
        run.logger.log({"train/loss": ts.window_loss / ts.window_steps, "train/lr": run.optimizer.param_groups[0]["lr"],
                        "train/tokens_per_s": ts.window_tokens / elapsed}, ts.step)  # fmt: skip
        ts.window_loss, ts.window_steps, ts.window_tokens = 0.0, 0, 0
        run.window_start = time.perf_counter()
    return None


def improves(ts: TrainState, score: float, val: dict) -> bool:
    """Whether a validation beats the best so far: a higher score, or an equal score at a lower loss (accuracy at its
    ceiling, as a curriculum with early stop off reaches long before its schedule ends: the later, better-trained
    weights, not the first to touch the ceiling)."""
    tie = score == ts.best_score and val.get("loss", math.inf) < ts.best_val.get("loss", math.inf)
    return score > ts.best_score or tie


def evaluate_and_checkpoint(run: Run) -> StopReason | None:
    """Every `eval_every` steps and at the last: validate, keep the best weights, step the plateau schedule, the
    curriculum's stage, log, checkpoint. -> NON_FINITE (weights went non-finite: nothing saved), EARLY_STOP, or
    None. Rank 0 validates; the plateau scale, the stage and the early stop reach the other ranks from it."""
    ts, cfg = run.train_state, run.cfg
    if ts.step % cfg.eval_every and ts.step != run.budget:
        return None
    if not weights_finite(run.model):  # the weights are the same on every rank: so is the answer
        ts.step -= 1  # the step that made the weights non-finite
        return StopReason.NON_FINITE
    early_stop, stage_log = False, {}
    if run.dist.main:
        val = evaluate(run.model, run.task, "valid", cfg.eval_batch_size, run.precision.eval)
        score = run.task.metric.score(val)  # the task's headline, higher is better
        if improves(ts, score, val):
            ts.best_score, ts.best_step, ts.best_val = score, ts.step, val
            run.best_weights = copy.deepcopy(run.model.state_dict())
        if cfg.schedule == "plateau":
            plateau_step(ts, cfg, val["loss"])
        early_stop = cfg.early_stop_acc is not None and val.get("acc", -1.0) >= cfg.early_stop_acc
        if run.curriculum is not None:
            stage_log = next_stage(run)
    ts.plateau_scale, early_stop = run.dist.broadcast((ts.plateau_scale, early_stop))
    if run.curriculum is not None:
        ts.stage, ts.stage_starts = run.dist.broadcast((ts.stage, ts.stage_starts))
    ts.train_seconds = time.perf_counter() - run.started
    if run.dist.main:
        logged = {f"val/{k}": v for k, v in val.items()} | stage_log | {"time/minutes": ts.train_seconds / 60}
        run.logger.log(logged, ts.step)
    run.checkpoint()
    return StopReason.EARLY_STOP if early_stop else None


def next_stage(run: Run) -> dict:
    """The curriculum's stage validation (at the stage's own setting) and the decision to start the next stage.
    -> what to log beside the validation: `curriculum/stage`, the key's value, the stage's accuracy."""
    ts, curriculum = run.train_state, run.curriculum
    metrics = {"curriculum/stage": ts.stage} | {f"curriculum/{k}": v for k, v in curriculum.values(ts.stage).items()}
    if ts.stage == curriculum.last:
        return metrics
    stage_val = evaluate(run.model, curriculum.task(ts.stage), "valid", run.cfg.eval_batch_size, run.precision.eval)
    metrics["curriculum/stage_acc"] = stage_val["acc"]
    if ts.step < run.budget and curriculum.advance(ts, stage_val["acc"]):
        named = ",".join(curriculum.cfg.keys)
        run.logger.info(f"curriculum: stage {ts.stage} ({named}={curriculum.value(ts.stage)}) from step {ts.step} "
                        f"(the last stage's validation: {stage_val['acc']:.4f})")  # fmt: skip
    return metrics


def stop_condition(run: Run, signals: list[int]) -> StopReason | None:
    """The budget is spent, or a signal came (SIGINT / SIGTERM: the step just made is kept; rank 0's decides)."""
    run.signal = run.dist.broadcast(signals[0] if signals else 0)
    if run.signal:
        return StopReason.SIGNAL
    ts = run.train_state
    if ts.step >= run.budget:
        by_minutes = ts.budget_minutes is not None and run.budget < run.cfg.max_steps
        return StopReason.MAX_MINUTES if by_minutes else StopReason.MAX_STEPS
    return None


def stop_early(run: Run, reason: StopReason) -> None:
    """A signal or a non-finite loss ends the run here: one line, the exit status, what was kept."""
    ts = run.train_state
    if reason == StopReason.SIGNAL:
        ts.train_seconds = time.perf_counter() - run.started
        try:
            run.checkpoint()
            kept = f"checkpoint saved at step {ts.step}; resume=true continues it"
        except CheckpointError as exc:
            kept = str(exc)
        raise RunStopped(f"stopped: {signal.Signals(run.signal).name} at step {ts.step}: {kept}", 128 + run.signal)
    if reason == StopReason.NON_FINITE:
        kept = (
            f"checkpoint.pt keeps step {run.saved_step}" if run.saved_step is not None else "no checkpoint was written"
        )
        lr = run.optimizer.param_groups[0]["lr"]
        raise RunStopped(
            f"error: trainer: non-finite loss or weights at step {ts.step + 1} (lr {lr:.3g}): the run stopped; "
            f"{kept}; summary.json: stop_reason=non_finite_loss",
            1,
            {"stop_reason": reason.value, "steps": ts.step, "best_step": ts.best_step, "budget_steps": run.budget},
        )


def final_test(run: Run, stop_reason: StopReason, device: torch.device) -> dict:
    """Test the best-validation weights (and, with `memory_reset_control`, again with the memory reset at every
    segment); -> the run's summary (rank 0; the other ranks are done: an empty one)."""
    model, ts, cfg, metric = run.model, run.train_state, run.cfg, run.task.metric
    if not run.dist.main:
        return {}
    train_seconds = time.perf_counter() - run.started
    model.load_state_dict(run.best_weights)
    test_start = time.perf_counter()
    test = evaluate(model, run.task, "test", cfg.eval_batch_size, run.precision.eval)
    metrics = {f"test/{k}": v for k, v in test.items()}
    if cfg.memory_reset_control and model.writes(model.initial_state()):
        reset = evaluate(model, run.task, "test", cfg.eval_batch_size, run.precision.eval, reset_memory=True)
        metrics |= {f"test_memory_reset/{k}": v for k, v in reset.items()}
    run.logger.log(metrics, ts.step)
    return metrics | {f"val/best_{k}": v for k, v in ts.best_val.items()} | {
        "best_step": ts.best_step, "steps": ts.step, "stop_reason": stop_reason.value, "budget_steps": run.budget,
        "seconds_per_step_measured": ts.seconds_per_step, "train_minutes": train_seconds / 60,
        "test_minutes": (time.perf_counter() - test_start) / 60,
        "tokens_per_s": ts.tokens / max(ts.step_seconds, 1e-9), "peak_memory_mb": peak_memory_mb(device),
        "params": sum(p.numel() for p in model.parameters()),
        "precision": "bf16" if run.precision.train_bf16 else "fp32",
        "eval_precision": "bf16" if run.precision.eval_bf16 else "fp32",
        "world_size": run.dist.world, "metric": metric.headline,
        "higher_is_better": metric.higher_is_better[metric.headline],
    } | curriculum_summary(run)  # fmt: skip


def curriculum_summary(run: Run) -> dict:
    """What summary.json says of the curriculum: the schedule, and the step at which each stage reached began."""
    if run.curriculum is None:
        return {"curriculum": None}
    starts = {str(run.curriculum.value(i)): step for i, step in enumerate(run.train_state.stage_starts)}
    return {"curriculum": run.curriculum.describe(), "curriculum_stage": run.train_state.stage,
            "curriculum_starts": starts}  # fmt: skip


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
            reason = training_step(run)  # a non-finite loss: nothing of the step is validated or saved
            if reason is None:
                reason = evaluate_and_checkpoint(run)
            if reason is None:
                reason = stop_condition(run, signals)
        logger.close_progress()
        stop_early(run, reason)
    return final_test(run, reason, device)
