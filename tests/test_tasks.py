"""The generators: the answer is the copy / reverse / value; same seed, same data; mask = the answer."""

from __future__ import annotations

import pytest
import torch

from rmt_bench.tasks import build_task
from rmt_bench.tasks.algorithmic import START
from tests.conftest import tiny_task


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


@pytest.mark.parametrize("name", ["copy", "reverse", "retrieval"])
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
