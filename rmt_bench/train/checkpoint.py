"""Atomic, self-describing checkpoints: a crash mid-write never leaves a half-written file where the last good one
was, and every checkpoint carries the resolved config and package version it was trained with.

A checkpoint holds the model, the optimiser, the train state (step, budget, schedule, best validation, the
current logging window), the best-validation weights, the RNG states, and for language-modelling streams the
state carried from batch to batch (memory, cache, BPTT history), so that a resumed run continues bit for bit.
It loads with `weights_only=True`: tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from pathlib import Path

import torch

from rmt_bench import __version__
from rmt_bench.config import ConfigError
from rmt_bench.errors import CheckpointError
from rmt_bench.models import SegmentState

# keys that may differ between a checkpoint and the run that resumes it: budgets, evaluation, logging, places
RESUMABLE_CHANGES = (
    "resume", "scale", "logger.", "trainer.device", "trainer.num_threads", "trainer.max_steps", "trainer.max_minutes",
    "trainer.early_stop_acc", "trainer.memory_reset_control", "trainer.eval_every", "trainer.eval_batch_size",
    "trainer.log_every", "task.data_dir", "task.cache_dir", "task.valid_size", "task.test_size",
    "task.eval_segment_len", "task.eval_mem_len", "task.max_eval_tokens",
)  # fmt: skip


def _state_to_dict(state: SegmentState | None) -> dict | None:
    if state is None:
        return None
    return {"memory": state.memory, "cache": state.cache, "pad": state.pad, "cache_hidden": list(state.cache_hidden)}


def _state_from_dict(data: dict | None, device) -> SegmentState | None:
    if data is None:
        return None
    memory = None if data["memory"] is None else data["memory"].to(device)
    cache = None if data["cache"] is None else [c.to(device) for c in data["cache"]]
    return SegmentState(memory, cache, data["pad"], tuple(data["cache_hidden"]))


def carried_to_payload(carried: tuple) -> dict:
    """(state, BPTT history) handed from batch to batch -> plain tensors and lists."""
    state, history = carried
    return {"state": _state_to_dict(state), "history": [(t, _state_to_dict(s)) for t, s in history]}


def carried_from_payload(data: dict | None, device) -> tuple:
    if not data:
        return None, []
    history = [(t.to(device), _state_from_dict(s, device)) for t, s in data["history"]]
    return _state_from_dict(data["state"], device), history


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state,
    best_weights: dict | None = None,
    carried: tuple = (None, []),
    run_config: dict | None = None,
    other_ranks: list[dict] | None = None,
) -> None:
    """Writes the checkpoint atomically; refuses (CheckpointError) weights that are not finite, so the last good
    checkpoint is never replaced by a diverged one. `other_ranks`: in multi-process training, ranks 1.. as
    `rank_payload` gives them (their random streams and carried stream state; rank 0's are the usual fields)."""
    if not weights_finite(model):
        raise CheckpointError(f"{path}: not overwritten, the model's weights are not finite (the run diverged)")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    payload = {
        "format": 2,
        "version": __version__,
        "config": run_config,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "train_state": dataclasses.asdict(state),
        "best_model": best_weights,
        "carried": carried_to_payload(carried),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "world_size": 1 + len(other_ranks or []),
        "other_ranks": other_ranks or [],
    }
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents (weights_only), or one CheckpointError line naming the file."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not an rmt-bench checkpoint: not a torch.save archive (truncated or another file)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is refused: it holds Python objects besides tensors and plain values (checkpoints load with "
            "weights_only=True; this one was not written by rmt-bench)"
        ) from exc
    except Exception as exc:  # torch raises many kinds for a damaged archive
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path} is not a readable rmt-bench checkpoint ({type(exc).__name__}: {first})") from exc
    if not isinstance(payload, dict) or "model" not in payload or "train_state" not in payload:
        raise CheckpointError(f"{path} is not an rmt-bench checkpoint (no model or train state in it)")
    return payload


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(saved: dict | None, current: dict) -> list[str]:
    """Keys whose values differ between the checkpoint's config and this run's, other than the ones a resume may
    change (budgets, evaluation, logging, paths) -> `key old -> new` strings."""
    if not saved:
        return []
    old, new = _flat(saved), _flat(current)
    keys = sorted(set(old) | set(new))
    return [
        f"{k} {old.get(k)} -> {new.get(k)}"
        for k in keys
        if old.get(k) != new.get(k) and not any(k == c or k.startswith(c) for c in RESUMABLE_CHANGES)
    ]


def rank_payload(carried: tuple) -> dict:
    """What a checkpoint keeps of one process in multi-process training: its random stream and carried state."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None  # this process's GPU
    return {"rng": torch.get_rng_state(), "cuda_rng": cuda, "carried": carried_to_payload(carried)}


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state,
    run_config: dict | None = None,
    rank: int = 0,
    world: int = 1,
):
    """Restore model, optimiser and RNG in place; returns the saved train state (same type as `state`), the
    best-validation weights, the carried stream state and a warning line (or None). A checkpoint trained with
    another model, task, seed or trajectory-changing trainer key is refused with one line naming the keys
    (ConfigError `resume`). Rank `rank` of `world` processes takes its own random stream and carried state; with
    another number of processes than the checkpoint's, the weights, optimiser, schedule and data order continue,
    the per-process random streams and carried stream state start afresh, and the warning says so."""
    payload = read_checkpoint(path)
    changed = config_changes(payload.get("config"), run_config or {})
    if changed and run_config is not None:
        raise ConfigError(
            "resume",
            f"{path} was trained with another config ({'; '.join(changed)}); resume with the same values or start "
            "a new run (budgets, evaluation and logging keys may change)",
        )
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except Exception as exc:
        raise CheckpointError(f"{path} does not fit this model ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    device = next(model.parameters()).device
    saved_world, warning = payload.get("world_size", 1), None
    if saved_world != world:
        warning = (
            f"warning: resume: {path} was written by {saved_world} process(es), this run has {world}: the weights, "
            "optimiser, schedule and data order continue; each process's random stream (dropout) and carried "
            "memory / cache start afresh, so the run is not bit for bit an uninterrupted one"
        )
        carried = (None, [])
    elif rank == 0:
        torch.set_rng_state(payload["rng"])
        if payload.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        carried = carried_from_payload(payload.get("carried"), device)
    else:
        own = payload["other_ranks"][rank - 1]
        torch.set_rng_state(own["rng"])
        if own.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(own["cuda_rng"])
        carried = carried_from_payload(own["carried"], device)
    best = payload.get("best_model") or model.state_dict()
    return type(state)(**payload["train_state"]), best, carried, warning
