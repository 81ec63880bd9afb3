"""`rmt-bench`: the Hydra entry point, and the only module that imports hydra or omegaconf.

It composes `configs/`, turns the DictConfig into typed dataclasses (`config.py`), and runs one job; a
multirun (`-m`) is the same job repeated by Hydra's launcher. Mistakes in the command line or the config end
in one line `error: <key>: <what is allowed>` and exit status 2 (a traceback with HYDRA_FULL_ERROR=1).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rmt_bench.config import (
    LM_TASKS,
    MODEL_SWITCHES,
    SWEEP_DIRECTION,
    ConfigError,
    LMTaskConfig,
    LoggerConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainerConfig,
    check_mem,
    config_hash,
    from_dict,
)
from rmt_bench.errors import CheckpointError, RunStopped

_PACKAGED = Path(__file__).resolve().parent / "configs"  # inside an installed wheel
CONFIG_DIR = str(_PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "configs")
CHECKPOINT_FILE = "checkpoint.pt"


# configs/arch/trainable.yaml: init std sqrt(2 / (5 d_model)), scaled to the width (Nguyen & Salazar 2019)
def width_std(d_model) -> float:
    """sqrt(2 / (5 d_model)); a d_model below 1 is left to the config check, which names model.d_model."""
    return round((2 / (5 * float(d_model))) ** 0.5, 6) if float(d_model) >= 1 else 0.02


OmegaConf.register_new_resolver("width_std", width_std, replace=True)


def swept_dirname(job_overrides) -> str:
    """A multirun job's directory name: `key=value` of the keys the command line sweeps (`model=xl,rmt`,
    `mem=range(2,8,2)`), not every override, with `/` replaced so that it stays one path component. Hydra's
    own parser tells sweeps from plain overrides; without a sweep on the command line every override counts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a and a[0] != "-"])
        swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    except Exception:  # a launcher in another process: its argv is not the sweep's
        swept = set()
    pairs = [str(o) for o in job_overrides if not swept or str(o).split("=", 1)[0].lstrip("+~") in swept]
    return ",".join(pairs).replace("/", "_")[:200] or "job"


OmegaConf.register_new_resolver("swept_dirname", swept_dirname, replace=True)
# configs/hydra/sweeper/tune.yaml: maximize accuracy / exact match, minimize perplexity / bpc
OmegaConf.register_new_resolver("sweep_direction", lambda task: SWEEP_DIRECTION[task], replace=True)


def _rank() -> int:
    """This process's rank under torchrun (0 for a plain process): only rank 0 prints errors and summaries."""
    return int(os.environ.get("RANK", 0))


def _fail(message: str) -> None:
    if _rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def to_run_config(dcfg: DictConfig) -> RunConfig:
    """DictConfig -> validated dataclasses (Hydra's own `hydra` node left out)."""
    data = OmegaConf.to_container(dcfg, resolve=True)
    data.pop("hydra", None)
    check_mem(data.get("mem"))
    task_cls = LMTaskConfig if data.get("task", {}).get("name") in LM_TASKS else TaskConfig
    parts = {"model": ModelConfig, "task": task_cls, "trainer": TrainerConfig, "logger": LoggerConfig}
    built = {key: from_dict(cls, data.pop(key), key) for key, cls in parts.items()}
    return from_dict(RunConfig, data | built, "config")


def _job_identity() -> tuple[str | None, str | None]:
    """W&B group (the sweep) and run name (the job's overrides), from Hydra's job info."""
    hc = HydraConfig.get()
    name = hc.job.override_dirname or None
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).as_posix().replace("/", "_"), name or f"job{hc.job.num}"
    return None, name


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, choices: dict | None = None) -> dict:
    """Build task and model, train, test; writes metrics.jsonl and summary.json into `run_dir`. `choices` (the
    Hydra config-group choices) go into config.json and W&B beside the resolved config."""
    import torch

    from rmt_bench.logging import NullLogger, RunLogger
    from rmt_bench.models import build_model
    from rmt_bench.tasks import build_task
    from rmt_bench.train import distributed
    from rmt_bench.train.loop import fit, resolve_device

    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    dist, device = distributed.start(device)  # torchrun: this process's rank (else one process)
    if cfg.trainer.batch_size % dist.world:
        raise ConfigError(
            "trainer.batch_size",
            f"{cfg.trainer.batch_size} does not split over the {dist.world} processes of torchrun; "
            f"use a multiple of {dist.world} (every process takes batch_size / {dist.world} rows of each batch)",
        )
    run_dir = Path(dist.broadcast(str(run_dir)))  # rank 0's: the one checkpoint every rank resumes from
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task, device) if dist.main else None
    dist.broadcast(None)  # the others read the corpus cache (LM) once rank 0 has written it
    task = task if task is not None else build_task(cfg.task, device)
    model = build_model(cfg.model, task.vocab_size, task.pad_front)  # the same initial weights on every rank
    if dist.rank:
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)  # each rank its own dropout stream
    config = asdict(cfg) | ({"choices": choices} if choices else {})
    logger = RunLogger(cfg.logger, run_dir, config, resume) if dist.main else NullLogger()
    exit_code = 1
    identity = {
        "task": cfg.task.name, "model": cfg.model.name, "arch": cfg.model.arch, "scale": cfg.scale,
        "config_hash": config_hash(cfg), "mem": cfg.mem, "segments": cfg.task.segments, "seed": cfg.seed,
    }  # fmt: skip
    try:
        summary = fit(
            model, task, cfg.trainer, logger, cfg.seed, device, run_dir / CHECKPOINT_FILE, resume, asdict(cfg), dist
        )
        summary = identity | summary if dist.main else {}
        logger.summary(summary)
        exit_code = 0
    except RunStopped as exc:
        if exc.summary is not None:  # a diverged run still says what happened, for the suite and the report
            logger.summary(identity | exc.summary | {"world_size": dist.world})
        if not dist.main:
            raise SystemExit(exc.exit_code) from None  # rank 0 says it
        raise
    finally:
        logger.finish(exit_code)
        distributed.stop()
    return summary


def headline(summary: dict) -> str:
    """The task's main metric: the final answer's exact match (quadratic), greedy answer accuracy, perplexity or
    bits per character."""
    return next(k for k in ("final_exact", "acc", "ppl", "bpc") if f"test/{k}" in summary)


def summary_line(s: dict) -> str:
    key = headline(s)
    test = f"test {key} {s[f'test/{key}']:.4f}"
    if key == "final_exact":
        test += f" acc {s['test/acc']:.4f}"
    if key in ("acc", "final_exact"):
        test += f" (greedy) acc_tf {s['test/acc_tf']:.4f} exact {s['test/exact']:.4f}"
    if "test_memory_reset/acc" in s:
        test += f" | memory reset: acc {s['test_memory_reset/acc']:.4f}"
    best = s.get(f"val/best_{key}", float("nan"))
    mem = f" mem={s['mem']}" if MODEL_SWITCHES.get(s["model"]) else ""  # vanilla has none (ignores `mem`)
    return (
        f"{s['task']} {s['model']}{mem} segments={s['segments']} seed={s['seed']} | {test} | "
        f"best val {best:.4f} @ {s['best_step']} | {s['steps']} steps {s['train_minutes']:.1f} min "
        f"{s['tokens_per_s']:.0f} tok/s peak {s['peak_memory_mb']:.0f} MB"
    )


FAILED_JOBS: list[str] = []  # multirun jobs that failed at run time, reported when the sweep ends
# where jobs in other processes (hydra/launcher=parallel: joblib workers) record their failures for `main`
FAILED_JOBS_ENV = "RMT_BENCH_FAILED_JOBS"


def _record_failure(line: str) -> None:
    shared = os.environ.get(FAILED_JOBS_ENV)
    if shared:
        with open(shared, "a") as f:
            f.write(line + "\n")
    else:
        FAILED_JOBS.append(line)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_main(dcfg: DictConfig) -> float:
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    hc = HydraConfig.get()
    try:
        cfg = to_run_config(dcfg)
        cfg.logger.group, cfg.logger.name = _job_identity()
        n_jobs = OmegaConf.select(hc.launcher, "n_jobs", default=None) if hc.mode == RunMode.MULTIRUN else None
        if isinstance(n_jobs, int) and n_jobs > 1 and cfg.trainer.num_threads is None:  # jobs side by side
            cfg.trainer.num_threads = max(1, (os.cpu_count() or 1) // n_jobs)
        run_dir = Path(hc.runtime.output_dir)
        choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
        summary = run(cfg, run_dir, resume=cfg.resume, choices=choices)
    except Exception as exc:
        known = isinstance(exc, (ConfigError, CheckpointError, RunStopped))  # one line; else a bug: traceback
        if full_error or (hc.mode != RunMode.MULTIRUN and not known):
            raise
        if isinstance(exc, RunStopped) and (hc.mode != RunMode.MULTIRUN or exc.exit_code > 128):
            print(str(exc), file=sys.stderr, flush=True)  # a signal stops a whole sweep too
            sys.exit(exc.exit_code)
        if hc.mode != RunMode.MULTIRUN:
            _fail(str(exc))
        # a sweep goes on: the job is reported (and listed again at the end), the next one runs
        what = str(exc) if known else f"{type(exc).__name__}: {exc}"
        line = f"job {hc.job.num} ({swept_dirname(hc.overrides.task)}) failed: {what}"
        _record_failure(line)
        print(f"error: {line}", file=sys.stderr, flush=True)
        with open(Path(hc.sweep.dir) / "failed_jobs.txt", "a") as f:
            f.write(line + "\n")
        return float("nan")
    if not summary:  # a torchrun process other than rank 0: rank 0 reports
        return float("nan")
    print(summary_line(summary), flush=True)
    # what a sweeper (hydra/sweeper=tune) optimises: the best validation value, never a test number
    return summary.get(f"val/best_{headline(summary)}", float("nan"))


# ---------------------------------------------------------------- command-line checks before Hydra runs
def _group_options(group: str) -> list[str]:
    return sorted(
        p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml") if not p.stem.startswith("_")
    )  # _base: not a choice


def precheck(args: list[str]) -> None:
    """Reject unknown group options and unknown keys with one line, before Hydra prints its longer report."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra"}
    parser = OverridesParser.create()
    parsed = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parsed.append(parser.parse_override(arg))
        except Exception:
            return  # a syntax error: Hydra's own message says where
    choices = []
    for ov in parsed:
        key = ov.key_or_group
        if ov.is_delete() or ov.is_add() or ov.is_force_add() or key.startswith("hydra"):
            continue
        try:
            values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [str(ov.value())]
        except Exception:
            continue
        if key in groups:
            options = _group_options(key)
            for value in values:
                if value not in options:
                    _fail(f"{key}={value}: unknown {key}; choose one of: {', '.join(options)}")
            choices.append(f"{key}={values[0]}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = compose(config_name="config", overrides=choices)
    GlobalHydra.instance().clear()
    missing = object()
    for ov in parsed:
        key = ov.key_or_group
        if key in groups or ov.is_add() or ov.is_force_add() or key.startswith("hydra") or ov.is_delete():
            continue
        if OmegaConf.select(base, key, default=missing) is missing:
            parent, _, _ = key.rpartition(".")
            node = OmegaConf.select(base, parent, default=None) if parent else base
            known = sorted(k for k in node if k != "hydra") if isinstance(node, DictConfig) else []
            where = f"keys of {parent}" if parent else "top-level keys"
            _fail(f"{key}: unknown key; {where}: {', '.join(known)}")


def sweep_jobs(args: list[str]) -> list[tuple[list[str], str]]:
    """The overrides of every job a basic multirun of `args` launches (the product of the swept values, in
    Hydra's order: the last override varies fastest), each with its label: its swept `key=value`s."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    axes = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        ov = parser.parse_override(arg)
        if ov.key_or_group.startswith("hydra"):
            continue
        if ov.is_sweep_override():
            prefix = arg[: len(arg) - len(arg.split("=", 1)[1])]  # key= with any +/~ prefix
            axes.append([prefix + v for v in ov.sweep_string_iterator()])
        else:
            axes.append([arg])
    return [
        (list(job), ",".join(o for o, axis in zip(job, axes) if len(axis) > 1) or "the only job")
        for job in itertools.product(*axes)
    ]


def invalid_jobs(jobs: list[tuple[list[str], str]]) -> list[tuple[int, str, str]]:
    """Compose and validate each job's overrides as a run would -> (index, label, what is wrong) of the bad ones."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    bad = []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for num, (job, label) in enumerate(jobs):
            try:
                to_run_config(compose(config_name="config", overrides=job))
            except Exception as exc:
                what = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}".splitlines()[0]
                bad.append((num, label, what))
    GlobalHydra.instance().clear()
    return bad


def validate_sweep(args: list[str]) -> None:
    """Compose and validate every job of a multirun before the first one starts: all bad jobs are named, one line
    each, and nothing runs (exit 2)."""
    try:
        jobs = sweep_jobs(args)
    except Exception:
        return  # a sweep this cannot expand (a sweeper's own syntax): Hydra checks each job as it starts
    errors = [f"error: job {num} ({label}): {what}" for num, label, what in invalid_jobs(jobs)]
    if errors:
        print("\n".join(errors), file=sys.stderr)
        print(f"error: {len(errors)} of the sweep's jobs are invalid; nothing was run", file=sys.stderr)
        sys.exit(2)


WANDB_ENV_MODES = ("offline", "online", "disabled", "dryrun", "run", "shared")  # what wandb itself accepts


def check_environment(args: list[str]) -> None:
    """Bad input from outside the config: the W&B mode in the environment, a run directory that is a file."""
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_ENV_MODES:
        _fail(f"WANDB_MODE: {mode!r} (environment) is not allowed; choose one of: offline, online, disabled")
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value:
            path = Path(value.strip("'\""))
            if path.exists() and not path.is_dir():
                _fail(f"{key}: {path} is a file; give a directory (new or an earlier run's)")


# Hydra's own flags; with these the words after them are Hydra's (e.g. `-sc install=bash`), not config overrides
HYDRA_FLAGS = ("-h", "--help", "--hydra-help", "--info", "-i", "-sc", "--shell-completion")


def torchrun_arguments(args: list[str]) -> list[str]:
    """Under torchrun (WORLD_SIZE > 1) the processes run one training: no sweep; ranks other than 0 get a
    scratch Hydra directory (rank 0's run directory is the run's, and theirs is broadcast from it)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return args
    if "-m" in args or "--multirun" in args:
        _fail(
            "-m: under torchrun the processes train one run; sweep outside it (e.g. one torchrun per job, or "
            "hydra/launcher=slurm)"
        )
    if _rank() == 0:
        return args
    scratch = tempfile.mkdtemp(prefix=f"rmt-bench-rank{_rank()}-")
    atexit.register(shutil.rmtree, scratch, True)
    kept = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*kept, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def main() -> None:
    """Console script `rmt-bench`."""
    args = torchrun_arguments(sys.argv[1:])
    sys.argv[1:] = args
    check_environment(args)
    if not any(a in HYDRA_FLAGS or a.startswith(("--shell-completion=", "--info=")) for a in args):
        try:
            precheck(args)
        except SystemExit:
            raise
        except Exception:
            pass  # the checks are a courtesy; Hydra validates everything again
        if "-m" in args or "--multirun" in args:
            validate_sweep(args)
    fd, shared = tempfile.mkstemp(prefix="rmt-bench-failed-", suffix=".txt")
    os.close(fd)
    os.environ[FAILED_JOBS_ENV] = shared  # launcher workers inherit it (SLURM jobs on other nodes do not)
    try:
        hydra_main()
    finally:
        FAILED_JOBS.extend(Path(shared).read_text().splitlines())
        os.unlink(shared)
    exit_if_failed("job(s) of the sweep", FAILED_JOBS)


def exit_if_failed(what: str, failed: list[str]) -> None:
    """The list of what failed at run time, after all ran, and exit status 1."""
    if failed:
        print(f"error: {len(failed)} {what} failed:", file=sys.stderr)
        print("\n".join(f"  {line}" for line in failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
