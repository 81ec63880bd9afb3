"""The cross-process bookkeeping of a sweep's failed jobs (rmt_bench/failures.py): lines recorded in this process
and in worker processes are all collected, the environment is put back, and the end of the sweep exits 1 with them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rmt_bench import failures


def test_lines_from_this_process_and_from_workers_are_collected():
    before = os.environ.get(failures.FAILED_JOBS_ENV)
    with failures.collected() as failed:
        failures.record("job 0 (model=rmt) failed: here")
        worker = "from rmt_bench import failures; failures.record('job 1 (model=xl) failed: in a worker')"
        subprocess.run([sys.executable, "-c", worker], check=True, env=os.environ.copy())
        assert failed == []  # filled when the block ends
    assert failed == ["job 0 (model=rmt) failed: here", "job 1 (model=xl) failed: in a worker"]
    assert os.environ.get(failures.FAILED_JOBS_ENV) == before


def test_outside_a_sweep_nothing_is_kept_and_nothing_fails(capsys):
    os.environ.pop(failures.FAILED_JOBS_ENV, None)
    failures.record("job 0 failed")  # no file to write to: only the job's own stderr line says it
    failures.exit_if_failed("job(s) of the sweep", [])
    assert capsys.readouterr().err == ""


def test_the_end_of_a_sweep_lists_the_failures_and_exits_1(capsys):
    with pytest.raises(SystemExit) as exc:
        failures.exit_if_failed("cell(s)", ["a failed: x", "b failed: y"])
    assert exc.value.code == 1
    assert capsys.readouterr().err == "error: 2 cell(s) failed:\n  a failed: x\n  b failed: y\n"


def test_a_list_removed_under_the_sweep_is_a_warning_not_a_crash(capsys):
    with failures.collected() as failed:
        shared = os.environ[failures.FAILED_JOBS_ENV]
        os.unlink(shared)  # a /tmp cleaner during a long sweep
    assert failed == []
    assert capsys.readouterr().err == (
        f"warning: {shared} (the failed jobs' list) was removed; failures show in the jobs' logs only\n"
    )
