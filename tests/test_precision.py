"""Precision `auto`: decided by a measurement made once per machine and cached; fp32 / bf16 taken as given."""

from __future__ import annotations

import json

import pytest
import torch

from rmt_bench.train import precision

CPU = torch.device("cpu")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RMT_BENCH_CACHE", str(tmp_path))
    return tmp_path


def test_explicit_precision_is_taken_as_given(cache_dir):
    assert precision.resolve("fp32", CPU)[0] is False and precision.resolve("bf16", CPU)[0] is True
    assert not (cache_dir / "precision.json").exists()  # nothing measured


def test_auto_measures_once_then_reads_the_cache(cache_dir, monkeypatch):
    calls = []
    real = precision.measure_cpu
    monkeypatch.setattr(precision, "measure_cpu", lambda: calls.append(1) or real())
    bf16, line = precision.resolve("auto", CPU)
    entry = json.loads((cache_dir / "precision.json").read_text())[precision.machine_key()]
    assert entry["fp32_ms"] > 0 and entry["bf16_ms"] > 0
    assert entry["bf16_speedup"] == pytest.approx(entry["fp32_ms"] / entry["bf16_ms"], rel=0.01)
    assert bf16 == (entry["bf16_speedup"] >= precision.SPEEDUP_NEEDED) and "measured now" in line
    assert precision.resolve("auto", CPU) == (bf16, line.replace("measured now, cached", "cached"))
    assert calls == [1]  # the second run read the cache


@pytest.mark.parametrize(("speedup", "bf16"), [(0.7, False), (1.05, False), (1.1, True), (1.6, True)])
def test_auto_follows_the_measured_speedup(cache_dir, monkeypatch, speedup, bf16):
    monkeypatch.setattr(precision, "measure_cpu", lambda: pytest.fail("the cached entry should be used"))
    entry = {"fp32_ms": 100.0, "bf16_ms": 100.0 / speedup, "bf16_speedup": speedup}
    (cache_dir / "precision.json").write_text(json.dumps({precision.machine_key(): entry}))
    got, line = precision.resolve("auto", CPU)
    assert got is bf16 and f"{speedup:.2f}x" in line and ("bf16" if bf16 else "fp32") in line


def test_another_machine_or_a_corrupt_cache_measures_again(cache_dir, monkeypatch):
    monkeypatch.setattr(precision, "measure_cpu", lambda: {"fp32_ms": 2.0, "bf16_ms": 1.0, "bf16_speedup": 2.0})
    other = {"Some other CPU torch 2.0 threads 64": {"fp32_ms": 1.0, "bf16_ms": 2.0, "bf16_speedup": 0.5}}
    (cache_dir / "precision.json").write_text(json.dumps(other))
    assert precision.resolve("auto", CPU)[0] is True
    assert set(json.loads((cache_dir / "precision.json").read_text())) == {*other, precision.machine_key()}
    (cache_dir / "precision.json").write_text("{not json")
    assert precision.resolve("auto", CPU)[0] is True
