"""torchrun: N gloo processes on the CPU train one run equal to one process (dropout 0), for rmt with full BPTT
and for a language-modelling run with BPTT-k whose streams are split by column; a killed 2-process run resumes
exactly; rank 0 alone writes the run directory; a batch that does not split is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import ROOT, TIMING, TINY, lm_args, run_cli

ALGORITHMIC = [
    *[a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.eval_every", "trainer.log_every"))],
    "model=rmt", "mem=2", "task.segments=4", "model.dropout=0.0", "trainer.max_minutes=null", "trainer.max_steps=8",
    "trainer.eval_every=4", "trainer.log_every=1", "task.train_size=256",
]  # fmt: skip


def torchrun(nproc: int, args: list[str], run_dir: Path, cwd: Path, wait: bool = True):
    """`torchrun --standalone --nproc_per_node=N -m rmt_bench.cli ARGS` as a user types it (one thread each)."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rmt_bench.cli", *args, f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def assert_same_training(one: Path, two: Path) -> None:
    """The same training, to float rounding: (1) Adam's first moments, the running mean of every step's
    gradient, equal to 1e-6: the 2-process gradient is the 1-process one at every step; (2) the parameters equal
    to 1e-6, except the relative-position projections (`r_net`): a constant added to every position's key term
    leaves the softmax unchanged, so along those directions the true gradient is 0, the computed one rounding
    noise, and Adam turns noise into lr-sized steps that differ between any two summation orders (the same
    happens between two BLAS builds); (3) so the function is compared instead: every logged training loss and
    the test loss equal to 1e-5."""
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (one, two))
    moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys()
    for i in moments_a:
        torch.testing.assert_close(moments_b[i]["exp_avg"], moments_a[i]["exp_avg"], atol=1e-6, rtol=0)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        if ".r_net." not in key:
            torch.testing.assert_close(b["model"][key], a["model"][key], atol=1e-6, rtol=0, msg=key)
    for (step_a, loss_a), (step_b, loss_b) in zip(logged(one, "train/loss"), logged(two, "train/loss"), strict=True):
        assert step_a == step_b and abs(loss_a - loss_b) < 1e-5
    test_a, test_b = (json.loads((d / "summary.json").read_text())["test/loss"] for d in (one, two))
    assert abs(test_a - test_b) < 1e-5


def test_two_processes_train_rmt_as_one_process(tmp_path):
    """rmt, full BPTT over 4 segments: after 8 steps the parameters of a 2-process run equal one process's to
    1e-6; rank 0 alone writes the run directory and records the world size."""
    one = run_cli(*ALGORITHMIC, f"hydra.run.dir={tmp_path}/one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, ALGORITHMIC, tmp_path / "two", tmp_path)
    assert two.returncode == 0, two.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert two.stdout.count("test acc") == 1  # one summary line, from rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no directory of another rank
    # resumed by one process: it goes on, and says in one line what does not carry over
    more = run_cli(*ALGORITHMIC, "trainer.max_steps=10", "resume=true", f"hydra.run.dir={tmp_path}/two", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    warning = [line for line in more.stderr.splitlines() if "process(es)" in line]
    assert len(warning) == 1 and "was written by 2 process(es), this run has 1" in warning[0]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["steps"] == 10


def test_two_processes_train_a_language_model_with_bptt_k_as_one_process(tmp_path):
    """rmt_xl with BPTT-2 on a stream of 4 columns: each rank carries the memory and cache of its 2 columns."""
    args = [*lm_args(tmp_path), "model.dropout=0.0", "trainer.max_steps=12", "trainer.eval_every=6"]
    one = run_cli(*args, f"hydra.run.dir={tmp_path}/one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, args, tmp_path / "two", tmp_path)
    assert two.returncode == 0, two.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two")


def started_until_checkpoint(args: list[str], run_dir: Path, cwd: Path) -> subprocess.Popen:
    """A 2-process run started and left running until its first checkpoint exists."""
    proc = torchrun(2, args, run_dir, cwd, wait=False)
    deadline = time.time() + 300
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    return proc


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def test_a_killed_two_process_run_resumes_exactly(tmp_path):
    """SIGKILL to torchrun and its processes after the first checkpoint, then `resume=true` under torchrun:
    every later record and the final weights equal an uninterrupted 2-process run's (dropout on: each rank's
    random stream is checkpointed)."""
    args = [*lm_args(tmp_path), "trainer.max_steps=200", "trainer.eval_every=10"]  # dropout 0.1, BPTT-2
    full = torchrun(2, args, tmp_path / "full", tmp_path)
    assert full.returncode == 0, full.stderr
    run_dir = tmp_path / "split"
    proc = started_until_checkpoint(args, run_dir, tmp_path)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun's workers sit in sessions of their own
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (run_dir / "summary.json").exists(), "the run ended before the kill: nothing was resumed"
    resumed = torchrun(2, [*args, "resume=true"], run_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    def rows(d: Path) -> list[dict]:
        lines = (d / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]

    assert rows(run_dir) == rows(tmp_path / "full")
    for key, value in weights(tmp_path / "full").items():
        assert torch.equal(weights(run_dir)[key], value), key


def test_rank_0_fixes_the_budget_and_stops_every_rank_early(tmp_path):
    """max_minutes: rank 0's measured budget holds for both; early_stop_acc: rank 0's validation stops both at
    the first evaluation (no rank left waiting in a collective)."""
    args = [*ALGORITHMIC, "trainer.max_minutes=0.2", "trainer.max_steps=100000", "trainer.early_stop_acc=0.0"]
    res = torchrun(2, args, tmp_path / "run", tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stop_acc" and summary["steps"] == 4 and summary["budget_steps"] > 4
    assert res.stderr.count("step budget:") == 1  # one process reports it


def test_sigterm_under_torchrun_checkpoints_once_and_resumes(tmp_path):
    """torchrun forwards SIGTERM to its processes: rank 0 decides, checkpoints with every rank's state, says it
    once; `resume=true` under torchrun finishes the run."""
    args = [*ALGORITHMIC, "trainer.max_steps=100000", "trainer.eval_every=50"]
    run_dir = tmp_path / "run"
    proc = started_until_checkpoint(args, run_dir, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: SIGTERM at step")]
    assert len(stopped) == 1 and "checkpoint saved" in stopped[0], stderr
    step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["train_state"]["step"]
    assert f"at step {step}:" in stopped[0]
    resumed = torchrun(2, [*ALGORITHMIC, f"trainer.max_steps={step + 4}", "trainer.eval_every=50", "resume=true"],
                       run_dir, tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == step + 4


def test_a_sweep_under_torchrun_is_one_line(tmp_path):
    res = torchrun(2, ["-m", *ALGORITHMIC, "seed=0,1"], tmp_path / "run", tmp_path)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: -m: under torchrun the processes train one run"), res.stderr


def test_a_batch_that_does_not_split_over_the_processes_is_one_line(tmp_path):
    res = torchrun(2, [*ALGORITHMIC, "trainer.batch_size=7"], tmp_path / "run", tmp_path)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: trainer.batch_size: 7 does not split over the 2 processes of torchrun; use a multiple of 2 (every "
        "process takes batch_size / 2 rows of each batch)"
    ], res.stderr
