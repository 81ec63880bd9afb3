"""The command line before Hydra runs a job: one parser of its overrides (Hydra's own grammar), the pre-checks
that turn an unknown option or key into one line, the expansion of a sweep into its jobs (each validated before
the first starts), the environment's bad values, and the arguments of a torchrun process.

Like cli.py this is the command-line edge, so it may import Hydra; nothing else in the package does.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rmt_bench.config import CONFIG_DIR, ConfigError

# Hydra's own flags; with these the words after them are Hydra's (e.g. `-sc install=bash`), not config overrides
HYDRA_FLAGS = ("-h", "--help", "--hydra-help", "--info", "-i", "-sc", "--shell-completion")
WANDB_ENV_MODES = ("offline", "online", "disabled", "dryrun", "run", "shared")  # what wandb itself accepts


def rank() -> int:
    """This process's rank under torchrun (0 for a plain process): only rank 0 prints errors and summaries."""
    return int(os.environ.get("RANK", 0))


def fail(message: str) -> None:
    """One line on stderr (rank 0's) and exit status 2. Under torchrun the other ranks wait a moment first: had one
    of them exited before rank 0 printed, torchrun would stop rank 0 with its line unwritten."""
    if rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)
    sys.exit(2)


def parse(args: list[str]) -> list[tuple[str, object]]:
    """(argument, Hydra's parsed Override) for every `key=value` argument (flags and plain words skipped).
    Raises Hydra's error on a syntax error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    return [(arg, parser.parse_override(arg)) for arg in args if not arg.startswith("-") and "=" in arg]


def swept_keys(args: list[str]) -> set[str]:
    """The keys the command line sweeps (`model=xl,rmt`, `mem=range(2,8,2)`); empty when it cannot be parsed."""
    try:
        return {ov.key_or_group for _, ov in parse(args) if ov.is_sweep_override()}
    except Exception:
        return set()


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))  # _base: no


def precheck(args: list[str]) -> None:
    """Reject unknown group options and unknown keys with one line, before Hydra prints its longer report."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"}
    try:
        parsed = [ov for _, ov in parse(args)]
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
            options = group_options(key)
            for value in values:
                if value not in options:
                    fail(f"{key}={value}: unknown {key}; choose one of: {', '.join(options)}")
            choices.append(f"{key}={values[0]}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
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
            fail(f"{key}: unknown key; {where}: {', '.join(known)}")


def sweep_jobs(args: list[str]) -> list[tuple[list[str], str]]:
    """The overrides of every job a basic multirun of `args` launches (the product of the swept values, in
    Hydra's order: the last override varies fastest), each with its label: its swept `key=value`s."""
    axes = []
    for arg, ov in parse(args):
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

    from rmt_bench.cli import to_run_config

    bad = []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
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


def check_environment(args: list[str]) -> None:
    """Bad input from outside the config: the W&B mode in the environment, a run directory that is a file."""
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_ENV_MODES:
        fail(f"WANDB_MODE: {mode!r} (environment) is not allowed; choose one of: offline, online, disabled")
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value:
            path = Path(value.strip("'\""))
            if path.exists() and not path.is_dir():
                fail(f"{key}: {path} is a file; give a directory (new or an earlier run's)")


def torchrun_arguments(args: list[str]) -> list[str]:
    """Under torchrun (WORLD_SIZE > 1) the processes run one training: no sweep; ranks other than 0 get a
    scratch Hydra directory (rank 0's run directory is the run's, and theirs is broadcast from it)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return args
    if "-m" in args or "--multirun" in args:
        fail(
            "-m: under torchrun the processes train one run; sweep outside it (e.g. one torchrun per job, or "
            "hydra/launcher=slurm)"
        )
    if rank() == 0:
        return args
    scratch = tempfile.mkdtemp(prefix=f"rmt-bench-rank{rank()}-")
    atexit.register(shutil.rmtree, scratch, True)
    kept = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*kept, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def checked(args: list[str]) -> list[str]:
    """The command line as the job will see it (torchrun's rewriting), after every check that can run before
    Hydra: the environment, unknown options and keys, and every job of a sweep."""
    args = torchrun_arguments(args)
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
    return args
