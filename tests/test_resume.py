"""Runs survive faults and resume exactly: a real process killed with SIGKILL (or stopped with SIGTERM / SIGINT)
and resumed with `resume=true` ends bit for bit where an uninterrupted run ends, for an algorithmic run with
dropout and a language-modelling run whose memory, cache and BPTT history cross batches; checkpoints describe
themselves and refuse a resume with another trajectory; a non-finite loss stops the run in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY, run_cli

TIMING = ("train/tokens_per_s", "time/minutes")  # wall-clock values: the only ones a resume may change
ALGORITHMIC = [
    *[a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.eval_every", "trainer.log_every"))],
    "model.dropout=0.1", "trainer.schedule=cosine", "trainer.max_minutes=null", "trainer.max_steps=100",
    "trainer.eval_every=20", "trainer.log_every=5", "task.train_size=256", "trainer.num_threads=1",
]  # fmt: skip


def lm_args(tmp_path: Path) -> list[str]:
    from tests.test_wikitext import write_wikitext

    data = write_wikitext(tmp_path / "wt", lines_per_split=(600, 40, 40))
    return [
        "task=wikitext103", f"task.data_dir={data}", f"task.cache_dir={tmp_path}/cache", "model=rmt_xl", "mem=2",
        "model.mem_len=8", "model.bptt_depth=2", "model.dropout=0.1", "backbone=tiny", "trainer=lm_cpu",
        "trainer.max_minutes=null", "trainer.max_steps=80", "trainer.eval_every=20", "trainer.log_every=5",
        "trainer.num_threads=1",
        "task.segment_len=8", "task.segments=2", "trainer.batch_size=4", "trainer.precision=fp32", "logger=none",
    ]  # fmt: skip


def start(args: list[str], run_dir: Path, cwd: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rmt_bench.cli", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def logged_past_the_checkpoint(run_dir: Path) -> bool:
    """A metrics record after the first checkpoint's step (eval_every = 20): a resume must not log it twice."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[:-1]  # the last line may be half-written
    return any(json.loads(line)["step"] > 20 for line in lines)


def interrupted_then_resumed(args: list[str], tmp_path: Path, sig: int) -> tuple[Path, int, int, str]:
    """Starts the run, sends `sig` once its first checkpoint exists (SIGKILL: once it has also logged past it;
    at whatever step it has then reached), then resumes it to the end -> (run dir, the step the checkpoint had,
    the interrupted run's exit status and stderr)."""
    run_dir = tmp_path / "split"
    proc = start(args, run_dir, tmp_path)
    deadline = time.time() + 300
    while not (run_dir / "checkpoint.pt").exists() or (
        sig == signal.SIGKILL and not logged_past_the_checkpoint(run_dir)
    ):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert not (run_dir / "summary.json").exists(), "the run ended before the signal: nothing was resumed"
    step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["train_state"]["step"]
    res = run_cli(*args, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step {step}" in res.stderr
    return run_dir, step, proc.returncode, stderr


def assert_same_run(full: Path, split: Path) -> None:
    """Every logged record once and equal (losses, lr, validation), the same best step and final metrics."""
    assert records(split) == records(full)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, split))
    assert {k: v for k, v in a.items() if k.startswith(("test/", "val/best")) or k in ("best_step", "steps")} == {
        k: v for k, v in b.items() if k.startswith(("test/", "val/best")) or k in ("best_step", "steps")
    }


@pytest.mark.parametrize("kind", ["algorithmic", "lm"])
def test_a_run_killed_with_sigkill_resumes_bit_for_bit(tmp_path, kind):
    args = ALGORITHMIC if kind == "algorithmic" else lm_args(tmp_path)
    full = run_cli(*args, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    split, step, _, _ = interrupted_then_resumed(args, tmp_path, signal.SIGKILL)
    assert 0 < step < 100
    assert_same_run(tmp_path / "full", split)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_the_run_resumes_exactly(tmp_path, sig):
    full = run_cli(*ALGORITHMIC, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    split, step, code, stderr = interrupted_then_resumed(ALGORITHMIC, tmp_path, sig)
    assert code == 128 + sig and f"stopped: {signal.Signals(sig).name} at step {step}: checkpoint saved" in stderr
    assert_same_run(tmp_path / "full", split)


def test_a_checkpoint_describes_itself_and_refuses_another_trajectory(tmp_path):
    run_dir = tmp_path / "run"
    args = [*ALGORITHMIC, "trainer.max_steps=40"]
    assert run_cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # plain tensors and values only
    from rmt_bench import __version__

    assert payload["version"] == __version__ and payload["config"]["trainer"]["lr"] == 0.002
    assert payload["config"]["model"]["name"] == "rmt" and payload["config"]["seed"] == 0
    changes = [
        (["trainer.lr=0.01"], "trainer.lr 0.002 -> 0.01"),
        (["seed=3"], "seed 0 -> 3"),
        (["model=xl", "mem=4"], "model.name rmt -> xl"),
        (["trainer.batch_size=4"], "trainer.batch_size 8 -> 4"),
    ]
    for change, named in changes:
        res = run_cli(*args, *change, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: resume: "), res.stderr
        assert named in lines[0] and "another config" in lines[0]
    # budgets may change: the horizon moves, with one warning line
    res = run_cli(*ALGORITHMIC, "trainer.max_steps=60", "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "warning: the step budget moves from 40 to 60 steps" in res.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 60


def test_a_foreign_pickle_is_refused_by_weights_only_loading(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"model": {}, "train_state": {}, "payload": Path("anything")}, run_dir / "checkpoint.pt")
    res = run_cli(*TINY, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "is refused: it holds Python objects" in lines[0]


def test_a_non_finite_loss_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_minutes=null", "trainer.lr=1e30", "trainer.grad_clip=0", "trainer.warmup_steps=0"]
    res = run_cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: trainer: non-finite loss or weights at step ")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "non_finite_loss" and "test/acc" not in summary and summary["model"] == "rmt"


def test_a_diverged_model_never_overwrites_the_last_checkpoint(tmp_path):
    from rmt_bench.errors import CheckpointError
    from rmt_bench.models import build_model
    from rmt_bench.train.checkpoint import save_checkpoint
    from rmt_bench.train.loop import TrainState
    from tests.conftest import tiny_model

    model = build_model(tiny_model("rmt"), 12)
    optimizer = torch.optim.Adam(model.parameters())
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, TrainState(step=5))
    good = path.read_bytes()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        save_checkpoint(path, model, optimizer, TrainState(step=10))
    assert path.read_bytes() == good
