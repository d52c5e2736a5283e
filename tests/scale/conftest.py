"""The rehearsal's real services and data: a SLURM cluster on 127.0.0.1 and tiny shards of local text.

These tests start and stop their own daemons (tests/scale/slurm_cluster.py); they skip, naming the reason, only
where slurm-wlm and munge are not installed or cannot run (not root). `make test-scale` installs them first.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import tiny_data  # noqa: F401 - shared fixture (real shards)

from .slurm_cluster import SlurmCluster, missing_reason


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    # Short: munged's socket path must fit a Unix socket name (108 bytes).
    root = Path(tmp_path_factory.mktemp("slurm"))
    with SlurmCluster(root) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def scale_data(tiny_data) -> dict[str, Path]:
    """The training tests' shards of the local corpus (stdlib code, Python prose) and their small BPE."""
    return {"root": tiny_data["root"], "manifest": tiny_data["mix"], "tokenizer": tiny_data["tokenizer"]}

