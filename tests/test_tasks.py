"""The generators: the answer is the copy / reverse / value; same seed, same data; mask = the answer."""

from __future__ import annotations

import pytest
import torch

from rmt_bench.tasks import build_task
from rmt_bench.tasks.algorithmic import START
from tests.helpers import tiny_task


def full_sequences(task, split):
    b = task.splits[split]
    n = b.inputs.shape[0]
    inputs, targets = b.inputs.reshape(n, -1), b.targets.reshape(n, -1)
    return torch.cat([inputs[:, :1], targets], 1), b.loss_mask.reshape(n, -1)


def test_copy_answer_is_two_copies():
    task = build_task(tiny_task("copy", length=5, segments=3))
    seq, mask = full_sequences(task, "train")
    x = seq[:, :5]
    assert (seq[:, 5] == START).all()
    assert torch.equal(seq[:, 6:11], x) and torch.equal(seq[:, 11:16], x)
    assert mask.shape[1] == 15 and mask[:, -10:].all() and not mask[:, :-10].any()


def test_reverse_answer_is_reversed():
    task = build_task(tiny_task("reverse", length=6, segments=4))
    seq, mask = full_sequences(task, "valid")
    assert torch.equal(seq[:, 7:], seq[:, :6].flip(1))
    assert (seq[:, 6] == START).all()
    assert mask.sum(1).eq(6).all() and mask[:, -6:].all()
    assert task.splits["valid"].inputs.shape == (16, 4, 3)


def test_retrieval_answer_is_the_queried_value():
    task = build_task(tiny_task("retrieval", num_pairs=4, train_size=500))
    seq, mask = full_sequences(task, "train")
    assert seq.shape[1] == 11 and mask.sum(1).eq(1).all() and mask[:, -1].all()
    keys, values = seq[:, 0:8:2], seq[:, 1:8:2]
    for k, v, q, a in zip(keys, values, seq[:, 9], seq[:, 10]):
        assert len(set(k.tolist())) == 4  # distinct keys: the answer is defined
        assert a == v[(k == q).nonzero()[0, 0]]
    assert (keys < 28).all() and (values >= 28).all() and (seq[:, 8] == START).all()


def parse_quadratic(steps: list[str]) -> tuple[int, int, int, list[int] | None]:
    """(a, b, c, roots or None) read back from the written steps, by a parser of its own."""
    import re

    a, b, c = map(int, re.fullmatch(r"(\d+)\*x\^2([+-]\d+)\*x([+-]\d+)=0", steps[0]).groups())
    if steps[5] == "no real roots":
        return a, b, c, None
    return a, b, c, [int(r) for r in steps[5].removeprefix("x=").split(",")]


def test_quadratic_roots_satisfy_their_equation_and_rootless_ones_have_a_negative_discriminant():
    from rmt_bench.tasks.quadratic import STEP_CHARS, decode

    task = build_task(tiny_task("quadratic", segments=6, train_size=3000, length=1))
    seq, mask = full_sequences(task, "train")
    assert seq.shape == (3000, 181) and (seq[:, 0] == START).all() and task.splits["train"].inputs.shape[1:] == (6, 30)
    assert mask[:, STEP_CHARS:].all() and not mask[:, :STEP_CHARS].any()  # the loss on steps 2-6
    rootless = 0
    for row in seq:
        steps = decode(row[1:].tolist())
        a, b, c, roots = parse_quadratic(steps)
        assert 1 <= a <= 10 and b % a == 0 and c % a == 0  # integer equations times a factor 1..10
        d = b * b - 4 * a * c
        assert steps[1].endswith(f"={d}")
        if roots is None:
            rootless += 1
            assert d < 0 and steps[2] == "D<0"
            continue
        assert d >= 0 and all(-100 <= r <= 100 and a * r * r + b * r + c == 0 for r in roots)
        assert steps[2] == f"sqrt(D)={round(d**0.5)}" and len(roots) == (1 if d == 0 else 2)
        assert steps[3].endswith(f"={max(roots)}") and steps[4].endswith(f"={min(roots)}")
    assert 0.17 < rootless / len(seq) < 0.23  # the paper's 20% without real roots


def test_quadratic_headline_is_the_final_steps_exact_match():
    """Known values: a wrong solution step spoils `exact` but not `final_exact`; a wrong answer spoils both."""
    from rmt_bench.tasks.algorithmic import answer_hits

    task = build_task(tiny_task("quadratic", segments=6, length=1))
    b = task.splits["test"]
    preds = b.targets.clone()
    preds[0, 4, 29] += 1  # example 0: the last character of step 5 wrong
    preds[1, 5, 0] += 1  # example 1: the answer step wrong
    preds[2, 0, 5] += 1  # example 2: a character of the equation (not scored) "wrong"
    right, exact, final = answer_hits(preds, b.targets, b.loss_mask, task.final_len)
    n = b.targets.shape[0]
    assert (exact, final) == (n - 2, n - 1) and right == b.loss_mask.sum().item() - 2


def test_quadratic_splits_only_into_divisors_of_180():
    from rmt_bench.config import ConfigError

    with pytest.raises(ConfigError, match="does not divide the quadratic sequence of 180 tokens"):
        tiny_task("quadratic", segments=7, length=1)


@pytest.mark.parametrize("name", ["copy", "reverse", "retrieval", "quadratic"])
def test_same_seed_same_data_and_splits_differ(name):
    a, b = build_task(tiny_task(name)), build_task(tiny_task(name))
    c = build_task(tiny_task(name, data_seed=7))
    for split in ("train", "valid", "test"):
        assert torch.equal(a.splits[split].inputs, b.splits[split].inputs)
    assert not torch.equal(a.splits["valid"].inputs, a.splits["test"].inputs)
    assert not torch.equal(a.splits["train"].inputs, c.splits["train"].inputs)


def test_targets_are_inputs_shifted_by_one():
    task = build_task(tiny_task("copy", length=4, segments=2))
    b = task.splits["test"]
    inputs, targets = b.inputs.reshape(16, -1), b.targets.reshape(16, -1)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_train_order_depends_on_seed_and_resumes():
    task = build_task(tiny_task(train_size=40))
    first = [b.inputs for _, b in zip(range(7), task.train_batches(8, seed=3))]
    again = [b.inputs for _, b in zip(range(7), task.train_batches(8, seed=3))]
    resumed = [b.inputs for _, b in zip(range(4), task.train_batches(8, seed=3, start_step=3))]
    other = next(task.train_batches(8, seed=4)).inputs
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert all(torch.equal(x, y) for x, y in zip(first[3:], resumed))
    assert not torch.equal(first[0], other)


@pytest.mark.parametrize(("segments", "pad"), [(3, 2), (4, 2), (6, 2), (7, 4)])
def test_retrieval_in_3_or_4_segments_is_padded_at_the_front_and_keeps_its_data(segments, pad):
    """10 tokens into 3 or 4 segments: 2 padding tokens in front (out of the loss), the query in the last
    segment, and the same examples as in 2 segments (which need no padding)."""
    from rmt_bench.tasks.algorithmic import PAD

    plain = build_task(tiny_task("retrieval", segments=2))
    padded = build_task(tiny_task("retrieval", segments=segments))
    assert plain.pad_front == 0 and padded.pad_front == pad and padded.cfg.seq_len == 10 + pad
    seq, mask = full_sequences(padded, "test")
    ref, ref_mask = full_sequences(plain, "test")
    assert (seq[:, :pad] == PAD).all() and torch.equal(seq[:, pad:], ref)
    assert not mask[:, :pad].any() and torch.equal(mask[:, pad:], ref_mask)
    last = padded.splits["test"].inputs[:, -1]
    assert (last[:, -2] == START).all()  # '?' and the queried key sit in the last segment


def test_retrieval_segments_beyond_its_length_are_one_line():
    from rmt_bench.config import ConfigError

    with pytest.raises(ConfigError, match=r"task.segments.*11"):
        tiny_task("retrieval", segments=11)


@pytest.mark.parametrize("pairs", [2, 4, 10])
def test_retrieval_keys_and_values_are_distinct_as_the_official_generator(pairs):
    """booydar/LM-RMT `retrieval.py`: distinct letters as keys, distinct digits as values while pairs <= 10."""
    from rmt_bench.tasks.algorithmic import NUM_KEYS

    task = build_task(tiny_task("retrieval", num_pairs=pairs, segments=1, train_size=2000))
    seq, _ = full_sequences(task, "train")
    keys, values = seq[:, 0 : 2 * pairs : 2], seq[:, 1 : 2 * pairs : 2]
    assert ((keys >= 2) & (keys < 2 + NUM_KEYS)).all() and (values >= 2 + NUM_KEYS).all()
    for part in (keys, values):
        assert (part.sort(1).values.diff(1) != 0).all()  # no repeat within an example
    # every digit is drawn: the values are a random subset, not a fixed one
    assert values.unique().numel() == 10


def test_retrieval_values_repeat_beyond_ten_pairs():
    """Beyond 10 pairs there are not enough digits: drawn with replacement, as the official code does."""
    task = build_task(tiny_task("retrieval", num_pairs=12, segments=1, train_size=200))
    seq, _ = full_sequences(task, "train")
    values = seq[:, 1:24:2]
    assert (values.sort(1).values.diff(1) == 0).any(1).all()


def test_retrieval_no_memory_bound_in_two_segments_is_one_half():
    """The last of 2 segments shows `v3 k4 v4 ? kq`: answering v4 for the query k4 and v3 otherwise scores
    0.25 + 0.25 = 0.50 with distinct values (the paper's Baseline), and no rule on that segment alone does better."""
    task = build_task(tiny_task("retrieval", segments=2, test_size=20000))
    last, target = task.splits["test"].inputs[:, -1], task.splits["test"].targets[:, -1, -1]
    v3, k4, v4, kq = last[:, 0], last[:, 1], last[:, 2], last[:, 4]
    guess = torch.where(kq == k4, v4, v3)
    assert abs((guess == target).float().mean().item() - 0.50) < 0.015


def test_retrieval_padded_at_the_end_splits_as_the_official_chunks():
    """tgt_len 3 in the official training loop: torch.chunk of 10 tokens into 3 is 4 + 4 + 2, the query alone in
    the last chunk. pad_side=end gives 3 segments of 4 whose last holds `? kq` and 2 padding inputs; the answer
    is scored at the query and is never an input; the examples are those of 2 segments."""
    from rmt_bench.tasks.algorithmic import PAD

    plain = build_task(tiny_task("retrieval", segments=2))
    chunks = build_task(tiny_task("retrieval", segments=3, pad_side="end"))
    assert chunks.pad_front == 0 and chunks.cfg.pad_end == 2 and chunks.segment_len == 4
    test, ref = chunks.splits["test"], plain.splits["test"]
    last = test.inputs[:, -1]
    assert (last[:, 0] == START).all() and (last[:, 2:] == PAD).all()
    assert torch.equal(last[:, 1], ref.inputs[:, -1, -1])  # the queried key
    assert torch.equal(test.loss_mask[:, -1], torch.tensor([False, True, False, False]).expand(16, 4))
    assert torch.equal(test.targets[:, -1, 1], ref.targets[:, -1, -1])  # the value
    assert torch.equal(test.inputs.reshape(16, -1)[:, :10], ref.inputs.reshape(16, -1))
