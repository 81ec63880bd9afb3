"""One facade over the tqdm bar, `metrics.jsonl` + `summary.json` in the run dir, and W&B.

The local files are written first and never depend on W&B: if wandb fails to start or to log, the run goes
on, says so once on stderr, and keeps every metric in its run dir.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from rmt_bench.config import LoggerConfig

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"  # the resolved run config as the run used it (the fixed step budget included)


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        self._bar = None
        self.wandb = None
        self.config = config
        self._write_config()
        if cfg.kind == "wandb":
            self._start_wandb(config)

    # --- W&B (never fatal)
    def _start_wandb(self, config: dict) -> None:
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE", self.cfg.mode)
            self.wandb = wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                group=self.cfg.group,
                name=self.cfg.name,
                tags=self.cfg.tags or None,
                config=config,
                dir=str(self.run_dir),
                mode=mode,
                settings=wandb.Settings(console="off", silent=True),
            )
            self.wandb.define_metric("val/acc", summary="max")
            self.wandb.define_metric("val/loss", summary="min")
        except Exception as exc:  # offline W&B needs no network; anything else is reported, not fatal
            self._wandb_failed("start", exc)

    def _wandb_failed(self, what: str, exc: Exception) -> None:
        first = (str(exc).strip().splitlines() or [""])[0]  # one line: wandb's errors can span many
        print(f"warning: wandb failed to {what} ({type(exc).__name__}: {first}); metrics stay in {self.run_dir}",
              file=sys.stderr)  # fmt: skip
        self.wandb = None

    # --- the resolved config
    def _write_config(self) -> None:
        (self.run_dir / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, default=str))

    def update_config(self, updates: dict) -> None:
        """Values fixed during the run (e.g. `{"trainer": {"max_steps": 1800}}`) into config.json and W&B."""
        for section, values in updates.items():
            if isinstance(self.config.get(section), dict):
                self.config[section] = self.config[section] | values
            else:
                self.config[section] = values
        self._write_config()
        if self.wandb is not None:
            try:
                self.wandb.config.update({k: self.config[k] for k in updates}, allow_val_change=True)
            except Exception as exc:
                self._wandb_failed("update the config", exc)

    # --- progress bar (quiet when stderr is not a terminal)
    def start_progress(self, total: int, initial: int = 0) -> None:
        self._bar = tqdm(total=total, initial=initial, disable=None, dynamic_ncols=True, desc="train")

    def advance(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if self._bar.n % 10 == 0:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def info(self, message: str) -> None:
        (tqdm.write if self._bar is not None else print)(message, file=sys.stderr)

    # --- metrics
    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step} | {k: _plain(v) for k, v in metrics.items()}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if "val/acc" in metrics and self._bar is not None:
            self._bar.set_postfix(val_acc=f"{metrics['val/acc']:.3f}", refresh=False)
        if self.wandb is not None:
            try:
                self.wandb.log(metrics, step=step)
            except Exception as exc:
                self._wandb_failed("log", exc)

    def truncate(self, step: int) -> None:
        """A resumed run: drop the records logged after `step` (its checkpoint), which it will log again."""
        self._metrics.close()
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines() if self.metrics_path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finish)

    def summary(self, summary: dict) -> None:
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps({k: _plain(v) for k, v in summary.items()}, indent=2))
        if self.wandb is not None:
            try:
                for key, value in summary.items():
                    if isinstance(value, (int, float, str)):
                        self.wandb.summary[key] = value
            except Exception as exc:
                self._wandb_failed("write the summary", exc)

    def finish(self, exit_code: int = 0) -> None:
        self.close_progress()
        self._metrics.close()
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=exit_code)
            except Exception as exc:
                self._wandb_failed("finish", exc)
