"""Helpers the test modules share: tiny configs, a CLI runner as a user types it, tiny token batches, a tiny
WikiText-layout corpus, and the resume harness (start a run, interrupt it, resume it, compare). Fixtures stay in
conftest.py; no test module imports another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from rmt_bench.config import CONFIG_DIR, ModelConfig, TaskConfig, model_switches

ROOT = Path(__file__).resolve().parent.parent


# a tiny, fast job: every CLI test adds these unless it means to test something else
TINY = [
    "backbone=tiny",
    "logger=none",
    "trainer.max_steps=6",
    "trainer.eval_every=3",
    "trainer.log_every=2",
    "trainer.batch_size=8",
    "trainer.eval_batch_size=64",
    "task.train_size=64",
    "task.valid_size=16",
    "task.test_size=16",
    "trainer.warmup_steps=0",
    "trainer.precision=fp32",  # tests force fp32: precision auto would pick bf16 where it is faster
]


def tiny_model(name: str = "rmt", **kw) -> ModelConfig:
    """A 2-layer model of d_model 32: 3 memory tokens, a cache of 4 (rmt_xl: both)."""
    sizes = dict(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, dropout=0.0)
    switches = model_switches(name, 3) | ({"mem_len": 4} if name in ("xl", "rmt_xl") else {})
    return ModelConfig(**(sizes | switches | kw))


def tiny_task(name: str = "reverse", **kw) -> TaskConfig:
    defaults = dict(name=name, length=6, segments=3, train_size=64, valid_size=16, test_size=16)
    if name == "retrieval":
        defaults.pop("length")
        defaults["segments"] = 2
    return TaskConfig(**(defaults | kw))


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`rmt-bench ARGS` in a subprocess, as a user types it."""
    full_env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"} | (env or {})
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "rmt_bench.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


VOCAB = 12


def tokens(b=3, s=3, n=5, seed=1):
    return torch.randint(2, VOCAB, (b, s, n), generator=torch.Generator().manual_seed(seed))


def copy_weights(src, dst):
    state = {k: v for k, v in src.state_dict().items() if k != "memory"}
    missing, unexpected = dst.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"memory"}


WORDS = [
    "the",
    "of",
    "and",
    "in",
    "to",
    "a",
    "was",
    "is",
    "for",
    "on",
    "as",
    "by",
    "with",
    "he",
    "at",
    "from",
    "his",
    "that",
    "it",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "game",
    "season",
    "film",
    "album",
    "song",
    "series",
    "team",
    "city",
    "river",
    "war",
    "army",
    "first",
    "new",
    "two",
    "one",
    "@-@",
    "@,@",
    "<unk>",
]


def write_wikitext(folder: Path, lines_per_split=(400, 60, 60), seed=0, names="wiki.{}.tokens") -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), lines_per_split):
        lines = []
        for i in range(n):
            if i % 20 == 0:
                lines += ["", f" = Heading {i // 20} = ", ""]
            words = rng.choice(WORDS, size=rng.integers(3, 25))
            lines.append(" " + " ".join(words) + " . ")
        if split != "train":
            lines.append(" a validword only here . ".replace("validword", "<unk>"))
        (folder / names.format(split)).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


TIMING = ("train/tokens_per_s", "time/minutes")  # wall-clock values: the only ones a resume may change


ALGORITHMIC = [
    *[a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.eval_every", "trainer.log_every"))],
    "model.dropout=0.1", "trainer.schedule=cosine", "trainer.max_minutes=null", "trainer.max_steps=100",
    "trainer.eval_every=20", "trainer.log_every=5", "task.train_size=256", "trainer.num_threads=1",
]  # fmt: skip


def lm_args(tmp_path: Path) -> list[str]:
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
