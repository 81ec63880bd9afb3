"""`rmt-bench`: the Hydra entry point. With overrides.py (the command line before Hydra) the only modules that
import hydra or omegaconf.

It composes `configs/`, turns the DictConfig into typed dataclasses (`config.py`), and runs one job (`job.py`); a
multirun (`-m`) is the same job repeated by Hydra's launcher. Mistakes in the command line or the config end
in one line `error: <key>: <what is allowed>` and exit status 2 (a traceback with HYDRA_FULL_ERROR=1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rmt_bench import failures, overrides
from rmt_bench.config import (
    CONFIG_DIR,
    ConfigError,
    RunConfig,
    from_dict,
    run_config_from_dict,
    task_config_class,
)
from rmt_bench.errors import CheckpointError, RunStopped
from rmt_bench.job import run, summary_line


def swept_dirname(job_overrides) -> str:
    """A multirun job's directory name: `key=value` of the keys the command line sweeps (`model=xl,rmt`,
    `mem=range(2,8,2)`), not every override, with `/` replaced so that it stays one path component; without a
    sweep on the command line (or in a launcher's other process, whose argv is not the sweep's) every override."""
    swept = overrides.swept_keys(sys.argv[1:])
    pairs = [str(o) for o in job_overrides if not swept or str(o).split("=", 1)[0].lstrip("+~") in swept]
    return ",".join(pairs).replace("/", "_")[:200] or "job"


def sweep_direction(task: DictConfig) -> str:
    """configs/hydra/sweeper/tune.yaml: the direction of the task's headline metric (its `MetricSpec`)."""
    data = OmegaConf.to_container(task, resolve=True)
    return from_dict(task_config_class(data.get("name")), data, "task").metric.direction


OmegaConf.register_new_resolver("swept_dirname", swept_dirname, replace=True)
OmegaConf.register_new_resolver("sweep_direction", sweep_direction, replace=True)


def to_run_config(dcfg: DictConfig) -> RunConfig:
    """DictConfig -> validated dataclasses (Hydra's own `hydra` node left out)."""
    return run_config_from_dict(OmegaConf.to_container(dcfg, resolve=True))


def job_identity() -> tuple[str | None, str | None]:
    """W&B group (the sweep) and run name (the job's overrides), from Hydra's job info."""
    hc = HydraConfig.get()
    name = hc.job.override_dirname or None
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).as_posix().replace("/", "_"), name or f"job{hc.job.num}"
    return None, name


def report_failure(exc: Exception, known: bool) -> float:
    """A multirun job failed: said at once, recorded for the end of the sweep and in failed_jobs.txt; the sweep
    goes on with the next job."""
    hc = HydraConfig.get()
    what = str(exc) if known else f"{type(exc).__name__}: {exc}"
    line = f"job {hc.job.num} ({swept_dirname(hc.overrides.task)}) failed: {what}"
    failures.record(line)
    print(f"error: {line}", file=sys.stderr, flush=True)
    with open(Path(hc.sweep.dir) / "failed_jobs.txt", "a") as f:
        f.write(line + "\n")
    return float("nan")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def hydra_main(dcfg: DictConfig) -> float:
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        cfg = to_run_config(dcfg)
        group, name = job_identity()
        cfg.logger.group, cfg.logger.name = cfg.logger.group or group, cfg.logger.name or name
        n_jobs = OmegaConf.select(hc.launcher, "n_jobs", default=None) if sweep else None
        if isinstance(n_jobs, int) and n_jobs > 1 and cfg.trainer.num_threads is None:  # jobs side by side
            cfg.trainer.num_threads = max(1, (os.cpu_count() or 1) // n_jobs)
        choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
        summary = run(cfg, Path(hc.runtime.output_dir), resume=cfg.resume, choices=choices)
    except Exception as exc:
        known = isinstance(exc, (ConfigError, CheckpointError, RunStopped))  # one line; else a bug: traceback
        if full_error or (not sweep and not known):
            raise
        if isinstance(exc, RunStopped) and (not sweep or exc.exit_code > 128):
            print(str(exc), file=sys.stderr, flush=True)  # a signal stops a whole sweep too
            sys.exit(exc.exit_code)
        if not sweep:
            overrides.fail(str(exc))
        return report_failure(exc, known)
    if not summary:  # a torchrun process other than rank 0: rank 0 reports
        return float("nan")
    print(summary_line(summary), flush=True)
    # what a sweeper (hydra/sweeper=tune) optimises: the best validation value, never a test number
    return summary.get(f"val/best_{summary['metric']}", float("nan"))


def main() -> None:
    """Console script `rmt-bench`."""
    sys.argv[1:] = overrides.checked(sys.argv[1:])
    with failures.collected() as failed:  # launcher workers inherit where to record (SLURM jobs do not)
        hydra_main()
    failures.exit_if_failed("job(s) of the sweep", failed)


if __name__ == "__main__":
    main()
