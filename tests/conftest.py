"""Shared fixtures. ``shared_data_dir`` locates the optional public test data in ../shared/data."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data_dir() -> Path:
    """``../shared/data`` next to the repository; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture
def task_identity() -> None:
    """The identity Flower gives a ServerApp process, which building a ``Message`` needs."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 4242, 1, 1


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """The CLI's ``logging.basicConfig(force=True)`` adds a stream handler to the root logger (to a
    stream pytest closes after the test) and sets its level: undo both after each test."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler and handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)
