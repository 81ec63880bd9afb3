"""The follow-up's memorisation tasks (rmt_bench/tasks/facts.py): where each variant puts its facts, that the
answer follows from them, determinism by seed, filler that never holds a fact's word (built-in and from a corpus
read by the language-modelling loader), streamed evaluation at any length with flat memory, bad sizes in one line."""

from __future__ import annotations

import json

import pytest
import torch

from rmt_bench.config import ConfigError, FactsTaskConfig
from rmt_bench.models import build_model
from rmt_bench.tasks import build_task
from rmt_bench.tasks.facts import FACT_LEN, FACT_WORDS, FILLER_START, PEOPLE, PLACES, WORD
from tests.helpers import TINY, run_cli, tiny_model, write_wikitext

NAMES = {v: k for k, v in WORD.items()}


def task(variant: str, **kw):
    cfg = FactsTaskConfig(**(dict(variant=variant, segments=3, segment_len=16, valid_size=200, test_size=300) | kw))
    return build_task(cfg)


def sequences(t, split="test"):
    b = t.splits[split]
    return b.inputs.flatten(1), b.targets[:, -1, -1], b.loss_mask.flatten(1)


def facts_in(row: list[int]) -> list[tuple[int, list[str]]]:
    """(start, words) of every fact in a token row: a person followed by 'went' or 'picked'."""
    out = []
    for i in range(len(row) - FACT_LEN + 1):
        words = [NAMES.get(t, "") for t in row[i : i + FACT_LEN]]
        if words[0] in PEOPLE and words[1] in ("went", "picked") and words[5] == ".":
            out.append((i, words))
    return out


def answer_by_hand(row: list[int]) -> str:
    """What the question asks, answered from the facts in the row, as a reader would."""
    words = [NAMES.get(t, "") for t in row]
    found = facts_in(row)
    where = {w[0]: w[4] for _, w in found if w[1] == "went"}
    if words[-3] == "the":  # where is the OBJECT ?
        holder = next(w[0] for _, w in found if w[1] == "picked" and w[4] == words[-2])
        return where[holder]
    return where[words[-2]]  # where is PERSON ?


@pytest.mark.parametrize("variant", ["memorize", "detect", "reason"])
def test_the_facts_stand_where_the_variant_says_and_the_answer_follows_from_them(variant):
    t = task(variant)
    inputs, answers, mask = sequences(t)
    assert mask.sum(1).eq(1).all() and mask[:, -1].all()  # one answer, after the question
    starts = []
    for row, answer in zip(inputs.tolist(), answers.tolist()):
        found = facts_in(row)
        assert len(found) == (3 if variant == "reason" else 1)
        assert NAMES[answer] in PLACES and NAMES[answer] == answer_by_hand(row)
        starts += [s for s, _ in found]
        q = 5 if variant == "reason" else 4
        assert [NAMES.get(x) for x in row[-q : -q + 2]] == ["where", "is"] and all(
            s + FACT_LEN <= 48 - q for s in starts
        )
    if variant == "memorize":
        assert set(starts) == {0}
    else:  # anywhere before the question, the last segment included
        assert min(starts) < 16 and max(starts) >= 32
    if variant == "reason":  # the answer is not always the first place mentioned: the pick-up decides
        firsts = [facts_in(r)[0][1][4] if facts_in(r)[0][1][1] == "went" else None for r in inputs.tolist()]
        assert any(f is not None and NAMES[a] != f for f, a in zip(firsts, answers.tolist()))


def test_data_depend_on_the_data_seed_only():
    a, b = task("detect"), task("detect")
    c = task("detect", data_seed=1)
    assert torch.equal(a.splits["test"].inputs, b.splits["test"].inputs)
    assert not torch.equal(a.splits["test"].inputs, c.splits["test"].inputs)
    assert torch.equal(a.batch_at(5, 8, seed=0).inputs, b.batch_at(5, 8, seed=0).inputs)
    assert not torch.equal(a.batch_at(5, 8, seed=0).inputs, a.batch_at(6, 8, seed=0).inputs)


@pytest.mark.parametrize("source", ["builtin", "corpus"])
def test_the_filler_never_holds_a_word_of_the_facts(tmp_path, source):
    kw = {}
    if source == "corpus":
        data = write_wikitext(tmp_path / "wt", lines_per_split=(200, 40, 40))
        with open(data / "wiki.test.tokens", "a") as f:  # the facts' words in the text itself
            f.write(" Mary went to the kitchen . The football is where John is ? \n" * 20)
        kw = dict(filler_dir=str(data), cache_dir=str(tmp_path / "cache"))
    t = task("detect", **kw)
    inputs, _, _ = sequences(t)
    fact_tokens = set(range(2, FILLER_START))
    for row in inputs.tolist():
        ((start, _),) = facts_in(row)
        outside = row[:start] + row[start + FACT_LEN : -4]
        assert not fact_tokens & set(outside)
    lower = {w.lower() for w in FACT_WORDS}
    assert not lower & {w.lower() for w in t.filler.words}
    assert ("Heading" in t.filler.words) == (source == "corpus")  # a word of the corpus's headings, not built in


def test_streamed_evaluation_runs_any_length_with_flat_memory():
    t = task("memorize")
    model = build_model(tiny_model("rmt"), t.vocab_size).eval()
    import contextlib

    short = t.evaluate_long(model, 4, 16, 8, contextlib.nullcontext)
    long = t.evaluate_long(model, 400, 16, 8, contextlib.nullcontext)  # 6,400 tokens per example
    assert short["tokens"] == 64 and long["tokens"] == 6400 and long["examples"] == 16
    assert 0 <= long["ci95"][0] <= long["acc"] <= long["ci95"][1] <= 1
    assert long["peak_memory_mb"] < short["peak_memory_mb"] + 50  # no growth with length
    assert sum(long["predicted"].values()) == 16


def test_streamed_evaluation_splits_the_accuracy_by_answer():
    """A model made to answer 'garden' whatever it reads: right on exactly the garden examples, and 'garden' is
    the one place it holds and the only one predicted."""
    import contextlib

    t = task("memorize")
    model = build_model(tiny_model("rmt"), t.vocab_size).eval()
    with torch.no_grad():
        model.head.proj.bias.fill_(0).data[WORD["garden"]] = 1e4
    res = t.evaluate_long(model, 3, 48, 16, contextlib.nullcontext)
    assert set(res["acc_by_answer"]) <= set(PLACES) and len(res["acc_by_answer"]) >= 4  # 48 draws of 6 places
    assert all(acc == (1.0 if place == "garden" else 0.0) for place, acc in res["acc_by_answer"].items())
    assert res["answers_held"] == 1 and res["predicted"]["garden"] == 48 and res["predicted"]["other"] == 0
    garden = res["acc"] * 48  # the garden examples, all right
    assert garden == round(garden) and 0 < garden < 48


def test_the_order_of_the_reason_facts_is_read_as_a_reader_would():
    """fact_order labels each example's three facts in text order (H the holder's move, O the other's, P the
    pick-up): checked against the facts found in the token rows, over all six orders."""
    from rmt_bench.tasks.facts import fact_order, make_examples, plan

    t = task("reason")
    gen, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    seq, _ = make_examples(t.cfg, t.filler, "test", 300, gen)
    labels = fact_order(plan(t.cfg, 300, twin))  # the same draws: plan is make_examples' first
    for row, label in zip(seq[:, :-1].tolist(), labels):
        found = [w for _, w in facts_in(row)]
        holder = next(w[0] for w in found if w[1] == "picked")
        assert label == " ".join("P" if w[1] == "picked" else "H" if w[0] == holder else "O" for w in found)
    assert len(set(labels)) == 6


def test_streamed_reason_evaluation_splits_the_accuracy_by_the_facts_order():
    import contextlib

    t = task("reason")
    model = build_model(tiny_model("rmt"), t.vocab_size).eval()
    with torch.no_grad():
        model.head.proj.bias.fill_(0).data[WORD["garden"]] = 1e4
    res = t.evaluate_long(model, 3, 96, 32, contextlib.nullcontext)
    counts = res["examples_by_order"]
    assert set(counts) == set(res["acc_by_order"]) and sum(counts.values()) == 96 and len(counts) >= 5
    right = sum(res["acc_by_order"][o] * c for o, c in counts.items())
    assert right == pytest.approx(res["acc"] * 96)  # the orders partition the examples
    assert "acc_by_order" not in task("memorize").evaluate_long(model, 3, 8, 8, contextlib.nullcontext)


def test_too_short_for_the_facts_is_one_line():
    with pytest.raises(ConfigError, match="task.segment_len: 2 x 8 tokens do not hold the reason task's facts"):
        FactsTaskConfig(variant="reason", segments=2, segment_len=8)


def test_a_facts_run_with_a_curriculum_over_segments_trains_and_tests(tmp_path):
    args = [*TINY, "task=facts", "task.segments=3", "task.segment_len=16", "mem=4", "trainer.max_minutes=null",
            "trainer.curriculum.key=segments", "trainer.curriculum.stages=[1,2]",
            "trainer.curriculum.max_stage_steps=2", "trainer.curriculum.valid_size=8",
            "trainer.num_threads=1"]  # fmt: skip
    res = run_cli(*args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "curriculum: segments 1 -> 2 -> 3" in res.stderr and "facts rmt mem=4 segments=3" in res.stdout
    # accuracy against length from the run, with the places it holds (a column of the facts tasks only)
    from rmt_bench.evaluate import main as evaluate_main

    evaluate_main([str(tmp_path / "run"), "--grid", "segments=3,5", "--examples", "12", "--out", str(tmp_path / "g")])
    table = (tmp_path / "g" / "eval_grid.md").read_text().splitlines()
    column = [c.strip() for c in table[0].split("|")].index("places held (of 6)")
    rows = json.loads((tmp_path / "g" / "eval_grid.json").read_text())
    assert len(rows) == 2 and len(table) == 4
    for row, line in zip(rows, table[2:]):
        held = sum(acc >= 0.9 for acc in row["test/acc_by_answer"].values())
        assert row["test/answers_held"] == held and line.split("|")[column].strip() == str(held)
