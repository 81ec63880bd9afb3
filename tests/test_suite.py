"""rmt-bench-suite: the benchmarks of tasks/ validate, cells run once in stable directories and resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from rmt_bench import suite
from rmt_bench.config import CONFIG_DIR
from rmt_bench.overrides import invalid_jobs
from tests.helpers import ROOT, TINY


@pytest.mark.parametrize("name", suite.available())
def test_every_benchmark_composes_and_validates_at_every_scale(name):
    _, data = suite.load(name)
    assert set(data["scales"]) == {"cpu", "paper"}
    lower = {"test/acc": False, "test/final_exact": False, "test/f1": False, "test/ppl": True, "test/bpc": True}[
        data["metric"]
    ]
    assert data["higher_is_better"] is not lower
    # the figure's setting is a Hydra experiment config (configs/experiment/), which a user can run alone
    experiment = next(o.split("=", 1)[1] for o in data["base"] if o.startswith("experiment="))
    assert (Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").is_file()
    for scale in data["scales"]:
        cells = suite.cells(data, scale)
        assert invalid_jobs([(c.overrides + [f"seed={c.seed}"], c.name) for c in cells]) == []
        here = [c for c in data["cells"] if scale in c.get("scales", [scale])]
        assert len({c.name for c in cells}) == len(here)  # one directory per cell of the scale
        assert all(f"scale={scale}" in c.overrides for c in cells)
        papers = [c.paper for c in cells if c.paper is not None]
        assert all(0.0 <= p <= 1.0 for p in papers) if not lower else all(p > 1 for p in papers)


def test_the_lm_tables_hold_the_papers_numbers_and_say_the_cpu_scale_is_a_smoke_run():
    _, wt = suite.load("wikitext103_table2")
    ppl = {(c["model"], c["task.segment_len"], c["mem"], c.get("model.bptt_depth")): c["paper"] for c in wt["cells"]}
    assert ppl[("xl", 150, 150, None)] == 24.12 and ppl[("rmt", 150, 10, 3)] == 25.04
    assert ppl[("vanilla", 50, 0, None)] == 39.05 and ppl[("rmt", 50, 1, 1)] == 28.71 and len(ppl) == 16
    _, e8 = suite.load("enwik8_table4")
    bpc = {(c["model"], c["mem"]): c["paper"] for c in e8["cells"]}
    assert bpc[("xl", 200)] == 1.140 and bpc[("rmt", 20)] == 1.222 and len(bpc) == 8
    assert all("smoke run" in d["note"] for d in (wt, e8))


def test_experiment_configs_set_the_papers_setting_and_the_command_line_wins():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=long_copy_segment120", "model=rmt"])
        assert (cfg.task.name, cfg.task.length, cfg.task.segments, cfg.mem) == ("copy", 120, 3, 60)
        assert cfg.model.num_mem_tokens == 60 and cfg.model.n_layer == 4  # the copy backbone, through ${task}
        cfg = compose(config_name="config", overrides=["experiment=table2_wikitext103", "mem=5", "task.segment_len=50"])
        assert (cfg.task.name, cfg.task.segment_len, cfg.mem, cfg.trainer.lr) == ("wikitext103", 50, 5, 0.00025)
        assert (cfg.model.n_layer, cfg.model.arch) == (16, "paper")  # the paper's backbone with its schedule


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
    summary = json.loads(summaries["model=rmt,mem=2"].read_text())
    assert summary["model"] == "rmt" and summary["scale"] == "cpu" and summary["arch"] == "trainable"
    assert len(summary["config_hash"]) == 12 and int(summary["config_hash"], 16) >= 0
    assert "[2/2]" in res.stdout
    stamp = summaries["model=vanilla"].stat().st_mtime_ns
    summaries["model=rmt,mem=2"].unlink()  # a cell that has only its checkpoint
    again = run_suite(bench, "--out", tmp_path / "out", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 cells, 1 finished, 1 to run" in again.stdout and "resuming model=rmt,mem=2 seed 0" in again.stdout
    assert "resumed from" in (root / "model=rmt,mem=2" / "seed0" / "suite.log").read_text()
    assert summaries["model=rmt,mem=2"].exists() and summaries["model=vanilla"].stat().st_mtime_ns == stamp
    assert "0 to run" in run_suite(bench, "--out", tmp_path / "out", cwd=tmp_path).stdout


def test_a_cell_finished_with_other_settings_is_named_not_taken_as_this_files_result(tmp_path):
    """Editing a benchmark's scale (here the cell's extra for cpu) leaves the finished run of the old settings in
    the cell's directory: the suite says so and runs nothing, instead of reporting the old run as the new cell's."""
    bench = write_benchmark(tmp_path, [{"model": "vanilla", "paper": 0.1}])
    assert run_suite(bench, "--out", tmp_path / "out", cwd=tmp_path).returncode == 0
    data = yaml.safe_load(bench.read_text())
    data["cells"][0]["extra"] = {"cpu": ["trainer.lr=0.01"]}
    bench.write_text(yaml.safe_dump(data, sort_keys=False))
    res = run_suite(bench, "--out", tmp_path / "out", "trainer.num_threads=1", cwd=tmp_path)
    run_dir = tmp_path / "out" / "tiny_bench" / "cpu" / "model=vanilla" / "seed0"
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"error: cell model=vanilla seed 0: finished with other settings than the benchmark's now: trainer.lr=0.01 "
        f"(then: not set); move {run_dir} away (or use another --out) to run it again"
    )
    # a command-line override is not the benchmark's: the unchanged cell stays finished under it
    data["cells"][0].pop("extra")
    bench.write_text(yaml.safe_dump(data, sort_keys=False))
    again = run_suite(bench, "--out", tmp_path / "out", "trainer.num_threads=1", cwd=tmp_path)
    assert again.returncode == 0 and "1 finished, 0 to run" in again.stdout


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


def test_a_cell_after_another_starts_from_its_weights_once_it_has_finished(tmp_path):
    """`after`: the second cell gets trainer.init_from= the first's directory of the same seed, runs in a later
    wave, and --only brings the first along; a cell whose `after` cell failed does not run."""
    first = {"model": "rmt", "mem": 2, "task.segments": 2, "paper": 1.0}
    second = {"model": "rmt", "mem": 2, "task.segments": 3, "after": {"model": "rmt", "mem": 2, "task.segments": 2},
              "paper": 1.0}  # fmt: skip
    bench = write_benchmark(tmp_path, [second, first])  # listed before the cell it starts from
    root = tmp_path / "out" / "tiny_bench" / "cpu"
    res = run_suite(bench, "--out", tmp_path / "out", "--only", "task.segments=3", "--jobs", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 cells, 0 finished, 2 to run" in res.stdout
    assert res.stdout.index("starting model=rmt,mem=2,task.segments=2") < res.stdout.index("[1/2]") < (
        res.stdout.index("starting model=rmt,mem=2,task.segments=3"))  # fmt: skip
    config = json.loads((root / "model=rmt,mem=2,task.segments=3" / "seed0" / "config.json").read_text())
    assert config["trainer"]["init_from"] == str(root / "model=rmt,mem=2,task.segments=2" / "seed0")
    assert "init_from: the tested weights of" in (root / "model=rmt,mem=2,task.segments=3" / "seed0" / "suite.log"
                                                  ).read_text()  # fmt: skip
    first["resume"] = second["after"]["resume"] = True  # now fails: nothing to resume in a fresh --out
    res = run_suite(write_benchmark(tmp_path, [first, second]), "--out", tmp_path / "new", cwd=tmp_path)
    assert res.returncode == 1 and "2 cell(s) failed" in res.stderr
    assert "not run, the cell it starts from (model=rmt,mem=2,task.segments=2,resume=True) failed" in res.stderr
    assert "NOT RUN (its after cell model=rmt,mem=2,task.segments=2,resume=True failed)" in res.stdout
    assert not (tmp_path / "new" / "tiny_bench" / "cpu" / "model=rmt,mem=2,task.segments=3").exists()


def test_an_after_that_names_no_cell_or_a_cycle_is_one_line():
    data = {"seeds": [0], "scales": {"cpu": []}, "cells": [{"model": "rmt", "after": {"model": "xl"}}]}
    with pytest.raises(suite.SuiteError, match="cell model=rmt: after: no cell model=xl with seed 0 at scale cpu"):
        suite.cells(data, "cpu")
    data["cells"].append({"model": "xl", "after": {"model": "rmt"}})
    with pytest.raises(suite.SuiteError, match="after: a cycle of cells that start from each other"):
        suite.cells(data, "cpu")


def test_an_unknown_benchmark_or_scale_is_one_line(tmp_path):
    res = run_suite("no_such_bench", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "reverse_fig3" in res.stderr
    res = run_suite("reverse_fig3", "--scale", "gpu", cwd=tmp_path)
    assert (
        res.returncode == 2
        and res.stderr.strip() == "error: --scale gpu: not in this benchmark; choose one of: cpu, paper"
    )


def test_a_cell_of_some_scales_only_is_left_out_of_the_others_and_a_bad_list_is_one_line():
    _, data = suite.load("fig8_half_memory")  # reverse-120 with memory 60: paper scale only
    long = [c for c in data["cells"] if c.get("task.length") == 120]
    assert len(long) == 6 and all(c["scales"] == ["paper"] for c in long)
    cpu, paper = ({c.name for c in suite.cells(data, s)} for s in ("cpu", "paper"))
    assert len(cpu) == len(data["cells"]) - 6 and len(paper) == len(data["cells"])
    assert not any("task.length=120" in name for name in cpu)
    for bad in (["gpu"], [], "paper"):
        data["cells"][0]["scales"] = bad
        with pytest.raises(suite.SuiteError) as exc:
            suite.cells(data, "cpu")
        assert str(exc.value) == (
            f"cell experiment=fig3_copy,model=vanilla,task.segments=3,mem=12: scales: {bad}: expected a list of this "
            "benchmark's scales (cpu, paper)"
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
    assert ", curriculum none." in text  # the runs had none
    png = (tmp_path / "report" / "tiny_bench_cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    nothing = subprocess.run([sys.executable, "-m", "rmt_bench.report", str(tmp_path / "empty")], capture_output=True,
                             text=True, env=env)  # fmt: skip
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: no benchmark.yaml")


def run_report(*args):
    env = os.environ | {"PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    return subprocess.run(
        [sys.executable, "-m", "rmt_bench.report", *map(str, args)], capture_output=True, text=True, env=env
    )


def test_only_selects_cells_and_command_line_overrides_win(tmp_path):
    res = run_suite("wikitext103_table2", "--only", "model=xl", "--only", "task.segment_len=50", "--dry-run",
                    "trainer.device=cuda", "model.div_val=2", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    listed = [line for line in res.stdout.splitlines() if line.startswith("[new]")]
    assert len(listed) == 4 and all("model=xl" in line and "task.segment_len=50" in line for line in listed)
    assert all(line.count("model.div_val=") == 1 and "model.div_val=2" in line for line in listed)
    assert all(line.endswith("'") and "trainer.device=cuda" in line for line in listed)
    bad = run_suite("wikitext103_table2", "--only", "model.n_layer=2", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --only model.n_layer=2: expected KEY=V1[,V2...]")
    none = run_suite("wikitext103_table2", "--only", "model=nope", cwd=tmp_path)
    assert none.returncode == 2 and none.stderr.strip() == "error: --only model=nope: no cell matches"


def test_summary_hash_pools_seeds_of_one_config_and_the_report_splits_the_rest(tmp_path):
    bench = write_benchmark(tmp_path, [{"model": "vanilla", "paper": 0.1}])
    data = yaml.safe_load(bench.read_text()) | {"seeds": [0, 1]}
    bench.write_text(yaml.safe_dump(data))
    assert run_suite(bench, "--out", tmp_path / "out", cwd=tmp_path).returncode == 0
    cell = tmp_path / "out" / "tiny_bench" / "cpu" / "model=vanilla"
    hashes = [json.loads((cell / f"seed{k}" / "summary.json").read_text())["config_hash"] for k in (0, 1)]
    assert hashes[0] == hashes[1]  # seeds of one cell share it
    res = run_report(tmp_path / "out", "--out", tmp_path / "r1")
    assert "| model=vanilla | **" in res.stdout and "| 2 | 0.1 |" in res.stdout, res.stdout + res.stderr
    # seed 1 again, with another learning rate given on the suite's command line: another configuration
    shutil.rmtree(cell / "seed1")
    res = run_suite(bench, "--out", tmp_path / "out", "trainer.lr=0.01", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    other = json.loads((cell / "seed1" / "summary.json").read_text())["config_hash"]
    assert other != hashes[0]
    text = run_report(tmp_path / "out", "--out", tmp_path / "r2").stdout
    rows = [line for line in text.splitlines() if line.startswith("| model=vanilla (config ")]
    assert len(rows) == 2 and all("| 1 | 0.1 |" in r for r in rows), text
    assert {hashes[0], other} == {r.split("(config ")[1].split(")")[0] for r in rows}
    assert "not pooled): model=vanilla." in text


def test_an_lm_table_runs_as_a_smoke_run_on_given_data_and_reports_perplexity(tmp_path):
    from tests.helpers import write_wikitext

    data = write_wikitext(tmp_path / "wt")
    tiny = [f"task.data_dir={data}", f"task.cache_dir={tmp_path / 'cache'}", "model.adaptive_cutoffs=[]",
            "backbone=tiny", "logger=none", "trainer.precision=fp32", "trainer.max_minutes=null",
            "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=4"]  # fmt: skip
    only = ["--only", "model=rmt,vanilla", "--only", "task.segment_len=50"]
    res = run_suite("wikitext103_table2", "--out", tmp_path / "out", *only, *tiny, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "smoke run on your data" in res.stdout and "[3/3]" in res.stdout
    res = run_report(tmp_path / "out", "--out", tmp_path / "report", "--wandb", "offline")
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "report" / "wikitext103_table2_cpu.md").read_text()
    assert "`test/ppl` (lower is better)" in text and "not run" in text
    summary = json.loads(
        (tmp_path / "out/wikitext103_table2/cpu/model=rmt,task.segment_len=50,mem=10,model.bptt_depth=3/seed0"
         "/summary.json").read_text()
    )  # fmt: skip
    row = next(line for line in text.splitlines() if line.startswith("| model=rmt,task.segment_len=50,mem=10,"))
    assert f"**{summary['test/ppl']:.2f}**" in row and "| 26.37 |" in row
    assert (tmp_path / "report" / "wikitext103_table2_cpu.png").read_bytes()[:4] == b"\x89PNG"
    # perplexity by position in the segment and by segment of the document, from the test pass, drawn per cell
    assert len(summary["test/ppl_by_position"]) == 50 and summary["test/ppl_by_doc_segment"][0] > 1
    for kind in ("by_position", "by_doc_segment"):
        assert (tmp_path / "report" / f"wikitext103_table2_cpu_{kind}.png").read_bytes()[:4] == b"\x89PNG"
    media = list((tmp_path / "report" / "wandb").glob("offline-run-*/files/media/**/*"))
    assert {p.suffix for p in media if p.is_file()} >= {".json", ".png", ".html"}, media


def test_the_report_draws_accuracy_against_length_from_the_runs_grids_beside_the_papers_points(tmp_path):
    bench = write_benchmark(tmp_path, [{"model": "rmt", "mem": 4}])
    data = yaml.safe_load(bench.read_text())
    data["base"] += ["task=facts", "task.segments=2", "task.segment_len=16"]
    data["reference"] = {"fig1_segments": [32, 64], "fig1_segment_len": 499, "fig1_memorize": [0.99, 0.98]}
    bench.write_text(yaml.safe_dump(data, sort_keys=False))
    assert run_suite(bench, "--out", tmp_path / "out", cwd=tmp_path).returncode == 0
    run = tmp_path / "out" / "tiny_bench" / "cpu" / "model=rmt,mem=4" / "seed0"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    for grid, examples in (("segments=1,2", 8), ("segments=2,64", 4)):  # the second call replaces the point at 2
        cmd = [sys.executable, "-m", "rmt_bench.evaluate", str(run), "--grid", grid, "--examples", str(examples)]
        res = subprocess.run([*cmd, "--out", str(tmp_path / "g")], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
    kept = json.loads((run / "eval" / "grid_segments.json").read_text())
    assert [(p["value"], p["examples"], p["length_tokens"]) for p in kept] == [(1, 8, 16), (2, 4, 32), (64, 4, 1024)]
    res = run_report(tmp_path / "out", "--out", tmp_path / "report")
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "report" / "tiny_bench_cpu.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| model=rmt,mem=4 | 0 |")]
    assert [r.split("|")[3].strip() for r in rows] == ["1", "2 (trained)", "64"]
    assert [r.split("|")[4].strip() for r in rows] == ["16", "32", "1,024"]
    assert all(float(r.split("|")[5]) == p["test/acc"] for r, p in zip(rows, kept))
    png = (tmp_path / "report" / "tiny_bench_cpu_length.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_the_length_figure_gives_a_cell_one_colour_its_seeds_markers_and_a_short_legend_entry():
    from rmt_bench.report import length_curves

    def point(value, trained, acc):
        return {"value": value, "trained": trained, "length_tokens": 64 * value, "test/acc": acc}

    found = [
        {"cell": "model=rmt,task.variant=memorize", "seed": 0, "points": [point(8, 4, 0.5), point(1, 4, 1.0)]},
        {"cell": "model=rmt,task.variant=memorize", "seed": 1, "points": [point(1, 4, 1.0), point(8, 4, 0.7)]},
        {"cell": "model=rmt,task.variant=reason,task.segments=1", "seed": 0, "points": [point(1, 1, 0.99)]},
        {"cell": "model=rmt,task.variant=reason", "seed": 0, "points": [point(16384, 4, 0.3)]},
    ]
    curves = length_curves(found)  # the run evaluated at its training length only is a row, not a curve
    labels = ["variant=memorize (ours, seeds 0, 1)", None, "variant=reason (ours, seed 0)"]
    assert [c["label"] for c in curves] == labels
    assert [c["color"] for c in curves] == [0, 0, 1] and [c["marker"] for c in curves] == ["o", "s", "o"]
    assert curves[0]["tokens"] == [64, 512] and curves[0]["acc"] == [1.0, 0.5]  # sorted by length
    assert curves[2]["tokens"] == [16384 * 64]
