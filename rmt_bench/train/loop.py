"""fit / evaluate: setup, the training loop, evaluation; read top to bottom.

The loop owns the device, autocast, the optimiser and schedule; the model knows none of it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import signal
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rmt_bench.config import ConfigError, TrainerConfig
from rmt_bench.errors import CheckpointError, RunStopped
from rmt_bench.logging import RunLogger
from rmt_bench.models import RecurrentModel, generate_greedy, train_segments
from rmt_bench.tasks import AlgorithmicTask
from rmt_bench.train.checkpoint import load_checkpoint, save_checkpoint, weights_finite
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


# before the budget of a `max_minutes` run is fixed: untimed steps, then timed ones (at most this share of it)
CALIBRATION_WARMUP, CALIBRATION_STEPS, CALIBRATION_SHARE = 2, 10, 0.05


def step_budget(seconds: float, seconds_per_step: float, seconds_per_eval: float, eval_every: int) -> int:
    """How many steps fit in `seconds` when every step costs `seconds_per_step` and every `eval_every` steps
    a validation costs `seconds_per_eval` (at least one step)."""
    per_step = seconds_per_step + seconds_per_eval / eval_every
    return max(int(seconds / per_step), 1)


def fix_budget(model, task, cfg: TrainerConfig, st: TrainState, seed: int, device, autocast) -> str | None:
    """Set `st.budget_steps` once; returns a line for the log when it came from `max_minutes`. Then the speed
    is measured on a copy of the model and optimiser (training steps, then one validation) with the RNG put
    back afterwards, so the run does not depend on the measurement, only on the budget it yields; the budget
    is checkpointed and a resumed run keeps it."""
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
            _, carried = train_step(probe, optimizer, next(batches), cfg, carried, autocast, task.stream)
            carried = carried if task.stream else (None, [])  # as fit: fresh examples start fresh
            timed = i + 1 - CALIBRATION_WARMUP
            if timed >= 2 and time.perf_counter() - start > limit:
                break
        st.seconds_per_step = (time.perf_counter() - t0) / timed
        t0 = time.perf_counter()
        evaluate(probe, task, "valid", cfg.eval_batch_size, autocast)
        st.seconds_per_eval = time.perf_counter() - t0
    left = cfg.max_minutes * 60 - st.train_seconds - (time.perf_counter() - start)
    fits = step_budget(left, st.seconds_per_step, st.seconds_per_eval, cfg.eval_every)
    st.budget_steps, st.budget_minutes = min(st.step + fits, cfg.max_steps), cfg.max_minutes
    return (
        f"step budget: {st.budget_steps} steps fit trainer.max_minutes={cfg.max_minutes:g} "
        f"({st.seconds_per_step:.3f} s/step, {st.seconds_per_eval:.1f} s per validation); the run is now fixed "
        f"by its step count: trainer.max_steps={st.budget_steps} trainer.max_minutes=null repeats it"
    )


@torch.no_grad()
def evaluate(model: RecurrentModel, task, split: str, batch_size: int, autocast) -> dict:
    """Algorithmic tasks: loss and accuracy on the answer tokens, greedy across segments (`acc`, the paper's
    metric), teacher-forced (`acc_tf`), and whole-answer exact match of the greedy output (`exact`); tasks with a
    final answer at the end of a longer one (quadratic: step 6) also its exact match (`final_exact`).
    Streams: loss over the whole split carrying memory/cache, as perplexity (`ppl`) or bits per char (`bpc`)."""
    was_training = model.training
    model.eval()
    try:
        return (
            evaluate_stream(model, task, split, batch_size, autocast)
            if task.stream
            else evaluate_answers(model, task, split, batch_size, autocast)
        )
    finally:
        model.train(was_training)


def evaluate_answers(model: RecurrentModel, task, split: str, batch_size: int, autocast) -> dict:
    nll = correct = correct_tf = tokens = exact = final_exact = examples = 0.0
    final_len = getattr(task, "final_len", None)
    for batch in task.eval_batches(split, batch_size):
        mask = batch.loss_mask
        # segments before the first answer are the same teacher-forced and greedy, and never scored: run them
        # once, for the state they hand on (models that carry nothing skip them)
        answered = mask.flatten(2).any(2).any(0).nonzero()
        first = int(answered[0]) if len(answered) else 0
        with autocast():
            needs_prefix = first and (model.cfg.carries_state or model.pad_front)  # its state, or its padding
            _, state = model(batch.inputs[:, :first]) if needs_prefix else (None, None)
            rest, _ = model(batch.inputs[:, first:], state)
            preds, _ = generate_greedy(model, batch.inputs[:, first:], mask[:, first:], state)
            logits = model.head.logits(rest[mask[:, first:]]).float()
        preds = torch.cat([batch.targets[:, :first], preds], 1)  # (B, S, n)
        nll += torch.nn.functional.cross_entropy(logits, batch.targets[mask], reduction="sum").item()
        correct_tf += (logits.argmax(-1) == batch.targets[mask]).sum().item()
        hits = answer_hits(preds, batch.targets, mask, final_len)
        correct, exact, final_exact = correct + hits[0], exact + hits[1], final_exact + hits[2]
        tokens += mask.sum().item()
        examples += mask.shape[0]
    out = {"loss": nll / tokens, "acc": correct / tokens, "acc_tf": correct_tf / tokens, "exact": exact / examples}
    return out | ({"final_exact": final_exact / examples} if final_len else {})


def answer_hits(preds: Tensor, targets: Tensor, mask: Tensor, final_len: int | None) -> tuple[int, int, int]:
    """Greedy predictions against the targets, (B, S, n) each -> (answer tokens right, whole answers right,
    final answers right: the last `final_len` targets, 0 when the task has none)."""
    hit = ((preds == targets) | ~mask).flatten(1)
    final = hit[:, -final_len:].all(1).sum().item() if final_len else 0
    return (hit & mask.flatten(1)).sum().item(), hit.all(1).sum().item(), final


@contextlib.contextmanager
def memory_reset(model: RecurrentModel):
    """The control for recurrent memory: every segment reads the learned initial memory, nothing is carried
    from segment to segment (the write block, which the tokens never see, is left out). A model that stores
    the answer in its memory falls back to chance under it."""
    saved = model.cfg
    model.cfg = copy.copy(saved)
    model.cfg.recurrent_memory = False
    try:
        yield
    finally:
        model.cfg = saved


@contextlib.contextmanager
def eval_mem_len(model: RecurrentModel, mem_len: int | None):
    """Transformer-XL evaluates with a longer cache than it trains with."""
    saved = model.cfg.mem_len
    if mem_len is not None and saved:
        model.cfg.mem_len = mem_len
    try:
        yield
    finally:
        model.cfg.mem_len = saved


def evaluate_stream(model: RecurrentModel, task, split: str, batch_size: int, autocast) -> dict:
    nll, tokens, state = 0.0, 0, None
    with eval_mem_len(model, task.cfg.eval_mem_len):
        for batch in task.eval_batches(split, batch_size):
            with autocast():
                hidden, state = model(batch.inputs, state)
                nll += model.head.nll(hidden.flatten(0, 2), batch.targets.flatten()).sum().item()
            tokens += batch.targets.numel()
    loss = nll / tokens
    if task.cfg.level == "char":
        return {"loss": loss, "bpc": loss / math.log(2)}
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


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
    model: RecurrentModel, optimizer, batch, cfg: TrainerConfig, carried: tuple, autocast, carried_state: bool = True
):
    """One optimiser step over a batch's segments. `carried` = (state, BPTT history) handed from batch to batch
    on streams (None, [] on the algorithmic tasks, whose batches say carried_state=False: the final state is
    dropped). -> (loss, carried)."""
    optimizer.zero_grad(set_to_none=True)
    weights = batch.loss_mask.float()
    state, history = carried
    loss, state, history = train_segments(
        model, batch.inputs, batch.targets, weights, weights.sum().item(), model.cfg.bptt_depth, state, history,
        autocast, final_state=carried_state,
    )  # fmt: skip
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss, (state, history)


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


def fit(
    model: RecurrentModel,
    task: AlgorithmicTask,
    cfg: TrainerConfig,
    logger: RunLogger,
    seed: int,
    device: torch.device,
    checkpoint_path=None,
    resume: bool = False,
    run_config: dict | None = None,
) -> dict:
    """Train for a fixed step budget, validating every `eval_every` steps; test the best-validation weights
    (and, with `cfg.memory_reset_control`, test them again with the memory reset at every segment).
    `run_config` (the resolved config) goes into every checkpoint; a resume with other trajectory keys is refused."""
    # --- setup
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    st, best_weights = TrainState(), copy.deepcopy(model.state_dict())
    # streams (LM) carry memory/cache and the BPTT history from batch to batch, reset at each epoch
    carried = (None, [])
    if resume:
        if checkpoint_path is None or not checkpoint_path.exists():
            raise ConfigError("resume", f"no checkpoint at {checkpoint_path}; pass hydra.run.dir=<the run to resume>")
        st, best_weights, carried = load_checkpoint(checkpoint_path, model, optimizer, st, run_config)
        logger.truncate(st.step)  # metrics logged after the checkpoint come again
        logger.info(f"resumed from {checkpoint_path} at step {st.step}")
    bf16, why = resolve_precision(cfg.precision, device)
    if cfg.precision == "auto":
        logger.info(why)
    autocast = autocast_factory(device, bf16)
    t_start = time.perf_counter() - st.train_seconds
    horizon = st.budget_steps
    if how := fix_budget(model, task, cfg, st, seed, device, autocast):
        logger.info(how)
    if resume and horizon and st.budget_steps != horizon:
        logger.info(
            f"warning: the step budget moves from {horizon} to {st.budget_steps} steps: the schedule follows it, so "
            f"the steps after {st.step} differ from an uninterrupted {horizon}-step run"
        )
    logger.update_config({"trainer": {"max_steps": st.budget_steps}})
    budget = st.budget_steps
    batches = task.train_batches(cfg.batch_size, seed, start_step=st.step)
    per_epoch = task.steps_per_epoch(cfg.batch_size) if task.stream else 1
    logger.start_progress(budget, initial=st.step)
    window_start = time.perf_counter()
    stop_reason = "max_minutes" if st.budget_minutes is not None and budget < cfg.max_steps else "max_steps"

    saved = []  # the step of the last checkpoint written by this run

    def checkpoint() -> None:
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, model, optimizer, st, best_weights, carried, run_config)
            saved[:] = [st.step]

    # --- train
    with stop_signals() as signals:
        while st.step < budget:
            step_start = time.perf_counter()
            batch = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, st.step, budget) * st.plateau_scale
            if st.step % per_epoch == 0:
                carried = (None, [])
            loss, carried = train_step(model, optimizer, batch, cfg, carried, autocast, task.stream)
            if not math.isfinite(loss):
                stop_reason = "non_finite_loss"  # nothing of this step is logged or saved
                break
            st.step_seconds += time.perf_counter() - step_start
            st.step += 1
            st.window_loss += loss
            st.window_steps += 1
            st.window_tokens += batch.inputs.numel()
            st.tokens += batch.inputs.numel()
            logger.advance(loss)

            if st.step % cfg.log_every == 0 or st.step == budget:
                elapsed = time.perf_counter() - window_start
                lr = optimizer.param_groups[0]["lr"]
                logger.log({"train/loss": st.window_loss / st.window_steps, "train/lr": lr,
                            "train/tokens_per_s": st.window_tokens / elapsed}, st.step)  # fmt: skip
                st.window_loss, st.window_steps, st.window_tokens = 0.0, 0, 0
                window_start = time.perf_counter()

            if st.step % cfg.eval_every == 0 or st.step == budget:
                if not weights_finite(model):
                    st.step -= 1  # the step that made the weights non-finite
                    stop_reason = "non_finite_loss"
                    break
                val = evaluate(model, task, "valid", cfg.eval_batch_size, autocast)
                if score(val) > st.best_score:
                    st.best_score, st.best_step, st.best_val = score(val), st.step, val
                    best_weights = copy.deepcopy(model.state_dict())
                if cfg.schedule == "plateau":
                    plateau_step(st, cfg, val["loss"])
                st.train_seconds = time.perf_counter() - t_start
                logger.log({f"val/{k}": v for k, v in val.items()} | {"time/minutes": st.train_seconds / 60}, st.step)
                checkpoint()
                if cfg.early_stop_acc is not None and val.get("acc", -1.0) >= cfg.early_stop_acc:
                    stop_reason = "early_stop_acc"
                    break
            if signals:  # SIGINT / SIGTERM: keep the step just made, then stop
                st.train_seconds = time.perf_counter() - t_start
                name = signal.Signals(signals[0]).name
                try:
                    checkpoint()
                    kept = f"checkpoint saved at step {st.step}; resume=true continues it"
                except CheckpointError as exc:
                    kept = str(exc)
                logger.close_progress()
                raise RunStopped(f"stopped: {name} at step {st.step}: {kept}", 128 + signals[0])
    logger.close_progress()
    train_seconds = time.perf_counter() - t_start
    if stop_reason == "non_finite_loss":
        kept = f"checkpoint.pt keeps step {saved[0]}" if saved else "no checkpoint was written"
        lr = optimizer.param_groups[0]["lr"]
        raise RunStopped(
            f"error: trainer: non-finite loss or weights at step {st.step + 1} (lr {lr:.3g}): the run stopped; "
            f"{kept}; summary.json: stop_reason=non_finite_loss",
            1,
            {"stop_reason": stop_reason, "steps": st.step, "best_step": st.best_step, "budget_steps": budget},
        )

    # --- test with the best validation weights
    model.load_state_dict(best_weights)
    test_start = time.perf_counter()
    metrics = {f"test/{k}": v for k, v in evaluate(model, task, "test", cfg.eval_batch_size, autocast).items()}
    if cfg.memory_reset_control and model.cfg.num_mem_tokens and model.cfg.recurrent_memory:
        with memory_reset(model):
            reset = evaluate(model, task, "test", cfg.eval_batch_size, autocast)
        metrics |= {f"test_memory_reset/{k}": v for k, v in reset.items()}
    logger.log(metrics, st.step)
    return metrics | {f"val/best_{k}": v for k, v in st.best_val.items()} | {
        "best_step": st.best_step, "steps": st.step, "stop_reason": stop_reason, "budget_steps": budget,
        "seconds_per_step_measured": st.seconds_per_step, "train_minutes": train_seconds / 60,
        "test_minutes": (time.perf_counter() - test_start) / 60,
        "tokens_per_s": st.tokens / max(st.step_seconds, 1e-9), "peak_memory_mb": peak_memory_mb(device),
        "params": sum(p.numel() for p in model.parameters()), "precision": "bf16" if bf16 else "fp32",
    }  # fmt: skip
