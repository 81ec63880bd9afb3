"""Precision `auto`: decided by a measurement made once per machine and cached; fp32 / bf16 taken as given."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from rmt_bench.config import LoggerConfig, TrainerConfig
from rmt_bench.logging import RunLogger
from rmt_bench.models import build_model
from rmt_bench.tasks import build_task
from rmt_bench.train import precision
from rmt_bench.train.loop import evaluate, fit
from tests.helpers import tiny_model, tiny_task

CPU = torch.device("cpu")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RMT_BENCH_CACHE", str(tmp_path))
    return tmp_path


def test_explicit_precision_is_taken_as_given(cache_dir):
    assert precision.resolve("fp32", CPU)[:2] == (False, False) and precision.resolve("bf16", CPU)[:2] == (True, True)
    assert not (cache_dir / "precision.json").exists()  # nothing measured


def test_auto_measures_once_then_reads_the_cache(cache_dir, monkeypatch):
    calls = []
    real = precision.measure_cpu
    monkeypatch.setattr(precision, "measure_cpu", lambda: calls.append(1) or real())
    bf16, eval_bf16, line = precision.resolve("auto", CPU)
    entry = json.loads((cache_dir / "precision.json").read_text())[precision.machine_key()]
    assert entry["fp32_ms"] > 0 and entry["bf16_ms"] > 0 and entry["eval_fp32_ms"] > 0 and entry["eval_bf16_ms"] > 0
    assert entry["bf16_speedup"] == pytest.approx(entry["fp32_ms"] / entry["bf16_ms"], rel=0.01)
    assert entry["eval_bf16_speedup"] == pytest.approx(entry["eval_fp32_ms"] / entry["eval_bf16_ms"], rel=0.01)
    assert bf16 == (entry["bf16_speedup"] >= precision.SPEEDUP_NEEDED) and "measured now" in line
    assert eval_bf16 == (entry["eval_bf16_speedup"] >= precision.SPEEDUP_NEEDED)
    assert precision.resolve("auto", CPU) == (bf16, eval_bf16, line.replace("measured now, cached", "cached"))
    assert calls == [1]  # the second run read the cache


def entry(speedup: float, eval_speedup: float) -> dict:
    return {"fp32_ms": 100.0, "bf16_ms": 100.0 / speedup, "bf16_speedup": speedup,
            "eval_fp32_ms": 100.0, "eval_bf16_ms": 100.0 / eval_speedup, "eval_bf16_speedup": eval_speedup}  # fmt: skip


@pytest.mark.parametrize(("speedup", "bf16"), [(0.7, False), (1.05, False), (1.1, True), (1.6, True)])
def test_auto_follows_the_measured_speedup(cache_dir, monkeypatch, speedup, bf16):
    monkeypatch.setattr(precision, "measure_cpu", lambda: pytest.fail("the cached entry should be used"))
    (cache_dir / "precision.json").write_text(json.dumps({precision.machine_key(): entry(speedup, 2.0 - speedup)}))
    got, eval_got, line = precision.resolve("auto", CPU)
    assert got is bf16 and f"{speedup:.2f}x" in line and f"{'bf16' if bf16 else 'fp32'} training" in line
    # evaluation by its own figure: greedy decoding can be slower in bf16 where training is faster (seen here)
    assert eval_got is (2.0 - speedup >= 1.1) and f"{'bf16' if eval_got else 'fp32'} evaluation" in line


def test_a_run_trains_and_evaluates_in_the_precisions_decided(cache_dir, tmp_path):
    """bf16 training with fp32 evaluation, as cached for this machine: the summary records both, and the test
    loss is the fp32 evaluation of the best weights (a bf16 evaluation gives another)."""
    (cache_dir / "precision.json").write_text(json.dumps({precision.machine_key(): entry(1.5, 0.6)}))
    task = build_task(tiny_task())
    torch.manual_seed(0)
    model = build_model(tiny_model(), task.vocab_size)
    cfg = TrainerConfig(max_steps=4, eval_every=2, batch_size=8, eval_batch_size=16, precision="auto", warmup_steps=0)
    logger = RunLogger(LoggerConfig(kind="none"), tmp_path, {})
    summary = fit(model, task, cfg, logger, 0, CPU)
    logger.finish()
    assert (summary["precision"], summary["eval_precision"]) == ("bf16", "fp32")
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    fp32_eval = evaluate(model, task, "test", 16, contextlib.nullcontext)["loss"]
    bf16_eval = evaluate(model, task, "test", 16, bf16)["loss"]
    assert summary["test/loss"] == fp32_eval and bf16_eval != fp32_eval


def test_another_machine_an_old_entry_or_a_corrupt_cache_measures_again(cache_dir, monkeypatch):
    monkeypatch.setattr(precision, "measure_cpu", lambda: entry(2.0, 2.0))
    other = {"Some other CPU torch 2.0 threads 64": entry(0.5, 0.5)}
    (cache_dir / "precision.json").write_text(json.dumps(other))
    assert precision.resolve("auto", CPU)[:2] == (True, True)
    assert set(json.loads((cache_dir / "precision.json").read_text())) == {*other, precision.machine_key()}
    (cache_dir / "precision.json").write_text("{not json")
    assert precision.resolve("auto", CPU)[:2] == (True, True)
    # an entry written before evaluation was measured apart: measured again, both figures
    old = {"fp32_ms": 1.0, "bf16_ms": 2.0, "bf16_speedup": 0.5}
    (cache_dir / "precision.json").write_text(json.dumps({precision.machine_key(): old}))
    assert precision.resolve("auto", CPU)[:2] == (True, True)
    assert json.loads((cache_dir / "precision.json").read_text())[precision.machine_key()] == entry(2.0, 2.0)
