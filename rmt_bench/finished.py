"""A finished run, opened again: its resolved config (config.json), the task rebuilt (with other settings if
asked) and the model with the weights the run tested (the best validation's). Used by `rmt-bench-inspect` and
`rmt-bench-eval`; no Hydra (the overrides are `key=value` words on the run's own config)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml

from rmt_bench.config import ConfigError, RunConfig, run_config_from_dict
from rmt_bench.errors import CheckpointError
from rmt_bench.job import CHECKPOINT_FILE
from rmt_bench.logging import CONFIG_FILE


def read_config(run_dir: Path) -> dict:
    """config.json of a run directory, or one CheckpointError line."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: not a run directory (no {CONFIG_FILE}; give the directory of a finished run)"
        )
    return json.loads(path.read_text())


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """`task.segments=8`-style words onto a config dict (values parsed as YAML); only `task.*` keys change what
    is evaluated, and a key the run's task does not have is one line."""
    config = copy.deepcopy(config)
    for word in overrides:
        key, sep, value = word.partition("=")
        section, _, leaf = key.partition(".")
        if not sep or section != "task" or not leaf:
            raise ConfigError(key or word, "expected task.KEY=VALUE (another setting of the run's task)")
        if leaf not in config["task"]:
            known = ", ".join(sorted(config["task"]))
            raise ConfigError(key, f"not a key of the run's task {config['task']['name']}; keys: {known}")
        config["task"][leaf] = yaml.safe_load(value)
    return config


def open_run(run_dir: Path, overrides: list[str] = (), device: str = "cpu", weights: str = "best"):
    """-> (RunConfig with the overrides, the task built at that setting, the model with the tested weights, eval
    mode). The task's name cannot change: weights of one task do not read another's vocabulary. weights="final":
    the weights of the run's last step instead of its best validation's (the tested ones)."""
    from rmt_bench.models import build_model, check_segments
    from rmt_bench.tasks import build_task

    saved = read_config(run_dir)
    data = apply_overrides(saved, list(overrides))
    if data["task"]["name"] != saved["task"]["name"]:
        raise ConfigError("task.name", f"the run was trained on {saved['task']['name']}; its weights read only that")
    cfg: RunConfig = run_config_from_dict(data)
    task = build_task(cfg.task, device)
    model = build_model(cfg.model, task.vocab_size, task.pad_front)
    check_segments(model, cfg.task.segment_len, getattr(cfg.task, "eval_segment_len", None))
    load_weights(model, run_dir, weights, f"the model of {CONFIG_FILE}")
    return cfg, task, model.to(torch.device(device)).eval()


def load_weights(model: torch.nn.Module, run_dir: Path, weights: str = "best", what: str = "this model") -> None:
    """The run's tested weights (its best validation's; weights="final": its last step's) into `model`, or one
    CheckpointError line: no checkpoint, or weights of another shape."""
    from rmt_bench.train.checkpoint import read_checkpoint

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {CHECKPOINT_FILE} (the run did not checkpoint)")
    payload = read_checkpoint(path)
    try:
        model.load_state_dict(payload["model"] if weights == "final" else payload.get("best_model") or payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {what} ({str(exc).splitlines()[0]})") from exc
