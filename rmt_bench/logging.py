"""One facade over the tqdm bar, `metrics.jsonl` + `summary.json` in the run dir, and W&B.

The local files are written first and never depend on W&B: if wandb fails to start or to log, the run goes
on, says so once on stderr, and keeps every metric in its run dir.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from rmt_bench.config import LoggerConfig, MetricSpec
from rmt_bench.net import reachable

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"  # the resolved run config as the run used it (the fixed step budget included)


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, config: dict, resume: bool = False, metric: MetricSpec | None = None
    ):
        """`metric`: the task's metrics and their directions (W&B keeps the best of each validation metric)."""
        self.cfg, self.metric = cfg, metric
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        self._bar = None
        self._plain, self._shown = False, {}
        self.wandb = None
        self.config, self.resume = config, resume
        self._write_config()
        if cfg.kind == "wandb":
            self._start_wandb(config)

    # --- W&B (never fatal)
    WANDB_ID_FILE = "wandb_id.txt"  # the run's W&B id: resume=true continues the same W&B run
    SERVER_PROBE_SECONDS = 3.0

    def _start_wandb(self, config: dict) -> None:
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE", self.cfg.mode)
            server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
            if mode == "online" and not reachable(server, self.SERVER_PROBE_SECONDS):
                mode = "offline"
                print(f"warning: the W&B server does not answer; logging offline to {self.run_dir / 'wandb'} "
                      "(`wandb sync` uploads it later)", file=sys.stderr)  # fmt: skip
            id_file = self.run_dir / self.WANDB_ID_FILE
            run_id = id_file.read_text().strip() if self.resume and id_file.exists() else None
            model, task = config.get("model", {}), config.get("task", {})
            tags = [t for t in (task.get("name"), model.get("name"), model.get("arch")) if t] + list(self.cfg.tags)
            self.wandb = wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                group=self.cfg.group or task.get("name"),  # the sweep, or the task for single runs
                job_type="train",
                name=self.cfg.name,
                tags=list(dict.fromkeys(tags)),
                config=config,
                dir=str(self.run_dir),
                mode=mode,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(console="wrap", silent=True),
            )
            id_file.write_text(self.wandb.id)
            for key, higher in self.metric.higher_is_better.items() if self.metric else ():
                self.wandb.define_metric(f"val/{key}", summary="max" if higher else "min")
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

    # --- progress: one bar on a terminal; plain lines elsewhere (CI, nohup, SLURM logs)
    PLAIN_EVERY_SECONDS = 30.0

    def start_progress(self, total: int, initial: int = 0) -> None:
        """`total` is the step budget that will stop the run (max_steps, or what max_minutes allows)."""
        self._total, self._start_step, self._t0 = total, initial, time.perf_counter()
        self._last_plain, self._shown = self._t0, {}
        self._plain = not sys.stderr.isatty()
        if not self._plain:
            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")

    def advance(self, loss: float) -> None:
        self._shown["loss"] = loss
        if self._bar is not None:
            self._bar.update(1)
            if self._bar.n % 10 == 0:
                self._bar.set_postfix(self._shown_text(), refresh=False)
        elif self._plain and time.perf_counter() - self._last_plain >= self.PLAIN_EVERY_SECONDS:
            self._plain_line(self._shown.get("step", self._start_step) + 1)

    def _shown_text(self) -> dict:
        return {k: f"{v:.4f}" for k, v in self._shown.items() if k == "loss" or k.startswith("val ")}

    def _plain_line(self, step: int) -> None:
        """`step 250/2000 | loss 1.2345 | lr 2.0e-03 | 9800 tok/s | val acc 0.5120 | ETA 3.2 min`"""
        elapsed, done = time.perf_counter() - self._t0, max(step - self._start_step, 1)
        eta = elapsed / done * max(self._total - step, 0) / 60
        parts = [f"step {step}/{self._total}", f"loss {self._shown.get('loss', float('nan')):.4f}"]
        if "lr" in self._shown:
            parts.append(f"lr {self._shown['lr']:.1e}")
        if "tok/s" in self._shown:
            parts.append(f"{self._shown['tok/s']:.0f} tok/s")
        parts += [f"{k} {v:.4f}" for k, v in self._shown.items() if k.startswith("val ")]
        print(" | ".join([*parts, f"ETA {eta:.1f} min"]), file=sys.stderr, flush=True)
        self._last_plain = time.perf_counter()

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._plain = False

    def info(self, message: str) -> None:
        (tqdm.write if self._bar is not None else print)(message, file=sys.stderr)

    # --- metrics
    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step} | {k: _plain(v) for k, v in metrics.items()}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        self._shown["step"] = step
        headline = self.metric.headline if self.metric else "acc"  # what the progress line shows of a validation
        if f"val/{headline}" in metrics:
            self._shown[f"val {headline}"] = metrics[f"val/{headline}"]
        if "train/loss" in metrics:
            self._shown |= {
                "loss": metrics["train/loss"],
                "lr": metrics["train/lr"],
                "tok/s": metrics["train/tokens_per_s"],
            }
            if self._plain:
                self._plain_line(step)
        elif self._bar is not None:
            self._bar.set_postfix(self._shown_text(), refresh=False)
        if self.wandb is not None:
            try:
                self.wandb.log(metrics | self._curves(metrics), step=step)
            except Exception as exc:
                self._wandb_failed("log", exc)

    def _curves(self, metrics: dict) -> dict:
        """A list-valued metric (perplexity by position in the segment, by segment of the document) also as a
        W&B line plot against its index."""
        import wandb

        out = {}
        for key, values in metrics.items():
            if isinstance(values, list) and values and all(isinstance(v, (int, float)) or v is None for v in values):
                table = wandb.Table(data=[[i, v] for i, v in enumerate(values) if v is not None], columns=["i", key])
                out[f"{key}_plot"] = wandb.plot.line(table, "i", key, title=key)
        return out

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
        checkpoint = self.run_dir / "checkpoint.pt"
        if self.wandb is not None and self.cfg.log_checkpoint and checkpoint.exists():
            try:
                import wandb

                artifact = wandb.Artifact(f"checkpoint-{self.wandb.id}", type="model")
                artifact.add_file(str(checkpoint))
                self.wandb.log_artifact(artifact)
            except Exception as exc:
                self._wandb_failed("log the checkpoint", exc)
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=exit_code)
            except Exception as exc:
                self._wandb_failed("finish", exc)


class NullLogger:
    """The logger of a rank other than 0 in multi-process training: rank 0 alone logs and writes files."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
