"""Fixtures and the thread setting for every test; the helpers tests share are in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest process per core: one torch thread each, in them and in the runs they start
    # (two processes of two OpenMP threads on two cores slow a tiny step ~200x)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _own_tmpdir(tmp_path_factory):
    """Temporary files of this process and of the runs it starts (a sweep's failed-jobs file, torchrun's
    torchelastic_* directories) go under pytest's own base directory, not /tmp: a run a test kills with SIGKILL
    cannot remove its own."""
    import tempfile

    path = tmp_path_factory.mktemp("tmpdir")
    before, os.environ["TMPDIR"], tempfile.tempdir = os.environ.get("TMPDIR"), str(path), None
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None
