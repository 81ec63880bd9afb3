"""The training loop: loss falls on a tiny reverse task, resume is exact, bad checkpoints fail in one line."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from rmt_bench.cli import to_run_config
from rmt_bench.job import run
from rmt_bench.logging import RunLogger
from rmt_bench.models import build_model
from rmt_bench.tasks import build_task
from rmt_bench.train.loop import evaluate, fit, improves, lr_factor
from rmt_bench.train.state import TrainState
from tests.helpers import TINY, compose_cfg, run_cli, tiny_model, tiny_task


def train_tiny_reverse(tmp_path, seed: int, **trainer_kw):
    """Reverse-4 in 2 segments: the 4 symbols sit in segment 1, the answer fills segment 2, so the answer is
    only in memory. The trainable backbone (pre-LN, init sqrt(2 / (5 d_model))), as the CPU presets use it."""
    from rmt_bench.config import LoggerConfig, TrainerConfig

    task = build_task(tiny_task("reverse", length=4, segments=2, train_size=4000, valid_size=200, test_size=500))
    torch.manual_seed(seed)
    model = build_model(
        tiny_model(
            "rmt", num_mem_tokens=2, d_model=64, d_head=16, n_head=4, d_inner=128, arch="trainable",
            pre_lnorm=True, init_std=(2 / 320) ** 0.5,
        ),
        task.vocab_size,
    )  # fmt: skip
    trainer = TrainerConfig(
        **(
            dict(device="cpu", precision="fp32", optimizer="adamw", lr=3e-3, schedule="cosine", warmup_steps=50,
                 min_lr=1e-4, batch_size=32, max_steps=250, eval_every=100, log_every=25, eval_batch_size=500,
                 grad_clip=1.0, memory_reset_control=True)
            | trainer_kw
        )
    )  # fmt: skip
    logger = RunLogger(LoggerConfig(kind="none"), tmp_path, {})
    summary = fit(model, task, trainer, logger, seed=seed, device=torch.device("cpu"))
    logger.finish()
    return summary


@pytest.fixture(scope="module", params=[0, 1, 2, 3, 4], ids=lambda s: f"seed{s}")
def tiny_reverse_run(request, tmp_path_factory):
    return train_tiny_reverse(tmp_path_factory.mktemp(f"reverse{request.param}"), request.param)


CHANCE = 0.1  # 10 symbols


def test_rmt_learns_a_memory_only_reverse(tiny_reverse_run):
    """Greedy answer accuracy far above chance for every seed: the memory carries the symbols (seeds 0-4 reach
    0.999-1.0 here; 0.9 is 9x chance and leaves room for other CPUs)."""
    assert tiny_reverse_run["test/acc"] >= 0.9, tiny_reverse_run
    assert tiny_reverse_run["test/loss"] < 0.5 * math.log(10), tiny_reverse_run


def test_memory_reset_brings_the_trained_model_back_to_chance(tiny_reverse_run):
    """The control that can fail: the same weights, the memory reset at every segment, are at chance."""
    assert tiny_reverse_run["test_memory_reset/acc"] <= CHANCE + 0.05, tiny_reverse_run
    assert tiny_reverse_run["test/acc"] - tiny_reverse_run["test_memory_reset/acc"] >= 2 * CHANCE


@pytest.mark.parametrize("name", ["vanilla", "xl", "rmt", "rmt_xl"])
def test_evaluation_equals_a_full_teacher_forced_pass_and_full_greedy_decoding(name):
    """evaluate() runs the answer-free leading segments once for both metrics; the numbers are those of a full
    teacher-forced pass and greedy decoding from the first segment (reverse-6 in 3 segments: answers from 2)."""
    from rmt_bench.models import generate_greedy

    task = build_task(tiny_task("reverse", length=6, segments=3, valid_size=40))
    torch.manual_seed(0)
    model = build_model(tiny_model(name, init_std=0.3), task.vocab_size).eval()  # outputs that follow the context
    got = evaluate(model, task, "valid", 16, contextlib.nullcontext)
    batch = task.splits["valid"]
    mask = batch.loss_mask
    assert not mask[:, 0].any() and mask[:, 1].any()  # the case the shortcut is for
    with torch.no_grad():
        hidden, _ = model(batch.inputs)
        logits = model.head.logits(hidden[mask])
        preds, _ = generate_greedy(model, batch.inputs, mask)
    hit = (preds == batch.targets) | ~mask
    assert abs(got["loss"] - torch.nn.functional.cross_entropy(logits, batch.targets[mask]).item()) < 1e-5
    assert got["acc_tf"] == (logits.argmax(-1) == batch.targets[mask]).sum().item() / mask.sum().item()
    assert got["acc"] == (hit & mask).sum().item() / mask.sum().item()
    assert got["exact"] == hit.flatten(1).all(1).sum().item() / mask.shape[0]


def test_evaluate_uniform_model_is_at_chance():
    task = build_task(tiny_task("reverse", num_symbols=10, valid_size=50))
    model = build_model(tiny_model("vanilla"), task.vocab_size)
    torch.nn.init.zeros_(model.head.proj.weight)
    torch.nn.init.zeros_(model.head.proj.bias)
    out = evaluate(model, task, "valid", 16, contextlib.nullcontext)
    assert abs(out["loss"] - torch.log(torch.tensor(float(task.vocab_size))).item()) < 1e-5


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


def test_the_best_validation_is_the_higher_score_then_at_a_tie_the_lower_loss():
    ts = TrainState()
    assert improves(ts, 0.2, {"loss": 9.0})  # anything beats nothing
    ts.best_score, ts.best_val = 1.0, {"acc": 1.0, "loss": 1e-3}
    assert improves(ts, 1.0, {"loss": 1e-5})  # accuracy at its ceiling again, better trained: kept
    assert not improves(ts, 1.0, {"loss": 1e-2}) and not improves(ts, 1.0, {"loss": 1e-3})
    assert not improves(ts, 0.99, {"loss": 1e-9})  # the score comes first


def test_lr_schedules():
    from rmt_bench.config import TrainerConfig

    cos = TrainerConfig(schedule="cosine", warmup_steps=10, max_steps=110, lr=1.0, min_lr=0.1)
    assert lr_factor(cos, 0, 110) == 0.1 and lr_factor(cos, 9, 110) == 1.0
    assert abs(lr_factor(cos, 60, 110) - 0.55) < 1e-9 and abs(lr_factor(cos, 110, 110) - 0.1) < 1e-9
    assert abs(lr_factor(cos, 35, 60) - 0.55) < 1e-9  # the horizon is the run's step budget
    assert lr_factor(TrainerConfig(schedule="constant"), 1000, 10) == 1.0


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


def test_step_budget_counts_steps_and_validations():
    from rmt_bench.train.loop import step_budget

    assert step_budget(60.0, 0.1, 5.0, 50) == 300  # 0.1 s/step + 5 s every 50 steps = 0.2 s per step
    assert step_budget(60.0, 0.2, 0.0, 10) == 300
    assert step_budget(0.01, 1.0, 0.0, 10) == 1  # always at least one step


def test_budget_is_kept_on_resume_and_follows_max_steps_without_minutes():
    from rmt_bench.config import TrainerConfig
    from rmt_bench.train.loop import TrainState, fix_budget

    kept = TrainState(step=40, budget_steps=123, budget_minutes=5.0)
    cfg = TrainerConfig(max_steps=1000, max_minutes=5.0)
    fix_budget(None, None, cfg, kept, 0, torch.device("cpu"), contextlib.nullcontext)  # nothing to measure
    assert kept.budget_steps == 123
    steps = TrainState(step=40, budget_steps=123, budget_minutes=5.0)
    fix_budget(None, None, TrainerConfig(max_steps=77), steps, 0, torch.device("cpu"), contextlib.nullcontext)
    assert (steps.budget_steps, steps.budget_minutes) == (77, None)


def test_max_minutes_fixes_a_budget_and_the_run_equals_one_with_that_many_steps(tmp_path):
    """The measurement runs on a copy with the RNG put back: the timed run (dropout on) is bit for bit the run
    of `trainer.max_steps=<budget> trainer.max_minutes=null`, the cosine horizon included; the budget is in
    the summary, config.json and the checkpoint."""
    base = [*TINY, "model.dropout=0.1", "trainer.schedule=cosine", "trainer.log_every=1", "trainer.eval_every=5"]
    timed = run(to_run_config(compose_cfg([*base, "trainer.max_minutes=0.1", "trainer.max_steps=100000"])),
                tmp_path / "timed")  # fmt: skip
    budget = timed["budget_steps"]
    assert timed["steps"] == budget and 1 < budget < 100000 and timed["stop_reason"] == "max_minutes"
    assert timed["seconds_per_step_measured"] > 0
    assert json.loads((tmp_path / "timed" / "config.json").read_text())["trainer"]["max_steps"] == budget
    saved = torch.load(tmp_path / "timed" / "checkpoint.pt", weights_only=False)["train_state"]
    assert saved["budget_steps"] == budget and saved["budget_minutes"] == 0.1
    fixed = run(to_run_config(compose_cfg([*base, f"trainer.max_steps={budget}", "trainer.max_minutes=null"])),
                tmp_path / "fixed")  # fmt: skip

    def losses(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train/loss"], r["train/lr"]) for r in rows if "train/loss" in r]

    assert losses(tmp_path / "timed") == losses(tmp_path / "fixed")
    assert timed["test/loss"] == fixed["test/loss"] and fixed["stop_reason"] == "max_steps"


def test_early_stop_acc_ends_the_run_at_the_first_validation_that_reaches_it(tmp_path):
    summary = run(to_run_config(compose_cfg([*TINY, "trainer.max_steps=30", "trainer.early_stop_acc=0.0"])), tmp_path)
    assert summary["stop_reason"] == "early_stop_acc" and summary["steps"] == 3  # eval_every=3 in TINY
