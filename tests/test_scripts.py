"""scripts/prepare_data.py turns archives and plain text into a data dir the LM task reads."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
import torch

from rmt_bench.config import LMTaskConfig
from rmt_bench.finished import open_run
from rmt_bench.tasks.wikitext import load_corpus
from tests.helpers import ROOT, TINY, run_cli, write_wikitext


def prepare(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_wikitext_archive_is_unpacked_to_a_data_dir(tmp_path):
    src = write_wikitext(tmp_path / "src")
    archive = tmp_path / "wikitext-103-v1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "valid", "test"):
            zf.write(src / f"wiki.{split}.tokens", f"wikitext-103/wiki.{split}.tokens")
    res = prepare("wikitext103", archive, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    vocab, splits = load_corpus(LMTaskConfig(data_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "c")))
    reference, ref_splits = load_corpus(LMTaskConfig(data_dir=str(src), cache_dir=str(tmp_path / "c2")))
    assert vocab == reference and (splits["train"] == ref_splits["train"]).all()


def test_text_files_are_split_in_order(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("\n".join(f"line {i} has  some   words" for i in range(200)) + "\nrare")
    res = prepare("text", tmp_path / "out", text, "--min-count", "2")
    assert res.returncode == 0, res.stderr
    train = (tmp_path / "out" / "wiki.train.tokens").read_text().splitlines()
    test = (tmp_path / "out" / "wiki.test.tokens").read_text().splitlines()
    assert train[0] == "line <unk> has some words" and test[-2] == "line <unk> has some words"  # numbers: rare
    assert test[-1] == "<unk>" and len(train) == 181


def test_missing_archive_is_one_line(tmp_path):
    res = prepare("wikitext103", tmp_path / "nope.zip", tmp_path / "out")
    assert res.returncode != 0 and res.stderr.strip().startswith("error:")


def test_wheel_ships_the_configs_and_runs_from_elsewhere(tmp_path):
    """A non-editable install finds its Hydra configs inside the package, from any directory."""
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("rmt_bench-*.whl"))
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300
    )
    assert install.returncode == 0, install.stderr
    res = subprocess.run(
        [sys.executable, "-m", "rmt_bench.cli", "--cfg", "job", "--resolve", "model=xl", "mem=9"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr
    assert (
        "mem_len: 9" in res.stdout
        and str(target)
        in subprocess.run(
            [sys.executable, "-c", "import rmt_bench.config as c; print(c.CONFIG_DIR)"],
            cwd=elsewhere,
            text=True,
            capture_output=True,
            env={"PYTHONPATH": str(target)},
        ).stdout
    )
    listed = subprocess.run(
        [sys.executable, "-m", "rmt_bench.suite", "--list"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)},
    )
    assert listed.returncode == 0 and "reverse_fig3: Fig. 3" in listed.stdout, listed.stderr  # tasks/ ships too
    assert (target / "rmt_bench" / "benchmarks" / "reverse_fig3.yaml").exists()


def test_bench_script_prints_its_tables():
    bench = [sys.executable, str(ROOT / "scripts" / "bench.py")]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    train = subprocess.run(
        [*bench, "train", "--models", "vanilla", "rmt", "--steps", "1", "--warmup", "1", "--batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert train.returncode == 0, train.stderr
    rows = [x for x in train.stdout.splitlines() if x.startswith("| rmt") or x.startswith("| vanilla")]
    assert len(rows) == 2
    scaling = subprocess.run(
        [*bench, "eval-scaling", "--segments", "1", "3", "--batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert scaling.returncode == 0, scaling.stderr
    assert len([x for x in scaling.stdout.splitlines() if x.startswith("| 1 ") or x.startswith("| 3 ")]) == 2
    evaluation = subprocess.run(
        [*bench, "eval", "--task", "copy", "--size", "6", "--batch-size", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert evaluation.returncode == 0, evaluation.stderr
    assert "copy-24 in 3 segments, rmt mem=24, 6 examples" in evaluation.stdout
    assert len([x for x in evaluation.stdout.splitlines() if x.startswith("| 4 |")]) == 1


def test_bench_runs_reports_each_run_from_its_summary(tmp_path):
    """`bench.py runs` runs rmt-bench per model and seed and tabulates what each summary.json says."""
    bench = [sys.executable, str(ROOT / "scripts" / "bench.py")]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    tiny = ["backbone=tiny", "trainer.max_steps=4", "trainer.eval_every=2", "task.train_size=32",
            "task.valid_size=8", "task.test_size=8", "mem=2", "logger=none"]  # fmt: skip
    res = subprocess.run(
        [*bench, "runs", "--seeds", "0", "1", "--models", "vanilla", "rmt", "--out", str(tmp_path), "--", *tiny],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    rows = {tuple(c.strip() for c in x.split("|")[1:3]): x for x in res.stdout.splitlines() if x.startswith("| ")}
    for model in ("vanilla", "rmt"):
        for seed in (0, 1):
            summary = json.loads((tmp_path / f"{model}-seed{seed}" / "summary.json").read_text())
            row = rows[(model, str(seed))]
            assert f"**{summary['test/acc']:.4f}**" in row and "4 / 4" in row
            reset = summary.get("test_memory_reset/acc")
            assert (reset is None) == (model == "vanilla") and (reset is None or f"{reset:.4f} |" in row)


def test_bench_peers_times_every_model_and_checks_the_loss_falls():
    """Ours against recurrent-memory-transformer-pytorch and x-transformers (the `bench` extra, installed by
    `make install`), a small batch: a row per model, ratios printed, every loss falls (else exit 1)."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "peers", "--configs", "reverse", "--batch", "16",
         "--lr", "3e-3", "--rounds", "2", "--steps", "5", "--warmup", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "recurrent-memory-transformer-pytorch 0.7.0" in res.stdout and "x-transformers 2.31.10" in res.stdout
    rows = {line.split("|")[1].strip(): line.split("|") for line in res.stdout.splitlines() if line.startswith("| ")}
    for name in ("rmt", "rmt-peer", "vanilla", "vanilla-peer", "xl", "xl-peer"):
        cells = rows[name]
        assert int(cells[2].replace(",", "")) > 500_000  # parameters
        assert float(cells[3].replace(",", "")) > 0 and cells[6].strip() == "yes"  # tokens/s, the loss fell
        assert float(cells[7]) > float(cells[8]) > 0  # peak RSS above its training share
    assert "rmt: " in res.stdout and "x the peer's tokens/s" in res.stdout
    assert "use_xl_memories': False" in res.stdout and "'num_residual_streams': 1" in res.stdout


def test_retrieval_by_pair_splits_the_runs_test_accuracy_by_the_queried_pair(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "task=retrieval", "task.segments=3", "task.pad_side=end", "mem=3", "trainer.max_minutes=null",
            "trainer.max_steps=30", "task.test_size=64", f"hydra.run.dir={run}"]  # fmt: skip
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    script = [sys.executable, str(ROOT / "scripts" / "retrieval_by_pair.py")]
    res = subprocess.run([*script, str(run), "--examples", "64"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads((run / "eval" / "by_pair.json").read_text())
    # the official 4 + 4 + 2 chunks: pairs 1-2 in segment 1 (two boundaries to the query), 3-4 in segment 2 (one)
    layout = [(r["pair"], r["value_segment"], r["boundaries"]) for r in rows]
    assert layout == [(1, 1, 2), (2, 1, 2), (3, 2, 1), (4, 2, 1)]
    _, task, model = open_run(run, ["task.test_size=64"])
    queried, wrong, other = [], [0] * 4, [0] * 4  # by hand: the pair whose key follows the '?', the wrong answers
    for batch in task.eval_batches("test", 64):
        with torch.no_grad():
            out, _ = model(batch.inputs, model.initial_state())
        answers = model.head.logits(out[batch.loss_mask]).argmax(-1).tolist()
        for row, answer, target in zip(batch.inputs.flatten(1).tolist(), answers, batch.targets[batch.loss_mask]):
            tokens = [t for t in row if t != 0]
            queried.append(tokens[0:8:2].index(tokens[9]) + 1)
            if answer != int(target):
                wrong[queried[-1] - 1] += 1
                other[queried[-1] - 1] += answer in tokens[1:8:2]
    assert [r["examples"] for r in rows] == [queried.count(j) for j in (1, 2, 3, 4)]
    assert sum(wrong) > 0  # a 30-step model: wrong answers to sort
    assert [r["wrong_other_value"] for r in rows] == [pytest.approx(o / w) if w else None for o, w in zip(other, wrong)]
    mean = sum(r["acc"] * r["examples"] for r in rows) / 64
    assert mean == pytest.approx(json.loads((run / "summary.json").read_text())["test/acc"])
    bad = subprocess.run([*script, str(run), "--examples", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --examples: must be >= 1, got 0"
