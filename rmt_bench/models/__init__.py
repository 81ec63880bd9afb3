"""Models: one backbone (`backbone.py`) and one segment loop (`recurrence.py`) for all five variants."""

from __future__ import annotations

from rmt_bench.config import ConfigError, ModelConfig
from rmt_bench.models.recurrence import RecurrentModel, SegmentState, StreamState, generate_greedy, train_segments

__all__ = [
    "RecurrentModel",
    "SegmentState",
    "StreamState",
    "build_model",
    "check_segments",
    "generate_greedy",
    "train_segments",
]


def build_model(cfg: ModelConfig, vocab_size: int, pad_front: int = 0) -> RecurrentModel:
    """The model for `cfg` on a task whose vocabulary has `vocab_size` tokens and whose sequences start with
    `pad_front` padding tokens (hidden from attention)."""
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.vocab_size} is smaller than the task's {vocab_size} tokens; use null to take the task's",
        )
    vocab = cfg.vocab_size or vocab_size
    if cfg.adaptive_cutoffs and cfg.adaptive_cutoffs[-1] >= vocab:
        raise ConfigError(
            "model.adaptive_cutoffs",
            f"{cfg.adaptive_cutoffs} must stay below the vocabulary size {vocab}; use [] for a plain softmax",
        )
    model = RecurrentModel(cfg, vocab, pad_front)
    return model


def check_segments(model: RecurrentModel, *segment_lens: int | None) -> None:
    """One line when a segment (memory and special tokens included) does not fit a wrapped model's positions."""
    limit = getattr(model.backbone, "max_positions", None)
    for n in (n for n in segment_lens if n):
        rows = model.segment_rows(n)
        if limit is not None and rows > limit:
            raise ConfigError(
                "task.segment_len",
                f"a segment of {n} tokens takes {rows} positions with its memory (and special tokens) but "
                f"{model.cfg.hf_name} has {limit}; use shorter segments or fewer memory tokens",
            )
