"""Which update left this hospital masked, and in which session: each update at most once.

Secure aggregation hides one hospital's update only inside one sum. If the same update were
masked again under a new session's keys, a server could ask for two sums that differ by one
hospital — sum({0,1,2,3}) − sum({0,1,2}) — and read that hospital's update exactly ("restart
subtraction"). So before a masked vector leaves, its SHA-256 is recorded here, durably, under
(run, round), and a request to mask an update whose digest is already recorded is refused
(``AlreadyReleased``). A restart after an early dropout still works where the update never left;
otherwise the hospital trains again (a new update, charged to the ledger like any other) or sits
the round out. A ClientApp is a new process per message, so the record lives on disk in the
state folder, not in Flower's per-run context state, and survives a restart of the node.

File format (JSON, mode 0600, written atomically)::

    {"format": 1, "site": "site-0",
     "released": {"<run>": {"<round>": [{"setup": 3, "sha256": "…", "at": "2026-…Z"}, …]}}}
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.atomic import exclusive_lock, write_json_atomic
from common.errors import UserError
from common.secagg import AlreadyReleased

FORMAT = 1


class ReleaseRecordCorrupt(UserError):
    """The release record exists but cannot be read; masking stays refused until a person looks."""


@dataclass(frozen=True)
class Release:
    """One masked vector that left: the session it was masked in and the digest of the update."""

    setup: int
    sha256: str
    at: str


class ReleaseRecord:
    """Read-modify-write access to ``released.json`` (hold :meth:`locked` around it)."""

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path = path
        self._state = state

    @staticmethod
    @contextlib.contextmanager
    def locked(path: Path) -> Iterator[ReleaseRecord]:
        """The record under an exclusive lock (one masking step per hospital at a time)."""
        with exclusive_lock(path):
            yield ReleaseRecord.read(path)

    @staticmethod
    def read(path: Path) -> ReleaseRecord:
        """The record at ``path``; an absent file is an empty record."""
        if not path.exists():
            return ReleaseRecord(path, {"format": FORMAT, "released": {}})
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReleaseRecordCorrupt(
                f"release record {path} is unreadable ({exc}); restore it from backup — without it this "
                "hospital cannot know which updates already left, so it masks nothing"
            ) from exc
        if not isinstance(state, dict) or not isinstance(state.get("released"), dict):
            raise ReleaseRecordCorrupt(f"release record {path} lacks 'released'; restore it from backup")
        return ReleaseRecord(path, state)

    def releases(self, run: int, round: int) -> list[Release]:
        """Every masked vector of (run, round) that left this hospital, oldest first."""
        raw = self._state["released"].get(str(run), {}).get(str(round), [])
        return [Release(**r) for r in raw]

    def refuse_again(self, run: int, round: int, setup: int, sha256: str) -> None:
        """``AlreadyReleased`` if the update with digest ``sha256`` already left for (run, round)."""
        for earlier in self.releases(run, round):
            if earlier.sha256 == sha256:
                raise AlreadyReleased(
                    f"the update of run {run} round {round} already left this hospital masked in session "
                    f"{earlier.setup}; it is never masked again (session {setup} asked). Train again or sit out"
                )

    def record(self, run: int, round: int, setup: int, sha256: str) -> Release:
        """Refuse an update already released for (run, round); else record it durably (call
        before the masked vector is handed to Flower: a crash afterwards loses an update, never
        sends one twice)."""
        self.refuse_again(run, round, setup, sha256)
        release = Release(setup=setup, sha256=sha256,
                          at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        self._state["released"].setdefault(str(run), {}).setdefault(str(round), []).append(asdict(release))
        write_json_atomic(self.path, self._state, mode=0o600)
        return release
