"""Runs survive faults and resume exactly: a real process killed with SIGKILL (or stopped with SIGTERM / SIGINT)
and resumed with `resume=true` ends bit for bit where an uninterrupted run ends, for an algorithmic run with
dropout and a language-modelling run whose memory, cache and BPTT history cross batches; checkpoints describe
themselves and refuse a resume with another trajectory; a non-finite loss stops the run in one line."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import ALGORITHMIC, TINY, assert_same_run, interrupted_then_resumed, lm_args, run_cli


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
    from rmt_bench.train.checkpoint import Value, save_checkpoint
    from tests.helpers import tiny_model

    model = build_model(tiny_model("rmt"), 12)
    optimizer = torch.optim.Adam(model.parameters())
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": model, "optimizer": optimizer, "train_state": Value(lambda: {"step": 5}, None)})
    good = path.read_bytes()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        save_checkpoint(
            path, {"model": model, "optimizer": optimizer, "train_state": Value(lambda: {"step": 10}, None)}
        )
    assert path.read_bytes() == good


def test_a_format_2_checkpoint_loads_and_an_unknown_format_is_one_line(tmp_path):
    """The parts keep the names of format 2's fields, so a format-2 file resumes; a format this version does not
    know is refused with one line naming it."""
    run_dir = tmp_path / "run"
    args = [*ALGORITHMIC, "trainer.max_steps=40"]
    assert run_cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    path = run_dir / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == 3
    payload["format"] = 2
    torch.save(payload, path)
    res = run_cli(*ALGORITHMIC, "trainer.max_steps=60", "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0 and "resumed from" in res.stderr, res.stderr
    payload["format"] = 99
    torch.save(payload, path)
    res = run_cli(*ALGORITHMIC, "trainer.max_steps=80", "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "has checkpoint format 99" in lines[0], res.stderr
