"""Shared fixtures. ``shared_data_dir`` locates the optional public test data in ../shared/data."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The longest test files, longest first (wall time on 2 idle cores, 2026-12-03: about 520 s, 330 s
# and 190 s). ``make test`` runs the suite on two pytest-xdist workers, one file per worker at a time:
# the files that start Flower processes go first so that neither worker is left with one of them
# at the end while the other sits idle.
LONGEST_FIRST = ("test_deploy_tls.py", "test_simulate_e2e.py", "test_deployment.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the tests: :data:`LONGEST_FIRST`, then the other ``slow`` files, then the rest
    (collection order within each group; a test's fixtures and its file's tests stay together)."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(name)
        return (1 if item.get_closest_marker("slow") else 2), 0

    items.sort(key=rank)  # stable: the collection order within a rank


@pytest.fixture
def shared_data_dir() -> Path:
    """``../shared/data`` next to the repository; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture
def task_identity() -> None:
    """The identity Flower gives a ServerApp process, which building a ``Message`` needs."""
    from tests.helpers import set_task_identity

    set_task_identity()


@pytest.fixture(scope="module")
def phantom_dicom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One phantom hospital's DICOM export (16 patients × 2 images), written once per module."""
    from tests.inprocess import write_phantom_sites

    return write_phantom_sites(tmp_path_factory.mktemp("hospital"), 1) / "site-0" / "dicom"


@pytest.fixture
def node_config(phantom_dicom_dir: Path, tmp_path: Path) -> dict[str, bool | float | str]:
    """A deployed hospital's node config over ``phantom_dicom_dir`` with a fresh state folder."""
    return {"site-id": "site-0", "data-dir": str(phantom_dicom_dir), "state-dir": str(tmp_path / "state"),
            "epsilon-budget": 10.0, "allow-plain-aggregation": True, "class-names": "normal,lesion",
            "members": "site-0=" + "ab" * 32}


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
