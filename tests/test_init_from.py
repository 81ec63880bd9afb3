"""trainer.init_from: a run that starts from another finished run's tested weights (a curriculum across runs, e.g.
the facts without filler, then with it), and its bad inputs as one line each, before anything is written."""

from __future__ import annotations

import pytest
import torch

from rmt_bench.config import ConfigError, model_switches
from tests.helpers import TINY, run_cli

FACTS = [*TINY, "task=facts", "task.variant=reason", "task.segments=1", "mem=2", "trainer.num_threads=1"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished facts run on segments of 24 tokens (the three facts and the question, one filler word)."""
    root = tmp_path_factory.mktemp("init_from")
    res = run_cli(*FACTS, "task.segment_len=24", f"hydra.run.dir={root}/a", cwd=root)
    assert res.returncode == 0, res.stderr
    return root / "a"


def weights(run_dir, key):
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)[key]


def test_a_run_starts_from_the_tested_weights_of_another_at_another_segment_length(source, tmp_path):
    """One step at lr 1e-9 from the source's tested weights leaves them where they were; without init_from the
    same run starts from its own random weights, far from them."""
    args = [*FACTS, "task.segment_len=32", "trainer.max_steps=1", "trainer.lr=1e-9", "trainer.eval_every=1"]
    res = run_cli(*args, f"trainer.init_from={source}", f"hydra.run.dir={tmp_path}/b", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"init_from: the tested weights of {source}" in res.stderr
    fresh = run_cli(*args, f"hydra.run.dir={tmp_path}/c", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    tested = weights(source, "best_model")
    started, own = weights(tmp_path / "b", "model"), weights(tmp_path / "c", "model")
    assert all(torch.allclose(started[k], tested[k], atol=1e-6) for k in tested)
    assert not all(torch.allclose(own[k], tested[k], atol=1e-3) for k in tested)


def test_a_missing_run_is_one_line_and_nothing_is_written(tmp_path):
    res = run_cli(*FACTS, "task.segment_len=24", f"trainer.init_from={tmp_path}/nowhere",
                  f"hydra.run.dir={tmp_path}/b", cwd=tmp_path)  # fmt: skip
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        f"error: trainer.init_from: {tmp_path}/nowhere: not a run directory (no config.json; give the directory "
        "of a finished run)"
    ]
    assert not (tmp_path / "b" / "metrics.jsonl").exists() and not (tmp_path / "b" / "checkpoint.pt").exists()


def test_another_task_or_another_model_shape_is_refused(source):
    from rmt_bench.config import run_config_from_dict
    from rmt_bench.finished import read_config
    from rmt_bench.job import init_from
    from rmt_bench.models import build_model
    from rmt_bench.tasks import build_task

    saved = read_config(source)
    cfg = run_config_from_dict(saved | {"trainer": saved["trainer"] | {"init_from": str(source)}})
    task = build_task(cfg.task)
    model = build_model(cfg.model, task.vocab_size)
    assert init_from(model, cfg).startswith("init_from: the tested weights of")  # the same: loads
    wider = run_config_from_dict(cfg_dict := saved | {"model": saved["model"] | {"d_inner": 48}})
    wider.trainer.init_from = str(source)
    with pytest.raises(ConfigError, match=r"trainer.init_from: .*checkpoint.pt does not fit this run's rmt \(Error"):
        init_from(build_model(wider.model, task.vocab_size), wider)
    xl_switches = model_switches("xl", 4) | {"num_mem_tokens": 0, "recurrent_memory": False}
    xl = run_config_from_dict(cfg_dict | {"model": saved["model"] | xl_switches})
    xl.trainer.init_from = str(source)
    with pytest.raises(ConfigError, match="trained rmt on facts, not xl on facts"):
        init_from(model, xl)
