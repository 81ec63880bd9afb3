"""The job one `rmt-bench` command runs: build the task and the model, train, test, and the line that sums it up.

No Hydra here: `cli.py` hands over a validated `RunConfig` and the run directory.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rmt_bench.config import MODEL_SWITCHES, ConfigError, RunConfig, config_hash
from rmt_bench.errors import RunStopped

CHECKPOINT_FILE = "checkpoint.pt"


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, choices: dict | None = None) -> dict:
    """Build task and model, train, test; writes metrics.jsonl and summary.json into `run_dir`. `choices` (the
    Hydra config-group choices) go into config.json and W&B beside the resolved config."""
    import torch

    from rmt_bench.logging import NullLogger, RunLogger
    from rmt_bench.models import build_model, check_segments
    from rmt_bench.tasks import build_task
    from rmt_bench.train import distributed
    from rmt_bench.train.loop import fit, resolve_device

    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    dist, device = distributed.start(device)  # torchrun: this process's rank (else one process)
    if cfg.trainer.batch_size % dist.world:
        raise ConfigError(
            "trainer.batch_size",
            f"{cfg.trainer.batch_size} does not split over the {dist.world} processes of torchrun; "
            f"use a multiple of {dist.world} (every process takes batch_size / {dist.world} rows of each batch)",
        )
    run_dir = Path(dist.broadcast(str(run_dir)))  # rank 0's: the one checkpoint every rank resumes from
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task, device) if dist.main else None
    dist.broadcast(None)  # the others read the corpus cache (LM) once rank 0 has written it
    task = task if task is not None else build_task(cfg.task, device)
    model = build_model(cfg.model, task.vocab_size, task.pad_front)  # the same initial weights on every rank
    check_segments(model, cfg.task.segment_len, getattr(cfg.task, "eval_segment_len", None))
    # trainer.init_from: checked and loaded before anything is written (a resume then loads its own checkpoint)
    started_from = init_from(model, cfg) if cfg.trainer.init_from is not None else None
    if dist.rank:
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)  # each rank its own dropout stream
    config = asdict(cfg) | ({"choices": choices} if choices else {})
    logger = RunLogger(cfg.logger, run_dir, config, resume, cfg.task.metric) if dist.main else NullLogger()
    if started_from:
        logger.info(started_from)
    exit_code = 1
    try:
        summary = fit(
            model=model, task=task, cfg=cfg.trainer, logger=logger, seed=cfg.seed, device=device,
            checkpoint_path=run_dir / CHECKPOINT_FILE, resume=resume, run_config=asdict(cfg), dist=dist,
        )  # fmt: skip
        summary = identity(cfg) | summary if dist.main else {}
        logger.summary(summary)
        exit_code = 0
    except RunStopped as exc:
        if exc.summary is not None:  # a diverged run still says what happened, for the suite and the report
            logger.summary(identity(cfg) | exc.summary | {"world_size": dist.world})
        if not dist.main:
            raise SystemExit(exc.exit_code) from None  # rank 0 says it
        raise
    finally:
        logger.finish(exit_code)
        distributed.stop()
    return summary


def init_from(model, cfg: RunConfig) -> str:
    """trainer.init_from: the tested weights of a finished run of the same task and model (its other settings, e.g.
    the segment length or the filler, may differ) -> the line that says so, or one ConfigError line naming the key."""
    from rmt_bench.errors import CheckpointError
    from rmt_bench.finished import load_weights, read_config

    source = Path(cfg.trainer.init_from).expanduser()
    try:
        saved = read_config(source)
        if saved["task"]["name"] != cfg.task.name or saved["model"]["name"] != cfg.model.name:
            raise CheckpointError(f"{source} trained {saved['model']['name']} on {saved['task']['name']}, not "
                                  f"{cfg.model.name} on {cfg.task.name}")  # fmt: skip
        load_weights(model, source, what=f"this run's {cfg.model.name}")
    except CheckpointError as exc:
        raise ConfigError("trainer.init_from", str(exc)) from None
    return f"init_from: the tested weights of {source} (optimiser and schedule start afresh)"


def identity(cfg: RunConfig) -> dict:
    """What summary.json says of the run before its numbers: what ran, at which scale, the cell's hash."""
    return {
        "task": cfg.task.name, "model": cfg.model.name, "arch": cfg.model.arch, "scale": cfg.scale,
        "config_hash": config_hash(cfg), "mem": cfg.mem, "segments": cfg.task.segments, "seed": cfg.seed,
    }  # fmt: skip


def summary_line(s: dict) -> str:
    """The run in one line: its headline test metric (the task's `MetricSpec`, recorded as `metric`), the greedy
    and teacher-forced answer accuracies, the memory-reset control, the best validation, steps, speed, memory."""
    key = s["metric"]
    test = f"test {key} {s[f'test/{key}']:.4f}"
    if key in ("final_exact", "f1"):
        test += f" acc {s['test/acc']:.4f}"
    if "test/acc_tf" in s and key != "f1":  # one answer token: greedy, teacher-forced and exact are the same
        test += f" (greedy) acc_tf {s['test/acc_tf']:.4f} exact {s['test/exact']:.4f}"
    if "test_memory_reset/acc" in s:
        test += f" | memory reset: acc {s['test_memory_reset/acc']:.4f}"
    best = s.get(f"val/best_{key}", float("nan"))
    mem = f" mem={s['mem']}" if MODEL_SWITCHES.get(s["model"]) else ""  # vanilla has none (ignores `mem`)
    return (
        f"{s['task']} {s['model']}{mem} segments={s['segments']} seed={s['seed']} | {test} | "
        f"best val {best:.4f} @ {s['best_step']} | {s['steps']} steps {s['train_minutes']:.1f} min "
        f"{s['tokens_per_s']:.0f} tok/s peak {s['peak_memory_mb']:.0f} MB"
    )
