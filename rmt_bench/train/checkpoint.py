"""Atomic, self-describing checkpoints of named stateful parts: a crash mid-write never leaves a half-written file
where the last good one was, and every checkpoint carries the resolved config and package version it was trained
with.

A checkpoint is a mapping of parts by name, each something with `state_dict()` / `load_state_dict()` (a module, an
optimiser, or a `Value` around a plain value its owner keeps): the loop's are the model, the optimiser, the train
state (step, budget, schedule, best validation, the logging window, the curriculum's stage), the best-validation
weights, and per process its random streams and the stream state carried from batch to batch (memory, cache, BPTT
history), so that a resumed run continues bit for bit. A new piece of state is one more part (`loop.Run.parts`);
save and load do not change. It loads with `weights_only=True`: tensors, numbers, strings, lists and dicts only.

Layout: every part under its name, plus `format`, `version`, `config`, `world_size` and `other_ranks` (ranks
1.. of a multi-process run: their own per-process parts). Format 2 (the named fields before parts) has the same
names and loads the same way.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from rmt_bench import __version__
from rmt_bench.config import ConfigError, marked_keys
from rmt_bench.errors import CheckpointError
from rmt_bench.models import SegmentState, StreamState

FORMAT = 3
READABLE_FORMATS = (2, 3)


class Part(Protocol):
    def state_dict(self): ...

    def load_state_dict(self, state) -> None: ...


@dataclass
class Value:
    """A part whose state is a plain value its owner keeps (the train state, the best weights, the carried stream
    state, the random streams): `get` gives it for saving, `put` takes it back on resume."""

    get: Callable[[], object]
    put: Callable[[object], None]

    def state_dict(self):
        return self.get()

    def load_state_dict(self, state) -> None:
        self.put(state)


def random_streams() -> dict[str, Part]:
    """This process's random streams as parts: torch's CPU generator and, with CUDA, this process's GPU's."""
    cuda = torch.cuda.is_available()
    return {
        "rng": Value(torch.get_rng_state, torch.set_rng_state),
        "cuda_rng": Value(
            lambda: torch.cuda.get_rng_state() if cuda else None,
            lambda s: _set_cuda_rng(s) if s is not None and cuda else None,
        ),
    }


def _set_cuda_rng(state) -> None:
    if isinstance(state, (list, tuple)):  # format 2 kept every device's stream for rank 0
        torch.cuda.set_rng_state_all(state)
    else:
        torch.cuda.set_rng_state(state)


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


def stream_to_payload(carried: StreamState) -> dict:
    """The stream state handed from batch to batch -> plain tensors and lists."""
    return {
        "state": _state_to_dict(carried.state),
        "history": [(t, _state_to_dict(s)) for t, s in carried.history],
    }


def stream_from_payload(data: dict | None, device) -> StreamState:
    if not data:
        return StreamState()
    history = [(t.to(device), _state_from_dict(s, device)) for t, s in data["history"]]
    return StreamState(_state_from_dict(data["state"], device), history)


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_checkpoint(
    path: Path, parts: dict[str, Part], config: dict | None = None, other_ranks: list[dict] | None = None
) -> None:
    """Writes every part's state under its name, atomically; refuses (CheckpointError) a `model` part whose weights
    are not finite, so the last good checkpoint is never replaced by a diverged one. `other_ranks`: in
    multi-process training, ranks 1.. as {name: state} of their per-process parts."""
    model = parts.get("model")
    if isinstance(model, torch.nn.Module) and not weights_finite(model):
        raise CheckpointError(f"{path}: not overwritten, the model's weights are not finite (the run diverged)")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    payload = {"format": FORMAT, "version": __version__, "config": config}
    payload |= {name: part.state_dict() for name, part in parts.items()}
    payload |= {"world_size": 1 + len(other_ranks or []), "other_ranks": other_ranks or []}
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
    if payload.get("format", 2) not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} has checkpoint format {payload.get('format')}; this rmt-bench ({__version__}) reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}: resume it with the version that wrote it"
        )
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
    """Keys whose values differ between the checkpoint's config and this run's, other than the ones marked
    resumable (budgets, evaluation, logging, paths: `config.mark`) -> `key old -> new` strings."""
    if not saved:
        return []
    old, new = _flat(saved), _flat(current)
    free = set(marked_keys("resumable", True))
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k) and k not in free]


def load_checkpoint(
    path: Path,
    parts: dict[str, Part],
    rank_parts: dict[str, Part],
    run_config: dict | None = None,
    rank: int = 0,
    world: int = 1,
) -> str | None:
    """Restore `parts` (shared by every process: model, optimiser, train state, best weights) and this process's
    `rank_parts` (random streams, carried stream state) in place, by name. -> a warning line, or None.

    A checkpoint trained with another model, task, seed or trajectory-changing trainer key is refused with one line
    naming the keys (ConfigError `resume`). Rank `rank` of `world` processes takes its own per-process parts; with
    another number of processes than the checkpoint's, those start afresh (the rest continues) and the warning
    says so."""
    payload = read_checkpoint(path)
    changed = config_changes(payload.get("config"), run_config or {})
    if changed and run_config is not None:
        raise ConfigError(
            "resume",
            f"{path} was trained with another config ({'; '.join(changed)}); resume with the same values or start "
            "a new run (budgets, evaluation and logging keys may change)",
        )
    for name, part in parts.items():
        try:
            part.load_state_dict(payload.get(name))
        except Exception as exc:
            first = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise CheckpointError(f"{path} does not fit this run's {name} ({first})") from exc
    saved_world = payload.get("world_size", 1)
    if saved_world != world:
        return (
            f"warning: resume: {path} was written by {saved_world} process(es), this run has {world}: the weights, "
            "optimiser, schedule and data order continue; each process's random stream (dropout) and carried "
            "memory / cache start afresh, so the run is not bit for bit an uninterrupted one"
        )
    own = payload if rank == 0 else payload["other_ranks"][rank - 1]
    for name, part in rank_parts.items():
        part.load_state_dict(own.get(name))
    return None
