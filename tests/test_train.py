"""The training loop: loss falls on a tiny reverse task, resume is exact, bad checkpoints fail in one line."""

from __future__ import annotations

import contextlib
import json

import torch

from rmt_bench.cli import run, to_run_config
from rmt_bench.logging import RunLogger
from rmt_bench.models import build_model
from rmt_bench.tasks import build_task
from rmt_bench.train.loop import evaluate, fit, lr_factor
from tests.conftest import TINY, run_cli, tiny_model, tiny_task
from tests.test_cli import compose_cfg


def test_rmt_loss_clearly_falls_on_tiny_reverse(tmp_path):
    """Reverse-4 in 2 segments: the answer is only in memory; rmt's loss falls well below chance."""
    from rmt_bench.config import LoggerConfig, TrainerConfig

    task = build_task(tiny_task("reverse", length=4, segments=2, train_size=2000, valid_size=200, test_size=200))
    model = build_model(
        tiny_model("rmt", num_mem_tokens=2, d_model=64, d_head=16, n_head=4, d_inner=128), task.vocab_size
    )
    trainer = TrainerConfig(
        device="cpu",
        optimizer="adamw",
        lr=3e-3,
        schedule="constant",
        batch_size=32,
        max_steps=600,
        eval_every=200,
        log_every=25,
        eval_batch_size=200,
        grad_clip=1.0,
    )
    logger = RunLogger(LoggerConfig(kind="none"), tmp_path, {})
    summary = fit(model, task, trainer, logger, seed=0, device=torch.device("cpu"))
    logger.finish()
    losses = [
        json.loads(x)["train/loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/loss" in x
    ]
    chance = torch.log(torch.tensor(10.0)).item()
    # memory tasks learn in jumps whose timing varies with the seed: "clearly" = well below chance, not solved
    assert losses[0] > 0.95 * chance and min(losses[-4:]) < 0.8 * chance, losses
    assert summary["test/acc"] > 0.2  # twice chance


def test_evaluate_uniform_model_is_at_chance():
    task = build_task(tiny_task("reverse", num_symbols=10, valid_size=50))
    model = build_model(tiny_model("vanilla"), task.vocab_size)
    torch.nn.init.zeros_(model.head.proj.weight)
    torch.nn.init.zeros_(model.head.proj.bias)
    out = evaluate(model, task, "valid", 16, contextlib.nullcontext)
    assert abs(out["loss"] - torch.log(torch.tensor(float(task.vocab_size))).item()) < 1e-5


def test_resume_continues_bit_for_bit(tmp_path):
    base = [*TINY, "trainer.schedule=constant", "trainer.eval_every=2", "trainer.log_every=1", "model.dropout=0.1"]
    full = run(to_run_config(compose_cfg([*base, "trainer.max_steps=6"])), tmp_path / "full")
    run(to_run_config(compose_cfg([*base, "trainer.max_steps=4"])), tmp_path / "split")
    resumed = run(to_run_config(compose_cfg([*base, "trainer.max_steps=6", "resume=true"])), tmp_path / "split")

    def losses(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    assert full["test/acc"] == resumed["test/acc"] and full["test/loss"] == resumed["test/loss"]


def test_corrupt_checkpoint_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    res = run_cli(*TINY, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checkpoint.pt" in lines[0], res.stderr


def test_resume_without_checkpoint_is_one_line(tmp_path):
    res = run_cli(*TINY, "resume=true", f"hydra.run.dir={tmp_path}/empty", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: resume: no checkpoint")


def test_lr_schedules():
    from rmt_bench.config import TrainerConfig

    cos = TrainerConfig(schedule="cosine", warmup_steps=10, max_steps=110, lr=1.0, min_lr=0.1)
    assert lr_factor(cos, 0) == 0.1 and lr_factor(cos, 9) == 1.0
    assert abs(lr_factor(cos, 60) - 0.55) < 1e-9 and abs(lr_factor(cos, 110) - 0.1) < 1e-9
    assert lr_factor(TrainerConfig(schedule="constant"), 1000) == 1.0


def test_plateau_halves_the_lr_after_patience():
    from rmt_bench.config import TrainerConfig
    from rmt_bench.train.loop import TrainState, plateau_step

    cfg = TrainerConfig(schedule="plateau", plateau_patience=2, plateau_factor=0.5, lr=1.0)
    st = TrainState()
    for loss in (3.0, 2.0, 2.0, 2.0):
        plateau_step(st, cfg, loss)
    assert st.plateau_scale == 1.0
    plateau_step(st, cfg, 2.5)  # third evaluation without improvement
    assert st.plateau_scale == 0.5 and st.plateau_bad == 0
