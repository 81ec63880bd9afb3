"""Seeing what the memory does: captured attention probabilities are the attention itself (times the values they
give the layer's output before its projection; rows sum to 1 over allowed keys, masked keys 0), capturing changes
no output of any model, `rmt-bench-inspect` draws a trained tiny run, `rmt-bench-eval` evaluates it at other
settings (as trained: the run's own test numbers), and `rmt-bench-report` tabulates a sweep."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from rmt_bench.models import build_model
from rmt_bench.models.layers import RelMultiHeadAttention, SinusoidalDistances, relative_distances
from rmt_bench.models.recurrence import attention_mask
from tests.helpers import ROOT, TINY, VOCAB, run_cli, tiny_model, tokens

MODELS = [("vanilla", {}), ("memtr", {}), ("xl", {}), ("rmt", {}), ("rmt_xl", {"read_mem_from_cache": True})]


def test_captured_probabilities_times_the_values_are_the_attention_output():
    torch.manual_seed(0)
    d, h, dh, q, c = 16, 2, 8, 6, 3
    attn = RelMultiHeadAttention(d, h, dh, 0.0, 0.0).eval()
    x, cache = torch.randn(2, q, d), torch.randn(2, c, d)
    u, v = torch.randn(h, dh), torch.randn(h, dh)
    pos_emb = SinusoidalDistances(d)(relative_distances(q, q + c, -1))
    mask = attention_mask(4, 1, True, c, False, 0, torch.device("cpu"))  # [read 1 ; tokens 4 ; write 1], cache 3
    qu, k, val = attn.project(x, cache, u)
    seen, captured = [], []
    attn.o_net.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    attn(qu, k, val, pos_emb, u, v, mask, captured)
    (prob,) = captured  # (B, H, Q, K)
    allowed = mask == 0
    assert_close(prob.sum(-1), torch.ones(2, h, q))
    assert (prob[:, :, ~allowed] == 0).all() and (prob[:, :, allowed] > 0).all()
    by_hand = torch.einsum("bhqk,hbkd->bqhd", prob, val).reshape(2, q, h * dh)
    assert_close(by_hand, seen[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("name", "switches"), MODELS, ids=[m for m, _ in MODELS])
def test_capturing_changes_no_output_of_any_model(name, switches):
    torch.manual_seed(0)
    model = build_model(tiny_model(name, **switches), VOCAB).eval()
    x = tokens(b=3, s=3, n=4)
    state_a = state_b = model.initial_state()
    for s in range(3):
        captured = []
        with torch.no_grad():
            ha, state_a = model.segment(x[:, s], state_a)
            hb, state_b = model.segment(x[:, s], state_b, capture=captured)
        assert torch.equal(ha, hb)
        assert len(captured) == model.cfg.n_layer
        q = x.shape[2] + model.cfg.num_mem_tokens * (1 + model.writes(state_a))
        assert all(p.shape[:3] == (3, model.cfg.n_head, q) for p in captured)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny rmt run of reverse-6 in 3 segments (a real checkpoint to inspect and evaluate)."""
    tmp = tmp_path_factory.mktemp("run")
    args = [*TINY, "task.length=6", "task.segments=3", "mem=4", "trainer.max_minutes=null", "trainer.num_threads=1",
            "trainer.memory_reset_control=true"]  # fmt: skip
    res = run_cli(*args, f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert res.returncode == 0, res.stderr
    return tmp / "run"


def tool(name: str, *args, cwd) -> subprocess.CompletedProcess:
    code = f"import sys; from rmt_bench.{name} import main; sys.argv[0] = '{name}'; main()"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    cmd = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_inspect_draws_every_map_of_a_trained_run_and_saves_the_probabilities(tiny_run, tmp_path):
    import numpy as np

    res = tool("memory_maps", tiny_run, "--examples", 8, "--out", tmp_path / "maps", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    record = json.loads((tmp_path / "maps" / "inspect.json").read_text())
    assert [s["segment"] for s in record["segments"]] == [0, 1, 2]
    for s in range(3):
        for kind in ("write", "read"):
            assert (tmp_path / "maps" / f"{kind}_seg{s}.png").is_file()
        saved = np.load(tmp_path / "maps" / f"write_seg{s}.npz")
        assert saved["prob"].shape == (2, 2, 4, 4 + 4 + 4)  # (layers, heads, write rows, [read ; tokens ; write])
        assert np.allclose(saved["prob"].sum(-1), 1.0, atol=1e-5) and list(saved["rows"]) == ["w0", "w1", "w2", "w3"]
        assert len(record["segments"][s]["write_order"]) == 2
    one = tool("memory_maps", tiny_run, "--example", 2, "--heads", "--out", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    cols = list(np.load(tmp_path / "one" / "write_seg0.npz")["cols"])
    assert (
        cols[:4] == ["r0", "r1", "r2", "r3"] and len(cols) == 12 and (tmp_path / "one" / "read_seg0_heads.png").exists()
    )
    logged = tool("memory_maps", tiny_run, "--examples", 4, "--out", tmp_path / "w", "--wandb", "offline", cwd=tmp_path)
    assert logged.returncode == 0, logged.stderr
    media = list(tiny_run.glob("wandb/offline-run-*/files/media/images/*.png"))
    assert len(media) == 6  # write and read maps of 3 segments, in a W&B run of job type inspect
    bad = tool("memory_maps", tmp_path, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not a run directory (no config.json; give the directory of a finished run)"
    ]


def test_eval_as_trained_gives_the_runs_test_and_other_settings_their_own(tiny_run, tmp_path):
    summary = json.loads((tiny_run / "summary.json").read_text())
    res = tool("evaluate", tiny_run, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    same = json.loads((tiny_run / "eval" / "as_trained.json").read_text())
    assert same["test/acc"] == summary["test/acc"] and same["test/loss"] == pytest.approx(summary["test/loss"])
    cell = tmp_path / "model=rmt,mem=4"  # a suite cell's directory: '=' in its name
    cell.symlink_to(tiny_run, target_is_directory=True)
    reset = tool("evaluate", cell, "--memory-reset", cwd=tmp_path)
    assert reset.returncode == 0, reset.stderr
    control = json.loads((tiny_run / "eval" / "memory_reset.json").read_text())
    assert control["test/acc"] == summary["test_memory_reset/acc"]  # the run's own control, from its directory
    longer = tool("evaluate", tiny_run, "task.segments=6", "task.length=12", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    record = json.loads((tiny_run / "eval" / "segments=6,length=12.json").read_text())
    assert record["task"]["segments"] == 6 and 0 <= record["test/acc"] <= 1
    grid = tool("evaluate", tiny_run, "--grid", "segments=3,6", "--examples", 16, "--out", tmp_path / "g", cwd=tmp_path)
    assert grid.returncode == 0, grid.stderr
    rows = json.loads((tmp_path / "g" / "eval_grid.json").read_text())
    assert [(r["value"], r["segments"], r["length_tokens"]) for r in rows] == [(3, 3, 12), (6, 6, 24)]
    table = (tmp_path / "g" / "eval_grid.md").read_text().splitlines()
    assert table[0].startswith("| run | model | trained segments | segments | tokens | greedy acc |")  # no twin column
    # the grid's point is the one setting on the same 16 test examples
    same16 = tool("evaluate", tiny_run, "task.segments=6", "task.length=12", "task.test_size=16", cwd=tmp_path)
    assert same16.returncode == 0, same16.stderr
    record16 = json.loads((tiny_run / "eval" / "segments=6,length=12,test_size=16.json").read_text())
    assert rows[1]["test/acc"] == record16["test/acc"] and rows[1]["test/loss"] == pytest.approx(record16["test/loss"])
    for args, line in [
        (["task.segments=5"], "error: task.segments: 5 does not divide the reverse sequence of 12 tokens"),
        (["task.name=copy"], "error: task.name: the run was trained on reverse; its weights read only that"),
        (["--mem-len", "4"], "error: --mem-len: the run's model (rmt) has no Transformer-XL cache"),
        (["--grid", "pairs=1,2"], "error: --grid: " + str(tiny_run) + ": task reverse cannot vary 'pairs'"),
    ]:
        res = tool("evaluate", tiny_run, *args, cwd=tmp_path)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), res.stderr


def test_eval_final_weights_are_the_last_steps_and_kept_apart(tiny_run, tmp_path):
    import shutil

    from rmt_bench.finished import open_run
    from rmt_bench.train.checkpoint import read_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)  # what other tests evaluated on the shared run
    payload = read_checkpoint(run / "checkpoint.pt")
    # the last step's weights made different from the best validation's (in a short run they may be the same)
    payload["model"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in payload["model"].items()}
    torch.save(payload, run / "checkpoint.pt")
    for weights, key in (("best", "best_model"), ("final", "model")):
        _, _, model = open_run(run, weights=weights)
        assert all(torch.equal(t, payload[key][k]) for k, t in model.state_dict().items())
    res = tool("evaluate", run, "--weights", "final", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    record = json.loads((run / "eval" / "final_weights.json").read_text())
    assert record["weights"] == "final" and not (run / "eval" / "as_trained.json").exists()
    args = ["--grid", "segments=3", "--examples", 16, "--weights", "final", "--out", tmp_path / "g"]
    grid = tool("evaluate", run, *args, cwd=tmp_path)
    assert grid.returncode == 0, grid.stderr
    assert (run / "eval" / "grid_segments_final_weights.json").is_file()
    assert not (run / "eval" / "grid_segments.json").exists()  # the report's file holds the tested weights only


def test_report_tabulates_a_sweep_by_its_swept_keys_and_marks_a_failed_job(tmp_path):
    args = [*TINY, "task.length=6", "task.segments=2", "trainer.max_minutes=null", "trainer.num_threads=1"]
    res = run_cli("-m", *args, "model=xl,rmt", "mem=2", "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (tmp_path / "sweep" / "4_broken").mkdir()
    (tmp_path / "sweep" / "4_broken" / "config.json").write_text("{}")  # a job that died before its summary
    cmd = [sys.executable, "-m", "rmt_bench.report", str(tmp_path / "sweep"), "--out", str(tmp_path / "r")]
    rep = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert rep.returncode == 0, rep.stderr
    table = (tmp_path / "r" / "runs.md").read_text()
    summaries = {}
    for run in (tmp_path / "sweep").glob("*_*"):
        if (run / "summary.json").exists():
            s = json.loads((run / "summary.json").read_text())
            summaries.setdefault(s["model"], []).append(s["test/acc"])
    for model, accs in summaries.items():
        row = next(line for line in table.splitlines() if f"model={model}" in line)
        assert "2 of 2" in row and f"**{sum(accs) / 2:.4f}** ({min(accs):.4f}-{max(accs):.4f})" in row
    assert "4_broken: failed or unfinished" in table
    assert (tmp_path / "r" / "curves_train_loss.png").is_file() and (tmp_path / "r" / "curves_val_acc.png").is_file()
