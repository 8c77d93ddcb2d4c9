"""Errors of the Flower process layer, each saying what failed and where to look.

``SuperLinkError`` is the root: a ``common.errors.UserError`` (the CLI prints it as one line)
and a ``RuntimeError`` (as before this package existed).
"""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError


class SuperLinkError(UserError, RuntimeError):
    """A Flower daemon or a ``flwr`` command failed; the message says what to do."""


class NotHealthy(SuperLinkError):
    """A daemon we started did not answer ``GET /health``.

    Attributes
    ----------
    log_path : Path
        The daemon's log.
    log_tail : str
        Its last lines when we gave up (callers look for e.g. "address already in use").
    """

    def __init__(self, message: str, *, log_path: Path, log_tail: str) -> None:
        super().__init__(message)
        self.log_path = log_path
        self.log_tail = log_tail


class DaemonExited(NotHealthy):
    """The daemon exited while we waited for it to become healthy."""

    def __init__(self, message: str, *, log_path: Path, log_tail: str, returncode: int) -> None:
        super().__init__(message, log_path=log_path, log_tail=log_tail)
        self.returncode = returncode


class HealthTimeout(NotHealthy):
    """The daemon ran but did not answer ``/health`` with 200 in time."""


class CertificateNotTrusted(NotHealthy):
    """The daemon answered over TLS with a certificate our CA file does not vouch for."""


class RunFailedError(SuperLinkError):
    """A submitted run did not finish with ``finished:completed``.

    Attributes
    ----------
    run_id : int | None
        The Flower run id, if the run was created.
    status : str
        Final Flower status (e.g. ``finished:failed``) or ``timeout``.
    log_tail : str
        The last lines of the run log.
    """

    def __init__(self, message: str, *, run_id: int | None, status: str, log_tail: str):
        super().__init__(message)
        self.run_id = run_id
        self.status = status
        self.log_tail = log_tail
