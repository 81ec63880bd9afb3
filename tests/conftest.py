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
