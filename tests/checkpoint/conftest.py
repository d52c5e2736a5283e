"""Shared fixtures: real local shards and a trained tiny run (tests/train/conftest.py)."""
from tests.train.conftest import data_overrides, tiny_data, trained_tiny_run  # noqa: F401
