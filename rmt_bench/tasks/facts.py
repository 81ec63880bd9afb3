"""The follow-up's memorisation tasks ("Scaling Transformer to 1M tokens and beyond with RMT", arXiv 2304.11062):
a bAbI-style fact hidden in distractor text, a question at the end, one of 6 places as the answer.

    memorize   Mary went to the kitchen . <filler ...> where is Mary ?        -> kitchen  (the fact opens the text)
    detect     <filler> Mary went to the kitchen . <filler> where is Mary ?   -> kitchen  (anywhere before the question)
    reason     <filler> Mary went to the kitchen . <filler> John went to the garden . <filler>
               John picked up the milk . <filler> where is the milk ?         -> garden   (the pick-up and its holder's
               place, in any order, at random places; the other person's place is a distractor)

Words are tokens (0 padding, 1 <unk> of the filler, then the facts' words, then the filler's). The filler is real
text from a local corpus (`task.filler_dir`: WikiText layout or any text files, read by the language-modelling
loader, each example a span at a random offset of the split's stream) or, without one, words drawn from a built-in
list with Zipf frequencies. It never contains a word of the facts (compared lower-cased): the facts are the only
place their words occur, so what the model must find is where the fact is, not what it looks like.

The sequence is `segments x segment_len` tokens, the question at its end; the model reads it and predicts the word
after '?' (the loss and the greedy answer at that one position; chance 1/6). Valid and test sets are fixed by
`data_seed`; training examples are drawn afresh from (seed, step). `evaluate_long` streams a sequence of any length
segment by segment (up to millions of tokens), generating each segment when it is needed: memory stays flat.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from rmt_bench.config import ConfigError, FactsTaskConfig, LMTaskConfig
from rmt_bench.models import RecurrentModel
from rmt_bench.tasks.algorithmic import AlgorithmicTask, Batch

PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")  # the 6 answers
PEOPLE = ("Mary", "John", "Sandra", "Daniel")
OBJECTS = ("football", "apple", "milk", "box")
GLUE = ("went", "to", "the", "picked", "up", ".", "where", "is", "?")
FACT_WORDS = (*PLACES, *PEOPLE, *OBJECTS, *GLUE)
PAD, UNK = 0, 1
WORD = {w: 2 + i for i, w in enumerate(FACT_WORDS)}  # the facts' tokens
FILLER_START = 2 + len(FACT_WORDS)
FACT_LEN = 6  # "Mary went to the kitchen ."
SPLIT_SEEDS = {"train": 0, "valid": 1, "test": 2}
# a built-in filler (no corpus given): common English words that are not the facts' words
BUILTIN_WORDS = (
    "of", "and", "a", "in", "that", "it", "was", "for", "on", "as", "with", "his", "he", "be", "at", "by", "i",
    "this", "had", "not", "are", "but", "from", "or", "have", "an", "they", "which", "one", "you", "were", "her",
    "all", "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will", "more", "no", "if",
    "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some",
    "could", "time", "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over",
    "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back",
    "years", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those", "people", "how",
    "too", "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get",
    "here", "between", "both", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last",
    "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take",
    "three", "states", "himself", "few", "house", "use", "during", "without", "again", "place", "american", "around",
    "however", "home", "small", "found", "thought", "part", "general", "high", "upon", "school", "every", "once",
    "end", "thing", "face", "night",
)  # fmt: skip


class FillerSource:
    """Distractor text as filler token ids: a corpus split's stream mapped to the filler vocabulary, or built-in
    words drawn with Zipf frequencies."""

    def __init__(self, cfg: FactsTaskConfig):
        banned = {w.lower() for w in FACT_WORDS}
        if cfg.filler_dir is None:
            words = [w for w in dict.fromkeys(BUILTIN_WORDS) if w not in banned][: cfg.filler_vocab]
            self.words, self.streams, self.mapping = words, None, None
            weights = 1.0 / np.arange(1, len(words) + 1)
            self.zipf = torch.tensor(weights / weights.sum(), dtype=torch.float)
            return
        from rmt_bench.tasks.wikitext import load_corpus

        try:
            vocab, streams = load_corpus(
                LMTaskConfig(name="wikitext103", data_dir=cfg.filler_dir, cache_dir=cfg.cache_dir)
            )
        except ConfigError as exc:  # the loader names its own key: say the one the user gave
            raise ConfigError("task.filler_dir", str(exc).split(": ", 1)[1]) from None
        kept = [w for w in vocab if w.lower() not in banned and w != "<unk>"][: cfg.filler_vocab]
        index = {w: FILLER_START + i for i, w in enumerate(kept)}
        self.words, self.streams = kept, streams
        self.mapping = np.array([index.get(w, UNK) for w in vocab], dtype=np.int64)  # corpus id -> filler token

    @property
    def vocab_size(self) -> int:
        return FILLER_START + len(self.words)

    def spans(self, split: str, size: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """(size, length) filler tokens and, from a corpus, each example's offset in the split's stream (to read on
        from, segment by segment: `more`)."""
        if self.streams is None:
            picks = torch.multinomial(self.zipf, size * length, replacement=True, generator=gen)
            return (picks + FILLER_START).view(size, length), None
        stream = self.streams[split]
        if len(stream) < 2:
            raise ValueError(f"the filler corpus's {split} split is empty")
        offsets = torch.randint(0, len(stream), (size,), generator=gen)
        return self.more(split, offsets, 0, length), offsets

    def more(self, split: str, offsets: Tensor, start: int, length: int) -> Tensor:
        """Corpus filler: `length` tokens from `start` past each example's offset (the stream wraps around)."""
        stream = self.streams[split]
        idx = (offsets.numpy()[:, None] + start + np.arange(length)[None, :]) % len(stream)
        return torch.from_numpy(self.mapping[np.asarray(stream[idx.ravel()], dtype=np.int64)].reshape(idx.shape))


def plan(cfg: FactsTaskConfig, size: int, gen: torch.Generator) -> dict:
    """The facts of `size` examples: their tokens (size, k, 6), their start positions (size, k), the question
    (size, q) and the answer (size,), for a sequence of cfg.seq_len tokens."""
    total, person = cfg.seq_len, torch.randint(0, len(PEOPLE), (size,), generator=gen)

    def word(names: tuple[str, ...], i: Tensor) -> Tensor:  # (size,) tokens of names[i]
        return torch.tensor([WORD[n] for n in names])[i]

    def glue(*words: str) -> Tensor:  # (size, len(words))
        return torch.tensor([WORD[x] for x in words]).expand(size, -1)

    def went(p: Tensor, place: Tensor) -> Tensor:  # (size, 6): "Mary went to the kitchen ."
        return torch.cat(
            [word(PEOPLE, p)[:, None], glue("went", "to", "the"), word(PLACES, place)[:, None], glue(".")], 1
        )

    place = torch.randint(0, len(PLACES), (size,), generator=gen)
    if cfg.variant != "reason":
        question = torch.cat([glue("where", "is"), word(PEOPLE, person)[:, None], glue("?")], 1)
        room = total - question.shape[1] - FACT_LEN  # where a fact may start
        start = torch.zeros(size, 1, dtype=torch.long) if cfg.variant == "memorize" else (
            torch.randint(0, room + 1, (size, 1), generator=gen))  # fmt: skip
        return {"facts": went(person, place)[:, None], "starts": start, "question": question,
                "answer": word(PLACES, place)}  # fmt: skip
    other = (person + 1 + torch.randint(0, len(PEOPLE) - 1, (size,), generator=gen)) % len(PEOPLE)
    other_place = (place + 1 + torch.randint(0, len(PLACES) - 1, (size,), generator=gen)) % len(PLACES)
    obj = torch.randint(0, len(OBJECTS), (size,), generator=gen)
    holder_is_first = torch.rand(size, generator=gen) < 0.5
    holder = torch.where(holder_is_first, person, other)
    pick = torch.cat([word(PEOPLE, holder)[:, None], glue("picked", "up", "the"), word(OBJECTS, obj)[:, None],
                      glue(".")], 1)  # fmt: skip
    facts = torch.stack([went(person, place), went(other, other_place), pick], 1)  # (size, 3, 6)
    facts = facts.gather(1, torch.rand(size, 3, generator=gen).argsort(1)[:, :, None].expand(-1, -1, FACT_LEN))
    question = torch.cat([glue("where", "is", "the"), word(OBJECTS, obj)[:, None], glue("?")], 1)
    room = total - question.shape[1] - 3 * FACT_LEN  # three non-overlapping facts: sorted draws plus offsets
    starts = torch.randint(0, room + 1, (size, 3), generator=gen).sort(1).values + torch.arange(3) * FACT_LEN
    answer = word(PLACES, torch.where(holder_is_first, place, other_place))
    return {"facts": facts, "starts": starts, "question": question, "answer": answer}


def fact_order(facts: dict) -> list[str]:
    """The reason variant's three facts in the order they occur, one label per example: H the holder's "went to",
    O the other person's, P the pick-up (e.g. "H O P": both moves before the pick-up). The facts of a plan are
    stored in position order (their starts are sorted)."""
    tokens = facts["facts"]  # (size, 3, FACT_LEN)
    pick = tokens[:, :, 1] == WORD["picked"]
    holder = tokens[:, :, 0][pick]  # (size,) the person who picked the object up
    labels = torch.where(pick, 2, torch.where(tokens[:, :, 0] == holder[:, None], 0, 1))
    return [" ".join("HOP"[i] for i in row) for row in labels.tolist()]


def place_facts(tokens: Tensor, facts: dict, offset: int = 0) -> None:
    """Writes the facts (and the question, if it falls here) into `tokens` (B, L), which holds positions
    offset .. offset + L - 1 of the sequence."""
    length = tokens.shape[1]
    for k in range(facts["starts"].shape[1]):
        for j in range(FACT_LEN):
            pos = facts["starts"][:, k] + j - offset
            inside = (pos >= 0) & (pos < length)
            rows = inside.nonzero().flatten()
            tokens[rows, pos[rows]] = facts["facts"][rows, k, j]


def make_examples(cfg: FactsTaskConfig, filler: FillerSource, split: str, size: int, gen: torch.Generator):
    """-> sequences (size, seq_len + 1): filler, the facts placed, the question, the answer; the answer mask."""
    facts = plan(cfg, size, gen)
    q = facts["question"].shape[1]
    tokens, _ = filler.spans(split, size, cfg.seq_len - q, gen)
    place_facts(tokens, facts)
    seq = torch.cat([tokens, facts["question"], facts["answer"][:, None]], 1)
    mask = torch.zeros(size, cfg.seq_len, dtype=torch.bool)
    mask[:, -1] = True
    return seq, mask


class FactsTask(AlgorithmicTask):
    """The facts tasks on the algorithmic tasks' machinery: fixed valid / test splits, greedy evaluation of the
    one answer token (`AlgorithmicTask.evaluate`); training batches drawn afresh from (seed, step)."""

    def __init__(self, cfg: FactsTaskConfig, device: torch.device | str = "cpu", splits=("train", "valid", "test")):
        self.cfg, self.name, self.metric = cfg, cfg.name, cfg.metric
        self.filler = FillerSource(cfg)
        self.vocab_size = self.filler.vocab_size
        self.final_len, self.pad_front = None, 0
        self.segments, self.segment_len = cfg.segments, cfg.segment_len
        self.device = torch.device(device)
        self.splits: dict[str, Batch] = {}
        for split in (s for s in splits if s != "train"):
            size = cfg.valid_size if split == "valid" else cfg.test_size
            self.splits[split] = self._batch(split, size, self._generator(split))

    def _generator(self, split: str, step: int = 0, seed: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(
            self.cfg.data_seed * 1000 + SPLIT_SEEDS[split] + 7919 * (seed * 1_000_003 + step)
        )

    def _batch(self, split: str, size: int, gen: torch.Generator) -> Batch:
        seq, mask = make_examples(self.cfg, self.filler, split, size, gen)
        shape = (size, self.segments, self.segment_len)
        return Batch(seq[:, :-1].reshape(shape), seq[:, 1:].reshape(shape), mask.reshape(shape)).to(self.device)

    def batch_at(self, step: int, batch_size: int, seed: int, gen: torch.Generator | None = None) -> Batch:
        """The training batch of `step`: fresh examples from (seed, step), so a resumed run draws the same."""
        return self._batch("train", batch_size, self._generator("train", step + 1, seed))

    def train_batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Batch]:
        step = start_step
        while True:
            yield self.batch_at(step, batch_size, seed)
            step += 1

    def token_name(self, token: int) -> str:
        if token < FILLER_START:
            return ("_", "<unk>", *FACT_WORDS)[token]
        return self.filler.words[token - FILLER_START]

    @torch.no_grad()
    def evaluate_long(self, model: RecurrentModel, segments: int, examples: int, batch_size: int, autocast) -> dict:
        """Accuracy at `segments` segments of the task's length (any number: millions of tokens), streamed: each
        segment's tokens are made when it runs and the memory carried, so memory stays flat. The facts and the
        question are the test split's plan at that length (seeded by data_seed). -> accuracy, its 95% (Wilson)
        interval, examples, tokens per example, seconds per example, peak memory (MB); and by answer: the accuracy
        per place (`acc_by_answer`), how many places are answered right at least 90% of the time (`answers_held`:
        far beyond the training length a memory keeps some places and maps the others onto them, docs/RESULTS.md)
        and how often each place is predicted (`predicted`, "other" for a token that is no place); for reason, the
        accuracy and the examples by the order of the three facts (`acc_by_order`, `examples_by_order`: fact_order's
        labels, e.g. "H O P" when both moves come before the pick-up)."""
        cfg = replace(self.cfg, segments=segments)
        n, total = cfg.segment_len, cfg.seq_len
        start = time.perf_counter()
        place_of = torch.full((self.vocab_size,), len(PLACES))  # token -> place index; 6: no place ("other")
        place_of[[WORD[p] for p in PLACES]] = torch.arange(len(PLACES))
        right_by, count_by, predicted = (torch.zeros(len(PLACES) + 1, dtype=torch.long) for _ in range(3))
        by_order: dict[str, list[int]] = {}  # reason: the facts' order -> [right, examples]
        gen = torch.Generator().manual_seed(self.cfg.data_seed * 1000 + SPLIT_SEEDS["test"] + 104729 * segments)
        for lo in range(0, examples, batch_size):
            size = min(batch_size, examples - lo)
            facts = plan(cfg, size, gen)
            q = facts["question"].shape[1]
            first, offsets = self.filler.spans("test", size, min(n, total - q), gen)
            state = model.initial_state()
            for s in range(segments):
                length = n - (q if s == segments - 1 else 0)
                if s == 0:
                    tokens = first[:, :length]
                elif offsets is None:
                    tokens, _ = self.filler.spans("test", size, length, gen)
                else:
                    tokens = self.filler.more("test", offsets, s * n, length)
                tokens = tokens.clone()
                place_facts(tokens, facts, offset=s * n)
                if s == segments - 1:
                    tokens = torch.cat([tokens, facts["question"]], 1)
                with autocast():
                    hidden, state = model.segment(tokens.to(self.device), state, write=s < segments - 1)
                    if s == segments - 1:
                        pred = model.head.logits(hidden[:, -1]).argmax(-1).cpu()
            answer = place_of[facts["answer"]]  # (size,) the answer's place index
            right_by += answer[pred == facts["answer"]].bincount(minlength=len(PLACES) + 1)
            count_by += answer.bincount(minlength=len(PLACES) + 1)
            predicted += place_of[pred].bincount(minlength=len(PLACES) + 1)
            if cfg.variant == "reason":
                for order, ok in zip(fact_order(facts), (pred == facts["answer"]).tolist()):
                    tally = by_order.setdefault(order, [0, 0])
                    tally[0], tally[1] = tally[0] + ok, tally[1] + 1
        acc, z = int(right_by.sum()) / examples, 1.96  # every answer is a place: right_by counts them all
        centre = (acc + z * z / (2 * examples)) / (1 + z * z / examples)
        half = z * math.sqrt(acc * (1 - acc) / examples + z * z / (4 * examples**2)) / (1 + z * z / examples)
        by_answer = {p: r / c for p, r, c in zip(PLACES, right_by.tolist(), count_by.tolist()) if c}
        return {"acc": acc, "ci95": [centre - half, centre + half], "examples": examples, "tokens": total,
                "segments": segments, "seconds_per_example": (time.perf_counter() - start) / examples,
                "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "acc_by_answer": by_answer, "answers_held": sum(a >= 0.9 for a in by_answer.values()),
                "predicted": dict(zip((*PLACES, "other"), predicted.tolist()))} | ({
                "acc_by_order": {o: r / c for o, (r, c) in sorted(by_order.items())},
                "examples_by_order": {o: c for o, (_, c) in sorted(by_order.items())}} if by_order else {})  # fmt: skip
