"""Jobs of a sweep that fail at run time, collected across the processes that run them.

A multirun goes on past a failed job (it is reported at once) and exits 1 at the end with the list. Jobs run in
the launching process (Hydra's basic launcher) or in workers (hydra/launcher=parallel: joblib processes): each
appends its line to a file that `collected` creates and names in `RMT_BENCH_FAILED_JOBS`, which the workers
inherit, and that the launching process reads when the sweep ends. SLURM jobs on other nodes report only in their
logs and the sweep's failed_jobs.txt.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

FAILED_JOBS_ENV = "RMT_BENCH_FAILED_JOBS"


def record(line: str) -> None:
    """A failed job's line: into the shared file when a sweep collects them, else nowhere but stderr (the caller's)."""
    shared = os.environ.get(FAILED_JOBS_ENV)
    if shared:
        with open(shared, "a") as f:
            f.write(line + "\n")


@contextlib.contextmanager
def collected() -> Iterator[list[str]]:
    """The lines every job of this process and its workers records inside the block, in the list it yields
    (filled when the block ends)."""
    fd, shared = tempfile.mkstemp(prefix="rmt-bench-failed-", suffix=".txt")
    os.close(fd)
    before = os.environ.get(FAILED_JOBS_ENV)
    os.environ[FAILED_JOBS_ENV] = shared
    failed: list[str] = []
    try:
        yield failed
    finally:
        try:
            failed.extend(Path(shared).read_text().splitlines())
            os.unlink(shared)
        except FileNotFoundError:  # removed under the sweep (a /tmp cleaner): the runs' own results stand
            print(f"warning: {shared} (the failed jobs' list) was removed; failures show in the jobs' logs only",
                  file=sys.stderr)  # fmt: skip
        if before is None:
            os.environ.pop(FAILED_JOBS_ENV, None)
        else:
            os.environ[FAILED_JOBS_ENV] = before


def exit_if_failed(what: str, failed: list[str]) -> None:
    """The list of what failed at run time, after all ran, and exit status 1."""
    if failed:
        print(f"error: {len(failed)} {what} failed:", file=sys.stderr)
        print("\n".join(f"  {line}" for line in failed), file=sys.stderr)
        sys.exit(1)
