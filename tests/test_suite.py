"""rmt-bench-suite: the benchmarks of tasks/ validate, cells run once in stable directories and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from rmt_bench import suite
from rmt_bench.cli import invalid_jobs
from tests.conftest import ROOT, TINY


@pytest.mark.parametrize("name", suite.available())
def test_every_benchmark_composes_and_validates_at_every_scale(name):
    _, data = suite.load(name)
    assert set(data["scales"]) == {"cpu", "paper"} and data["metric"] == "test/acc"
    for scale in data["scales"]:
        cells = suite.cells(data, scale)
        assert invalid_jobs([(c.overrides + [f"seed={c.seed}"], c.name) for c in cells]) == []
        assert len({c.name for c in cells}) == len(data["cells"])  # one directory per cell
        assert all(c.paper is not None and 0.0 <= c.paper <= 1.0 for c in cells)


def test_the_benchmarks_hold_the_papers_fig3_numbers():
    _, data = suite.load("reverse_fig3")
    paper = {(c["model"], c["task.segments"]): c["paper"] for c in data["cells"]}
    assert paper[("xl", 4)] == 0.86 and paper[("rmt", 6)] == 0.90 and paper[("vanilla", 2)] == 0.10


def write_benchmark(tmp_path, cells):
    data = {
        "title": "tiny",
        "metric": "test/acc",
        "seeds": [0],
        "base": [a for a in TINY if not a.startswith("trainer.max_steps")] + ["trainer.max_steps=4"],
        "scales": {"cpu": ["trainer.max_minutes=null"], "paper": ["trainer=paper"]},
        "cells": cells,
    }
    path = tmp_path / "tiny_bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_suite(*args, cwd):
    env = os.environ | {"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rmt_bench.suite", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_cells_run_once_in_stable_directories_and_a_partial_cell_resumes(tmp_path):
    bench = write_benchmark(tmp_path, [{"model": "vanilla", "paper": 0.1}, {"model": "rmt", "mem": 2, "paper": 1.0}])
    res = run_suite(bench, "--out", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    root = tmp_path / "out" / "tiny_bench" / "cpu"
    summaries = {p.parent.parent.name: p for p in root.rglob("summary.json")}
    assert set(summaries) == {"model=vanilla", "model=rmt,mem=2"}
    assert json.loads(summaries["model=rmt,mem=2"].read_text())["model"] == "rmt"
    assert "[2/2]" in res.stdout
    stamp = summaries["model=vanilla"].stat().st_mtime_ns
    summaries["model=rmt,mem=2"].unlink()  # a cell that has only its checkpoint
    again = run_suite(bench, "--out", tmp_path / "out", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 cells, 1 finished, 1 to run" in again.stdout and "resuming model=rmt,mem=2 seed 0" in again.stdout
    assert "resumed from" in (root / "model=rmt,mem=2" / "seed0" / "suite.log").read_text()
    assert summaries["model=rmt,mem=2"].exists() and summaries["model=vanilla"].stat().st_mtime_ns == stamp
    assert "0 to run" in run_suite(bench, "--out", tmp_path / "out", cwd=tmp_path).stdout


def test_bad_cells_are_all_named_before_anything_runs(tmp_path):
    cells = [{"model": "rmt", "model.n_layer": 0, "paper": 1.0}, {"model": "xl", "model.d_model": -4, "paper": 1.0}]
    res = run_suite(write_benchmark(tmp_path, cells), "--out", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and "model.n_layer" in lines[0] and "model.d_model" in lines[1]
    assert not (tmp_path / "out").exists()


def test_a_failing_cell_is_reported_and_the_others_run(tmp_path):
    cells = [{"model": "vanilla", "resume": True, "paper": 0.1}, {"model": "vanilla", "paper": 0.1}]
    res = run_suite(write_benchmark(tmp_path, cells), "--out", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 1
    assert (tmp_path / "out" / "tiny_bench" / "cpu" / "model=vanilla" / "seed0" / "summary.json").exists()
    assert "1 cell(s) failed" in res.stderr and "model=vanilla,resume=True seed 0 (exit 2)" in res.stderr


def test_an_unknown_benchmark_or_scale_is_one_line(tmp_path):
    res = run_suite("no_such_bench", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "reverse_fig3" in res.stderr
    res = run_suite("reverse_fig3", "--scale", "gpu", cwd=tmp_path)
    assert (
        res.returncode == 2
        and res.stderr.strip() == "error: --scale gpu: not in this benchmark; choose one of: cpu, paper"
    )


def test_the_report_puts_each_cell_beside_the_paper(tmp_path):
    cells = [{"model": "vanilla", "paper": 0.1}, {"model": "rmt", "mem": 2, "paper": 1.0}]
    bench = write_benchmark(tmp_path, cells)
    assert run_suite(bench, "--out", tmp_path / "out", cwd=tmp_path).returncode == 0
    root = tmp_path / "out" / "tiny_bench" / "cpu"
    acc = {c: json.loads((root / c / "seed0" / "summary.json").read_text())["test/acc"] for c in ("model=vanilla",)}
    (root / "model=rmt,mem=2" / "seed0" / "summary.json").unlink()  # a cell not (yet) finished
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "rmt_bench.report", str(tmp_path / "out"), "--out", str(tmp_path / "report")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "report" / "tiny_bench_cpu.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| model=vanilla |"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    mean = acc["model=vanilla"]
    assert cols[1] == f"**{mean:.4f}**" and cols[4] == "1" and cols[5] == "0.1" and cols[6] == f"{mean - 0.1:+.3f}"
    assert "| model=rmt,mem=2 | not run | | | 0 | 1.0 | |" in text
    png = (tmp_path / "report" / "tiny_bench_cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    nothing = subprocess.run([sys.executable, "-m", "rmt_bench.report", str(tmp_path / "empty")], capture_output=True,
                             text=True, env=env)  # fmt: skip
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: no benchmark.yaml")
