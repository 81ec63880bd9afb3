"""The paper's algorithmic tasks (Sec. 4.1, App. A): copy, reverse, associative retrieval, quadratic equations
(the generator and its format: tasks/quadratic.py).

Every example is `seq`, the model reads `seq[:-1]` and predicts `seq[1:]`; the loss mask marks the answer.
Token 0 is padding, token 1 the start (or '?') token, symbols follow. All splits are drawn once, vectorised,
from generators seeded by `data_seed` alone, so every run of a config scores on the same examples.

Associative retrieval follows the official generator (booydar/LM-RMT, `experiment_utils/retrieval.py`): keys are
distinct letters, values distinct digits while pairs <= 10 (drawn with replacement beyond, as there). Its loader
puts the queried key before the separator (`... k4 v4 kq ? -> v`); ours puts it after (`... k4 v4 ? kq -> v`): the
same tokens reach every segment of every split either way, so no bound or result depends on the order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from rmt_bench.config import TaskConfig
from rmt_bench.models import RecurrentModel, StreamState, generate_greedy
from rmt_bench.tasks.quadratic import ALPHABET, STEP_CHARS, make_quadratic

PAD, START = 0, 1
NUM_KEYS, NUM_VALUES = 26, 10  # retrieval: keys are letters, values digits
SPLIT_SEEDS = {"train": 0, "valid": 1, "test": 2}


@dataclass
class Batch:
    """inputs, targets, loss_mask: (B, S, n), already cut into S segments of n tokens."""

    inputs: Tensor
    targets: Tensor
    loss_mask: Tensor
    pad_front: int = 0  # padding tokens in front of every row, hidden from attention (the model's initial state)

    def to(self, device: torch.device) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.loss_mask.to(device), self.pad_front)

    def rows(self, lo: int, hi: int) -> Batch:
        """Rows lo..hi-1: examples, or columns of a stream (one rank's shard of a global batch)."""
        return Batch(self.inputs[lo:hi], self.targets[lo:hi], self.loss_mask[lo:hi], self.pad_front)

    def take(self, idx: Tensor) -> Batch:
        """The rows `idx` (examples)."""
        return Batch(self.inputs[idx], self.targets[idx], self.loss_mask[idx], self.pad_front)


def make_sequences(cfg: TaskConfig, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """-> full sequences (N, seq_len + 1) and the answer mask over the shifted targets (N, seq_len)."""
    if cfg.name in ("copy", "reverse"):
        x = torch.randint(2, 2 + cfg.num_symbols, (size, cfg.length), generator=gen)
        start = torch.full((size, 1), START)
        if cfg.name == "copy":  # X, start, X, X: the answer is the last 2L targets
            seq, answer_len = torch.cat([x, start, x, x], 1), 2 * cfg.length
        else:  # X, start, reversed X: the answer is the last L targets
            seq, answer_len = torch.cat([x, start, x.flip(1)], 1), cfg.length
    elif cfg.name == "quadratic":  # start, the equation, the five solution steps: the answer is steps 2-6
        return make_quadratic(size, gen)
    else:  # k1 v1 ... kP vP ? kq vq: the answer is the value of the queried key (length 2P + 2)
        keys = torch.rand(size, NUM_KEYS, generator=gen).argsort(1)[:, : cfg.num_pairs] + 2  # distinct letters
        values = retrieval_values(size, cfg.num_pairs, gen) + 2 + NUM_KEYS
        q = torch.randint(0, cfg.num_pairs, (size, 1), generator=gen)
        pairs = torch.stack([keys, values], 2).reshape(size, -1)
        seq = torch.cat([pairs, torch.full((size, 1), START), keys.gather(1, q), values.gather(1, q)], 1)
        answer_len = 1
    if cfg.pad_front:  # retrieval in 3 or 4 segments: padding in front, hidden from attention and the loss
        seq = torch.cat([torch.full((size, cfg.pad_front), PAD), seq], 1)
    mask = torch.zeros(size, seq.shape[1] - 1, dtype=torch.bool)
    mask[:, -answer_len:] = True
    if cfg.pad_end:  # the official uneven chunks (4 + 4 + 2): padding after the answer, out of the loss
        seq = torch.cat([seq, torch.full((size, cfg.pad_end), PAD)], 1)
        mask = torch.cat([mask, torch.zeros(size, cfg.pad_end, dtype=torch.bool)], 1)
    return seq, mask


def retrieval_values(size: int, pairs: int, gen: torch.Generator) -> Tensor:
    """(size, pairs) value indices in [0, 10): distinct digits while pairs <= 10, as the official generator
    (`np.random.choice(range(10), K, replace=K > 10)`); with replacement beyond."""
    if pairs <= NUM_VALUES:
        return torch.rand(size, NUM_VALUES, generator=gen).argsort(1)[:, :pairs]
    return torch.randint(0, NUM_VALUES, (size, pairs), generator=gen)


class AlgorithmicTask:
    """Fixed train/valid/test splits on one device, served as segmented batches (the task interface:
    tasks/__init__.py)."""

    stream = False  # every batch starts fresh examples: no state carried between batches

    def __init__(self, cfg: TaskConfig, device: torch.device | str = "cpu", splits=("train", "valid", "test")):
        self.cfg = cfg
        self.name = cfg.name
        self.metric = cfg.metric  # greedy answer accuracy (quadratic: the final answer's exact match)
        symbols = {"retrieval": NUM_KEYS + NUM_VALUES, "quadratic": len(ALPHABET)}.get(cfg.name, cfg.num_symbols)
        self.vocab_size = 2 + symbols
        # the final answer: the last `final_len` targets (quadratic: step 6), scored as `final_exact`
        self.final_len = STEP_CHARS if cfg.name == "quadratic" else None
        self.segments, self.segment_len = cfg.segments, cfg.segment_len
        self.pad_front = cfg.pad_front  # the model hides these leading tokens from attention
        sizes = {"train": cfg.train_size, "valid": cfg.valid_size, "test": cfg.test_size}
        self.splits: dict[str, Batch] = {}
        for split in splits:
            size = sizes[split]
            gen = torch.Generator().manual_seed(cfg.data_seed * 1000 + SPLIT_SEEDS[split])
            seq, mask = make_sequences(cfg, size, gen)
            inputs = seq[:, :-1].clone()
            if cfg.pad_end:  # the answer is never an input: what follows it is padding too
                inputs[:, -cfg.pad_end :] = PAD
            shape = (size, self.segments, self.segment_len)
            batch = Batch(inputs.reshape(shape), seq[:, 1:].reshape(shape), mask.reshape(shape), self.pad_front)
            self.splits[split] = batch.to(torch.device(device))

    def train_batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Batch]:
        """Endless shuffled epochs; the order depends on (seed, epoch) only, so a resumed run sees the same."""
        data = self.splits["train"]
        size = data.inputs.shape[0]
        per_epoch = max(size // batch_size, 1)
        epoch, offset = divmod(start_step, per_epoch)
        while True:
            perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            perm = perm.to(data.inputs.device)
            for i in range(offset, per_epoch):
                yield data.take(perm[i * batch_size : (i + 1) * batch_size])
            epoch, offset = epoch + 1, 0

    def batch_at(self, step: int, batch_size: int, seed: int, gen: torch.Generator | None = None) -> Batch:
        """A training batch drawn by (seed, step) alone (the curriculum's stages): rows of the training split, by
        `gen` if given (seeded by the caller from (seed, step))."""
        data = self.splits["train"]
        gen = gen or torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, data.inputs.shape[0], (batch_size,), generator=gen)
        return data.take(idx.to(data.inputs.device))

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        data = self.splits[split]
        for i in range(0, data.inputs.shape[0], batch_size):
            yield data.rows(i, i + batch_size)

    def token_name(self, token: int) -> str:
        """A token as the figures label it: `_` padding, `>` the start (`?` in retrieval), then the task's symbols
        (digits for copy and reverse, letters as keys and digits as values in retrieval, characters in quadratic)."""
        if token in (PAD, START):
            return "_" if token == PAD else ("?" if self.name == "retrieval" else ">")
        if self.name == "retrieval":
            i = token - 2
            return chr(ord("a") + i) if i < NUM_KEYS else str(i - NUM_KEYS)
        if self.name == "quadratic":
            return ALPHABET[token - 2].replace(" ", "·")
        return str(token - 2)

    def carried_in(self, step: int, batch_size: int, carried: StreamState) -> StreamState:
        """The stream state a training batch starts from: fresh examples start fresh."""
        return StreamState()

    @torch.no_grad()
    def evaluate(
        self,
        model: RecurrentModel,
        split: str,
        batch_size: int,
        autocast,
        reset_memory: bool = False,
        mem_len: int | None = None,
    ):
        """Loss and accuracy on the answer tokens: greedy across segments (`acc`, the paper's metric),
        teacher-forced (`acc_tf`), and whole-answer exact match of the greedy output (`exact`); with a final
        answer at the end of a longer one (quadratic: step 6) also its exact match (`final_exact`).
        `reset_memory`: the memory-reset control; `mem_len`: a Transformer-XL cache other than the trained one
        (`RecurrentModel.initial_state`; rmt-bench-eval --mem-len)."""
        nll = correct = correct_tf = tokens = exact = final_exact = examples = 0.0
        for batch in self.eval_batches(split, batch_size):
            mask = batch.loss_mask
            # segments before the first answer are the same teacher-forced and greedy, and never scored: run
            # them once, for the state they hand on (models that carry nothing skip them)
            answered = mask.flatten(2).any(2).any(0).nonzero()
            first = int(answered[0]) if len(answered) else 0
            state = model.initial_state(mem_len=mem_len, reset_memory=reset_memory, pad=self.pad_front)
            with autocast():
                if first and (model.cfg.carries_state or self.pad_front):  # its state, or its padding
                    _, state = model(batch.inputs[:, :first], state)
                rest, _ = model(batch.inputs[:, first:], state)
                preds, _ = generate_greedy(model, batch.inputs[:, first:], mask[:, first:], state)
                logits = model.head.logits(rest[mask[:, first:]]).float()
            preds = torch.cat([batch.targets[:, :first], preds], 1)  # (B, S, n)
            nll += torch.nn.functional.cross_entropy(logits, batch.targets[mask], reduction="sum").item()
            correct_tf += (logits.argmax(-1) == batch.targets[mask]).sum().item()
            hits = answer_hits(preds, batch.targets, mask, self.final_len)
            correct, exact, final_exact = correct + hits[0], exact + hits[1], final_exact + hits[2]
            tokens += mask.sum().item()
            examples += mask.shape[0]
        out = {"loss": nll / tokens, "acc": correct / tokens, "acc_tf": correct_tf / tokens, "exact": exact / examples}
        return out | ({"final_exact": final_exact / examples} if self.final_len else {})


def answer_hits(preds: Tensor, targets: Tensor, mask: Tensor, final_len: int | None) -> tuple[int, int, int]:
    """Greedy predictions against the targets, (B, S, n) each -> (answer tokens right, whole answers right,
    final answers right: the last `final_len` targets, 0 when the task has none)."""
    hit = ((preds == targets) | ~mask).flatten(1)
    final = hit[:, -final_len:].all(1).sum().item() if final_len else 0
    return (hit & mask.flatten(1)).sum().item(), hit.all(1).sum().item(), final
