"""The curriculum (trainer.curriculum): each stage's task setting, the advance rule, the batches per stage, the
stage in the metrics / summary / checkpoint, an exact resume mid-stage, bad schedules in one line."""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch

from rmt_bench.config import ConfigError, CurriculumConfig, LMTaskConfig
from rmt_bench.tasks import build_task
from rmt_bench.train.curriculum import Curriculum
from rmt_bench.train.loop import TrainState
from tests.helpers import TINY, assert_same_run, interrupted_then_resumed, run_cli, tiny_task


def test_stages_vary_the_key_and_the_segment_length_follows():
    pairs = CurriculumConfig(key="num_pairs", stages=[1, 2, 3]).settings(tiny_task("retrieval", segments=2))
    assert [(c.num_pairs, c.segments, c.segment_len, c.pad_front) for c in pairs] == [
        (1, 2, 2, 0), (2, 2, 3, 0), (3, 2, 4, 0), (4, 2, 5, 0)
    ]  # fmt: skip
    padded = CurriculumConfig(key="num_pairs", stages=[1, 3]).settings(tiny_task("retrieval", segments=3))
    assert [(c.num_pairs, c.segment_len, c.pad_front) for c in padded] == [(1, 2, 2), (3, 3, 1), (4, 4, 2)]
    lengths = CurriculumConfig(key="length", stages=[3]).settings(tiny_task("reverse", length=6, segments=3))
    assert [(c.length, c.segment_len) for c in lengths] == [(3, 2), (6, 4)]
    # segments: the segment length stays, the sequence grows (reverse: 2L tokens)
    segs = CurriculumConfig(key="segments", stages=[1, 2]).settings(tiny_task("reverse", length=6, segments=3))
    assert [(c.segments, c.segment_len, c.length) for c in segs] == [(1, 4, 2), (2, 4, 4), (3, 4, 6)]
    # a stage equal to the task's own is the last stage, not a second one
    same = CurriculumConfig(key="num_pairs", stages=[2, 4]).settings(tiny_task("retrieval", segments=2))
    assert [c.num_pairs for c in same] == [2, 4]


def test_several_keys_name_the_sequence_and_the_segment_count():
    # the pairs at 2 segments, then the segments at the task's 4 pairs: the segment length follows (10 tokens)
    cfg = CurriculumConfig(key=["num_pairs", "segments"], stages=[[1, 2], [2, 2], [4, 2], [4, 3]])
    stages = cfg.settings(tiny_task("retrieval", segments=4))
    assert [(c.num_pairs, c.segments, c.segment_len, c.pad_front) for c in stages] == [
        (1, 2, 2, 0), (2, 2, 3, 0), (4, 2, 5, 0), (4, 3, 4, 2), (4, 4, 3, 2)
    ]  # fmt: skip
    cur = Curriculum(cfg, build_task(tiny_task("retrieval", segments=4)))
    assert cur.values(2) == {"num_pairs": 4, "segments": 2} and cur.value(3) == "4,3"
    assert cur.describe().startswith("num_pairs,segments 1,2 -> 2,2 -> 4,2 -> 4,3 -> 4,4 (next at")
    # a one-element key list is the one key
    assert CurriculumConfig(key=["length"], stages=[3]).keys == ("length",)


@pytest.mark.parametrize(
    ("cfg", "task", "message"),
    [
        (dict(key="num_pairs", stages=[]), tiny_task("retrieval"), "trainer.curriculum.stages: an empty list"),
        (dict(key="num_pairs", stages=[2, 5]), tiny_task("retrieval"), "stage 5 is past the task's own"),
        (dict(key="length", stages=[1]), tiny_task("retrieval"), "'length' is not a key task retrieval can vary"),
        (dict(key="length", stages=[2]), tiny_task("quadratic", segments=6), "task quadratic has no curriculum"),
        (dict(key="segments", stages=[1]), LMTaskConfig(), "task wikitext103 has no curriculum"),
        (dict(key="length", stages=[5]), tiny_task("reverse", length=6, segments=3), "stage length=5: task.segments"),
        (dict(key="num_pairs", stages=[3, 2]), tiny_task("retrieval"), "must be increasing, got [3, 2]"),
        (dict(key="num_pairs", stages=[0, 2]), tiny_task("retrieval"), "must be values >= 1, got [0, 2]"),
        # several keys: one value per key in every stage, no key falling, every stage within the task's own
        (
            dict(key=["num_pairs", "segments"], stages=[[1, 2], 3]),
            tiny_task("retrieval", segments=3),
            "each stage is a list of 2 values (num_pairs, segments), got 3",
        ),
        (
            dict(key=["num_pairs", "segments"], stages=[[2, 2], [1, 3]]),
            tiny_task("retrieval", segments=3),
            "must be rising stage by stage (no key falling, none repeated)",
        ),
        (
            dict(key=["num_pairs", "segments"], stages=[[4, 4]]),
            tiny_task("retrieval", segments=3),
            "stage [4, 4] is past the task's own setting (segments 4 > 3)",
        ),
        (dict(key=["num_pairs", "num_pairs"], stages=[[1, 2]]), tiny_task("retrieval"), "names a key twice"),
        (
            dict(key=["length", "segments"], stages=[[5, 3]]),
            tiny_task("reverse", length=6, segments=3),
            "stage length=5, segments=3: task.segments: 3 does not divide the reverse sequence of 10 tokens",
        ),
        (dict(key=None, stages=[1]), tiny_task("retrieval"), "trainer.curriculum.key: stages [1] need a key"),
    ],
)
def test_a_bad_schedule_is_one_clear_error(cfg, task, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CurriculumConfig(**cfg).settings(task)


def test_the_next_stage_starts_at_the_threshold_or_the_step_cap():
    final = build_task(tiny_task("retrieval", segments=2))
    cur = Curriculum(CurriculumConfig(key="num_pairs", stages=[1, 2], threshold=0.9, max_stage_steps=50), final)
    st = TrainState(step=20)
    assert not cur.advance(st, 0.89) and st.stage == 0
    assert cur.advance(st, 0.9) and (st.stage, st.stage_starts) == (1, [0, 20])
    st.step = 69
    assert not cur.advance(st, 0.1) and st.stage == 1  # 49 steps into the stage
    st.step = 70
    assert cur.advance(st, 0.1) and (st.stage, st.stage_starts) == (2, [0, 20, 70])
    assert not cur.advance(st, 1.0) and st.stage == 2 == cur.last  # the task's own setting is the last stage
    assert cur.task(2) is final and cur.value(0) == "1" and cur.values(2) == {"num_pairs": 4}


def test_batches_follow_the_stage_and_depend_on_seed_step_and_stage_only():
    final = build_task(tiny_task("retrieval", segments=3, train_size=200))
    cur = Curriculum(CurriculumConfig(key="num_pairs", stages=[1, 3], valid_size=10), final)
    st = TrainState()
    batches = cur.batches(st, 8, seed=1)
    first = next(batches)
    assert first.inputs.shape == (8, 3, 2) and first.pad_front == 2  # 1 pair: 4 tokens, padded to 6
    st.step, st.stage = 5, 1
    second = next(batches)
    assert second.inputs.shape == (8, 3, 3) and second.pad_front == 1
    again = next(Curriculum(cur.cfg, final).batches(TrainState(step=5, stage=1), 8, seed=1))
    assert torch.equal(again.inputs, second.inputs)  # a resumed run draws the same batch
    assert cur.task(0).splits.keys() == {"train", "valid"} and cur.task(0).splits["valid"].inputs.shape[0] == 10


def test_varying_batches_draw_every_stage_up_to_the_current():
    final = build_task(tiny_task("retrieval", segments=2, train_size=200))
    cfg = CurriculumConfig(key="num_pairs", stages=[1, 2, 3], varying=True)
    st = TrainState(stage=2)
    batches = Curriculum(cfg, final).batches(st, 4, seed=0)
    lengths = set()
    for step in range(60):
        st.step = step
        lengths.add(next(batches).inputs.shape[2])
    assert lengths == {2, 3, 4}  # pairs 1, 2, 3; never the 4 pairs of the stage not reached


CURRICULUM = [
    *TINY, "task=retrieval", "mem=3", "trainer.max_minutes=null", "trainer.max_steps=60", "trainer.eval_every=10",
    "trainer.log_every=5", "trainer.curriculum.key=num_pairs", "trainer.curriculum.stages=[1,2,3]",
    "trainer.curriculum.threshold=0.3", "trainer.curriculum.max_stage_steps=20", "trainer.curriculum.valid_size=16",
    "task.train_size=256", "model.dropout=0.1", "trainer.num_threads=1",
]  # fmt: skip


def test_the_stage_is_in_the_metrics_the_summary_and_the_checkpoint(tmp_path):
    res = run_cli(*CURRICULUM, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "curriculum: num_pairs 1 -> 2 -> 3 -> 4 (next at 0.3, at most 20 steps a stage)" in res.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stages = [(r["step"], r["curriculum/stage"], r["curriculum/num_pairs"]) for r in rows if "curriculum/stage" in r]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    starts = summary["curriculum_starts"]
    assert starts["1"] == 0 and list(starts) == ["1", "2", "3", "4"][: len(starts)]
    # every logged stage is the one the summary's start steps give for the steps before it (logged, then advanced)
    begun = list(starts.values())
    assert len(stages) == 6
    for step, stage, pairs in stages:
        assert pairs == stage + 1 and begun[stage] < step and (stage + 1 == len(begun) or step <= begun[stage + 1])
    assert summary["curriculum_stage"] == len(starts) - 1
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["train_state"]["stage"] == summary["curriculum_stage"]
    assert ckpt["train_state"]["stage_starts"] == list(starts.values())


def test_a_run_killed_mid_curriculum_resumes_bit_for_bit(tmp_path):
    full = run_cli(*CURRICULUM, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    assert len(json.loads((tmp_path / "full" / "summary.json").read_text())["curriculum_starts"]) > 2
    split, step, _, _ = interrupted_then_resumed(CURRICULUM, tmp_path, signal.SIGKILL)
    assert 0 < step < 60
    assert_same_run(tmp_path / "full", split)


def test_a_stage_with_padding_hides_it_although_the_final_setting_has_none():
    """The model is built for the task's own setting (2 segments: no padding); a stage of 1 pair in 3 segments pads 2
    tokens in front. The training step starts from the batch's padding: the padding tokens change no loss."""
    from rmt_bench.config import TrainerConfig
    from rmt_bench.models import StreamState, build_model
    from rmt_bench.train.loop import autocast_factory, train_step
    from tests.helpers import tiny_model

    final = build_task(tiny_task("retrieval", segments=3, num_pairs=4))
    cur = Curriculum(CurriculumConfig(key="num_pairs", stages=[1]), final)
    model = build_model(tiny_model("rmt"), final.vocab_size, pad_front=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = next(cur.batches(TrainState(), 8, seed=0))
    assert batch.pad_front == 2
    other = batch.take(torch.arange(8))
    other.inputs = other.inputs.clone()
    other.inputs[:, 0, :2] = torch.randint(2, final.vocab_size, (8, 2))
    args = dict(model=model, optimizer=opt, cfg=TrainerConfig(), carried=StreamState(), keep_final_state=False,
                autocast=autocast_factory(torch.device("cpu"), False))  # fmt: skip
    loss, _ = train_step(batch=batch, **args)
    assert loss == pytest.approx(train_step(batch=other, **args)[0], abs=1e-6)
