"""Shared helpers: tiny configs and a CLI runner (every test runs on CPU in seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt_bench.config import ModelConfig, TaskConfig, model_switches

ROOT = Path(__file__).resolve().parent.parent
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest process per core: one torch thread each, in them and in the runs they start
    # (two processes of two OpenMP threads on two cores slow a tiny step ~200x)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
