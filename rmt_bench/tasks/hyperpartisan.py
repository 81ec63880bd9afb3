"""Table 3: long-document classification, Hyperpartisan news by article (SemEval 2019 task 4), F1.

Data: `task.data_dir` holds `train.jsonl`, `valid.jsonl`, `test.jsonl`, one article per line as
`{"text": ..., "label": 0 | 1}` (1: hyperpartisan), as `scripts/prepare_data.py hyperpartisan` writes them from the
official files and Longformer's split (516 / 64 / 65 articles, the split the paper's baselines used).

An example: the article in the wrapped model's tokens (`task.tokenizer`, by default the model's own), without its
special tokens, cut to `segments x segment_len - 1` tokens or padded after its end with the tokenizer's pad token,
then one closing token (the tokenizer's [SEP] / </s> / EOS); the target of that last position is the class, two
tokens added after the tokenizer's vocabulary. So the class is "the answer" as in every task here, read where the
other tasks read theirs (for an encoder, from [CLS] of the last segment: models/hf.py), and the loop, the
checkpoints and the memory-reset control are the shared ones. Padding is attended to, as in the plain
fine-tuning scripts that pad to a fixed length without a per-example mask (one mask for all rows here).

Shapes: N articles, S segments, n segment_len.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rmt_bench.config import ClassifyTaskConfig, ConfigError
from rmt_bench.tasks.algorithmic import AlgorithmicTask, Batch

SPLIT_FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}
CLASSES = ("not hyperpartisan", "hyperpartisan")


def load_tokenizer(name: str):
    """The tokenizer of a Hub name or a directory; one line when it is not there (offline: the cache only)."""
    from rmt_bench.models.hf import load_pretrained

    return load_pretrained(name, "tokenizer", key="task.tokenizer")


def read_split(data_dir: Path, split: str) -> tuple[list[str], list[int]]:
    """-> the split's texts and labels (0 / 1); one line for a missing file or a malformed record."""
    path = data_dir / SPLIT_FILES[split]
    if not path.is_file():
        raise ConfigError("task.data_dir", f"{data_dir} has no {SPLIT_FILES[split]} (train.jsonl, valid.jsonl and "
                          "test.jsonl; scripts/prepare_data.py hyperpartisan writes them)")  # fmt: skip
    texts, labels = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            label = record["label"]
            label = {"true": 1, "false": 0}.get(str(label).lower(), label)
            texts.append(str(record["text"]))
            labels.append(int(label))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError("task.data_dir", f'{path}:{i}: expected {{"text": ..., "label": 0 or 1}}') from None
        if labels[-1] not in (0, 1):
            raise ConfigError("task.data_dir", f"{path}:{i}: label {label!r}; expected 0 or 1 (or true / false)")
    if not texts:
        raise ConfigError("task.data_dir", f"{path} holds no articles")
    return texts, labels


class HyperpartisanTask(AlgorithmicTask):
    """Fixed train / valid / test articles on the algorithmic tasks' machinery (shuffled epochs, `batch_at`);
    `evaluate` adds F1 of the positive class."""

    def __init__(self, cfg: ClassifyTaskConfig, device: torch.device | str = "cpu", splits=("train", "valid", "test")):
        if cfg.data_dir is None:
            files = "{train,valid,test}.jsonl (scripts/prepare_data.py hyperpartisan writes them)"
            raise ConfigError("task.data_dir", f"task hyperpartisan reads local files: task.data_dir=DIR with {files}")
        data_dir = Path(cfg.data_dir).expanduser()
        if not data_dir.is_dir():
            raise ConfigError("task.data_dir", f"{cfg.data_dir} is not a directory")
        self.cfg, self.name, self.metric = cfg, cfg.name, cfg.metric
        texts = {split: read_split(data_dir, split) for split in splits}  # the files first: a missing one is cheap
        tok = load_tokenizer(cfg.tokenizer)
        base = len(tok)
        self.vocab_size = base + len(CLASSES)
        self.labels = torch.arange(base, base + len(CLASSES))  # the class tokens
        self.pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
        self.close_id = next((t for t in (tok.sep_token_id, tok.eos_token_id) if t is not None), self.pad_id)
        self.final_len, self.pad_front = None, 0
        self.segments, self.segment_len = cfg.segments, cfg.segment_len
        self.splits: dict[str, Batch] = {}
        for split, (text, labels) in texts.items():
            ids = tok(text, add_special_tokens=False, truncation=True, max_length=cfg.seq_len - 1)["input_ids"]
            self.splits[split] = self._batch(ids, labels).to(torch.device(device))

    def _batch(self, ids: list[list[int]], labels: list[int]) -> Batch:
        size, total = len(ids), self.cfg.seq_len
        inputs = torch.full((size, total), self.pad_id, dtype=torch.long)
        for row, toks in enumerate(ids):
            inputs[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        inputs[:, -1] = self.close_id
        targets = torch.full((size, total), self.pad_id, dtype=torch.long)
        targets[:, -1] = self.labels[torch.tensor(labels)]
        mask = torch.zeros(size, total, dtype=torch.bool)
        mask[:, -1] = True
        shape = (size, self.segments, self.segment_len)
        return Batch(inputs.view(shape), targets.view(shape), mask.view(shape))

    def token_name(self, token: int) -> str:
        return CLASSES[token - int(self.labels[0])] if token >= int(self.labels[0]) else str(token)

    @torch.no_grad()
    def evaluate(self, model, split: str, batch_size: int, autocast, reset_memory: bool = False, mem_len=None):
        """One pass: loss and accuracy of the one answer token (greedy and teacher-forced are the same here, as is
        the exact match), and F1 of the positive class: predicted positive when the argmax over the vocabulary is
        the hyperpartisan token. `mem_len` is accepted for the evaluation interface (no cache on these models)."""
        nll = right = tp = fp = fn = 0.0
        positive, size = int(self.labels[1]), 0
        for batch in self.eval_batches(split, batch_size):
            state = model.initial_state(mem_len=mem_len, reset_memory=reset_memory)
            with autocast():
                hidden, _ = model(batch.inputs, state)
                logits = model.head.logits(hidden[:, -1, -1]).float()  # the last position of the last segment
            truth, pred = batch.targets[:, -1, -1], logits.argmax(-1)
            nll += torch.nn.functional.cross_entropy(logits, truth, reduction="sum").item()
            right += int((pred == truth).sum())
            tp += int(((pred == positive) & (truth == positive)).sum())
            fp += int(((pred == positive) & (truth != positive)).sum())
            fn += int(((pred != positive) & (truth == positive)).sum())
            size += truth.shape[0]
        acc = right / size
        return {"loss": nll / size, "acc": acc, "acc_tf": acc, "exact": acc, "f1": 2 * tp / (2 * tp + fp + fn or 1)}
