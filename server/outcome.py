"""Why the ServerApp stopped, for ``server start`` to turn into one line and an exit code.

The ServerApp runs in a process Flower starts; when it raises, Flower marks the run
``finished:failed`` and keeps only the exception's text. So before the exception leaves the
ServerApp, :func:`server.app.main` writes this record to ``STATE/results/last_error.json`` (one
writer), and :mod:`server.daemon` (one reader) reads it when Flower reports the run failed: the
error's class decides the exit code (1: a restart can succeed, e.g. hospitals joined too late;
2: a person must fix something first), its message becomes the one line the operator sees. The
record names the Flower run it belongs to, so an older one is never mistaken for this run's.
Nothing in it comes from a hospital other than what the round records hold already.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.atomic import write_json_atomic
from common.errors import EXIT_RESTARTABLE, UserError

LAST_ERROR_FILE = "last_error.json"


@dataclass(frozen=True)
class ServerAppError:
    """A :class:`common.errors.UserError` that ended a run, as the ServerApp saw it."""

    run_id: int
    kind: str  # the exception's class name, e.g. NoHospitals
    message: str
    restartable: bool  # its exit code was EXIT_RESTARTABLE

    @classmethod
    def of(cls, exc: UserError, run_id: int) -> ServerAppError:
        return cls(run_id, type(exc).__name__, " ".join(str(exc).split()), exc.exit_code == EXIT_RESTARTABLE)

    def write(self, path: Path) -> None:
        write_json_atomic(path, {"format": 1, "run_id": self.run_id, "kind": self.kind, "message": self.message,
                                 "restartable": self.restartable})

    @staticmethod
    def read(path: Path, run_id: int | None) -> ServerAppError | None:
        """The record of run ``run_id`` at ``path``; None when there is none, it is another run's, or
        it is unreadable (the caller then reports the failure without it)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict) or raw.get("format") != 1 or raw.get("run_id") != run_id:
            return None
        kind, message, restartable = raw.get("kind"), raw.get("message"), raw.get("restartable")
        if not (isinstance(kind, str) and isinstance(message, str) and isinstance(restartable, bool)):
            return None
        return ServerAppError(int(raw["run_id"]), kind, message, restartable)
