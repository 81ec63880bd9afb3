"""Atomic checkpoints: a crash mid-write never leaves a half-written file where the last good one was."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


def save_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state, best_weights: dict | None = None
) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "train_state": dataclasses.asdict(state),
        "best_model": best_weights,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state):
    """Restore model, optimiser and RNG in place; returns the saved train state (same type as `state`) and the
    best-validation weights."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except Exception as exc:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable rmt-bench checkpoint ({type(exc).__name__}: {exc})") from exc
    torch.set_rng_state(payload["rng"])
    if payload.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    return type(state)(**payload["train_state"]), payload.get("best_model") or model.state_dict()
