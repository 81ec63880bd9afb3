"""Language modelling on WikiText-103 (words) or enwik8 (characters), as Transformer-XL reads them.

Sources, in order: `task.data_dir` holding `wiki.{train,valid,test}.tokens` (the official archive's names) or
`{train,valid,test}.txt` (Transformer-XL's layout); else `datasets.load_dataset("Salesforce/wikitext",
"wikitext-103-v1")` through the Hugging Face cache (honours HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).

Vocabulary: whitespace tokens counted on train only, case kept, `<eos>` at the end of every line (empty lines
too), sorted by frequency (adaptive softmax cutoffs rely on it). Each split is encoded once into an int32 `.npy`
in the cache dir, keyed by a hash of the sources, and memory-mapped by every later job (a sweep shares it).

Character level (`level=char`, enwik8 prepared as Transformer-XL's prep_enwik8 does: byte values separated by
spaces, a line per text line): the same reader; each line's end becomes `<eos>`, so newlines are scored, where
Transformer-XL's loader drops them.

Batching (Transformer-XL's ordered iterator): the stream is cut into `batch_size` columns read in order, so memory
and cache carry from one batch to the next.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rmt_bench.config import ConfigError, LMTaskConfig
from rmt_bench.models import RecurrentModel, StreamState
from rmt_bench.net import reachable
from rmt_bench.tasks.algorithmic import Batch

EOS = "<eos>"
DOC_SEGMENTS = 20  # per-document segment indices reported one by one; the last bucket pools the rest


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


SPLITS = ("train", "valid", "test")
LAYOUTS = ({s: f"wiki.{s}.tokens" for s in SPLITS}, {s: f"{s}.txt" for s in SPLITS})
HUB_NAME, HUB_CONFIG = "Salesforce/wikitext", "wikitext-103-v1"
CACHE_VERSION = "1"


class DataMissing(ConfigError):
    pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("RMT_BENCH_CACHE", Path.home() / ".cache" / "rmt-bench"))


# ------------------------------------------------------------------ sources: local files or `datasets`
class LocalSource:
    def __init__(self, data_dir: Path):
        for layout in LAYOUTS:
            if all((data_dir / name).is_file() for name in layout.values()):
                self.files = {s: data_dir / name for s, name in layout.items()}
                return
        names = " or ".join(", ".join(layout.values()) for layout in LAYOUTS)
        raise DataMissing("task.data_dir", f"{data_dir} does not hold {names}")

    def lines(self, split: str) -> Iterator[str]:
        with open(self.files[split], encoding="utf-8") as f:
            yield from f

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split in SPLITS:
            with open(self.files[split], "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()[:16]


class HubSource:
    """The data set through `datasets` and the Hugging Face cache: downloaded into the cache when online (once),
    read from the cache when offline. Without a network the Hub is declared offline before `datasets` loads, so
    a missing data set fails at once instead of after its retries."""

    def __init__(self, name: str, config: str):
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        where = "offline (HF_HUB_OFFLINE) and not in the Hugging Face cache" if offline else ""
        if not offline and not reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
            os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # read before datasets loads
            where = "no network, and not in the Hugging Face cache"
        try:
            import datasets

            datasets.logging.set_verbosity_error()  # the line below says what went wrong, once
            self.data = datasets.load_dataset(name, config)
        except Exception as exc:
            where = where or "not in the Hugging Face cache"
            raise DataMissing(
                "task.data_dir",
                f"no WikiText-103 here: {where} ({type(exc).__name__}) and no "
                f"task.data_dir; either run `python scripts/prepare_data.py wikitext103 <archive.zip> DIR` and pass "
                f"task.data_dir=DIR, or download `{name}` ({config}) into the HF cache while online",
            ) from None

    def lines(self, split: str) -> Iterator[str]:
        split = {"valid": "validation"}.get(split, split)
        for row in self.data[split]:
            yield row["text"]

    def fingerprint(self) -> str:
        return hashlib.sha256("".join(self.data[s]._fingerprint for s in self.data).encode()).hexdigest()[:16]


def open_source(cfg: LMTaskConfig):
    if cfg.data_dir:
        path = Path(cfg.data_dir).expanduser()
        if not path.is_dir():
            raise DataMissing("task.data_dir", f"{path} is not a directory")
        return LocalSource(path)
    return HubSource(HUB_NAME, HUB_CONFIG)


def line_symbols(line: str) -> list[str]:
    return line.split() + [EOS]


def build_vocab(lines: Iterable[str]) -> list[str]:
    """Train-only counts, most frequent first (ties in first-seen order, as Counter.most_common)."""
    counts = Counter()
    for line in lines:
        counts.update(line_symbols(line))
    return [sym for sym, _ in counts.most_common()]


def encode(lines: Iterable[str], index: dict[str, int], unk: int | None, desc: str) -> np.ndarray:
    out: list[int] = []
    for line in tqdm(lines, desc=desc, unit=" lines", disable=None, mininterval=1.0):
        for sym in line_symbols(line):
            idx = index.get(sym, unk)
            if idx is None:
                raise ConfigError(
                    "task", f"symbol {sym!r} of {desc} is not in the train vocabulary and there is no <unk>"
                )
            out.append(idx)
    return np.asarray(out, dtype=np.int32)


def load_corpus(cfg: LMTaskConfig) -> tuple[list[str], dict[str, np.ndarray]]:
    """-> vocabulary and the three splits as int32 arrays, built once and memory-mapped from the cache."""
    source = open_source(cfg)
    key = hashlib.sha256(f"{CACHE_VERSION}:{source.fingerprint()}".encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    folder = cache / f"corpus-{key}"
    vocab_file = folder / "vocab.json"
    if not vocab_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        vocab = build_vocab(
            tqdm(source.lines("train"), desc="counting train", unit=" lines", disable=None, mininterval=1.0)
        )
        index = {sym: i for i, sym in enumerate(vocab)}
        unk = index.get("<unk>")
        for split in SPLITS:
            array = encode(source.lines(split), index, unk, f"encoding {split}")
            tmp = folder / f"{split}.tmp.npy"
            np.save(tmp, array)
            os.replace(tmp, folder / f"{split}.npy")
        tmp = folder / "vocab.tmp.json"
        tmp.write_text(json.dumps(vocab))
        os.replace(tmp, vocab_file)  # written last: its presence means the cache is complete
    vocab = json.loads(vocab_file.read_text())
    return vocab, {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in SPLITS}


# ------------------------------------------------------------------ the task
class LMTask:
    """Ordered LM stream; `Batch` shapes (B, S, n): S consecutive segments of n tokens per column (the task
    interface: tasks/__init__.py)."""

    stream = True
    pad_front = 0  # streams are never padded

    def __init__(self, cfg: LMTaskConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.name = cfg.name
        self.metric = cfg.metric  # perplexity or bits per character, lower is better
        self.device = torch.device(device)
        self.vocab, self.data = load_corpus(cfg)
        self.vocab_size = len(self.vocab)
        self.segments, self.segment_len = cfg.segments, cfg.segment_len
        limits = {"train": cfg.max_train_tokens, "valid": cfg.max_eval_tokens, "test": cfg.max_eval_tokens}
        self.data = {s: a[: limits[s]] if limits[s] else a for s, a in self.data.items()}
        if len(self.data["train"]) < 2:
            raise ConfigError("task.max_train_tokens", "leaves no training data")

    def columns(self, split: str, batch_size: int, key: str = "trainer.eval_batch_size") -> torch.Tensor:
        """The stream cut into `batch_size` contiguous columns: (B, T) int64 on the device."""
        data = self.data[split]
        per_col = len(data) // batch_size
        if per_col < 2:
            raise ConfigError(
                "trainer.batch_size",
                f"{batch_size} columns leave < 2 tokens each of the {split} stream ({len(data)} tokens)",
            )
        cols = torch.from_numpy(np.asarray(data[: per_col * batch_size], dtype=np.int64))
        return cols.view(batch_size, per_col).to(self.device)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max((len(self.data["train"]) // batch_size - 1) // (self.segments * self.segment_len), 1)

    def train_batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Batch]:
        """In stream order, epoch after epoch (the order does not depend on the seed)."""
        cols = self.columns("train", batch_size, "trainer.batch_size")
        span = self.segments * self.segment_len
        per_epoch = self.steps_per_epoch(batch_size)
        if cols.shape[1] - 1 < span:
            raise ConfigError(
                "task.segment_len",
                f"{self.segments} x {self.segment_len} tokens per step exceed the "
                f"{cols.shape[1]} tokens per column of the train stream at batch size {batch_size}",
            )
        step = start_step
        while True:
            i = (step % per_epoch) * span
            yield self._batch(cols, i, self.segments, self.segment_len)
            step += 1

    def eval_batches(self, split: str, batch_size: int, segment_len: int | None = None) -> Iterator[Batch]:
        """The whole stream in order, one segment per batch; the last, shorter segment too."""
        cols = self.columns(split, batch_size)
        n = segment_len or self.cfg.eval_segment_len or self.segment_len
        for i in range(0, cols.shape[1] - 1, n):
            yield self._batch(cols, i, 1, min(n, cols.shape[1] - 1 - i))

    def carried_in(self, step: int, batch_size: int, carried: StreamState) -> StreamState:
        """The stream state a training batch starts from: the previous batch's, reset at each epoch."""
        return StreamState() if step % self.steps_per_epoch(batch_size) == 0 else carried

    def document_starts(self, split: str) -> np.ndarray:
        """Stream positions where a document begins: WikiText's articles open with a level-1 heading line
        (` = Title = `: '=' after a line's end, not followed by '='); the stream's start is one too. Character-level
        streams and corpora without such lines are one document."""
        data = np.asarray(self.data[split])
        starts = [0]
        index = {sym: i for i, sym in enumerate(self.vocab[: 1 << 20])}
        eq, eos = index.get("="), index.get(EOS)
        if self.cfg.level == "word" and eq is not None and eos is not None and len(data) > 2:
            heading = (data[1:-1] == eq) & (data[:-2] == eos) & (data[2:] != eq)
            starts += (np.nonzero(heading)[0] + 1).tolist()
        return np.asarray(sorted(set(starts)), dtype=np.int64)

    @torch.no_grad()
    def evaluate(self, model: RecurrentModel, split: str, batch_size: int, autocast, reset_memory: bool = False):
        """Loss over the whole split carrying memory/cache (a Transformer-XL cache of `task.eval_mem_len`), as
        perplexity (`ppl`) or bits per character (`bpc`); and from the same pass, the same measure per position
        within the segment (`<metric>_by_position`: where memory shows first, at a segment's start) and per segment
        index within a document (`<metric>_by_doc_segment`: the target's distance from its document's start in
        segments, the last entry pooling DOC_SEGMENTS and beyond)."""
        cols = self.columns(split, batch_size)
        per_col, n_eval = cols.shape[1], self.cfg.eval_segment_len or self.segment_len
        starts = torch.from_numpy(self.document_starts(split))
        col_start = torch.arange(batch_size)[:, None] * per_col  # stream position of each column's first token
        by_pos, pos_count = torch.zeros(n_eval, dtype=torch.float64), torch.zeros(n_eval, dtype=torch.float64)
        by_doc, doc_count = torch.zeros(DOC_SEGMENTS + 1, dtype=torch.float64), torch.zeros(DOC_SEGMENTS + 1)
        state = model.initial_state(mem_len=self.cfg.eval_mem_len, reset_memory=reset_memory)
        offset = 0
        for batch in self.eval_batches(split, batch_size):
            n = batch.inputs.shape[2]
            with autocast():
                hidden, state = model(batch.inputs, state)
                nll = model.head.nll(hidden.flatten(0, 2), batch.targets.flatten()).double().view(batch_size, n).cpu()
            by_pos[:n] += nll.sum(0)
            pos_count[:n] += batch_size
            target = col_start + offset + 1 + torch.arange(n)[None, :]  # (B, n) stream positions of the targets
            doc = starts[torch.searchsorted(starts, target, right=True) - 1]
            k = ((target - doc) // n_eval).clamp(max=DOC_SEGMENTS)
            by_doc.index_add_(0, k.flatten(), nll.flatten())
            doc_count.index_add_(0, k.flatten(), torch.ones(k.numel()))
            offset += n
        loss = by_pos.sum().item() / pos_count.sum().item()
        name, measure = ("bpc", lambda x: x / math.log(2)) if self.cfg.level == "char" else ("ppl", _ppl)
        pos = [measure(v) for v in (by_pos / pos_count.clamp(min=1)).tolist()]
        docs = [measure(v) if c else None for v, c in zip((by_doc / doc_count.clamp(min=1)).tolist(), doc_count)]
        return {"loss": loss, name: measure(loss), f"{name}_by_position": pos, f"{name}_by_doc_segment": docs}

    @staticmethod
    def _batch(cols: torch.Tensor, i: int, segments: int, n: int) -> Batch:
        bsz = cols.shape[0]
        x = cols[:, i : i + segments * n].reshape(bsz, segments, n)
        y = cols[:, i + 1 : i + 1 + segments * n].reshape(bsz, segments, n)
        return Batch(x, y, torch.ones_like(x, dtype=torch.bool))
