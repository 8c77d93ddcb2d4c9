"""The hospital's audit log: one line per message that left the hospital.

A privacy officer reads it to see exactly what was sent and when: the run, the round (the
message's group: a round number or ``setup-N``), the action, the payload size, the SHA-256 of
the payload (:func:`common.protocol.payload_digest`, which the server records for what it
received), the status, and the hospital's cumulative ε after the message. Nothing of the
payload itself is kept: the digest lets the officer match an entry with the server's record
without the log holding model updates.

Format: JSON lines, appended with ``O_APPEND`` and fsynced, mode 0600. A line is written only
after the reply was built and before Flower sends it, so a crash between the two leaves an
entry for a message that may not have arrived, never a sent message without an entry.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import Message, RecordDict

from common.protocol import content_bytes, payload_digest


class AuditLogCorrupt(Exception):
    """An audit log line is not a JSON object; the log is kept as is for inspection."""


@dataclass(frozen=True)
class AuditEntry:
    """One outgoing message, as the hospital's audit log records it."""

    time: float  # Unix time the reply was recorded
    run: str  # Flower run id (decimal string: run ids exceed int64)
    group: str  # round number, or setup-N for a secure-aggregation session setup
    action: str  # the request's message type, e.g. train or train.secagg_unmask
    site: str
    status: str  # ok, budget-exhausted, error, or "-" for protocol steps without a privacy record
    bytes: int  # payload bytes (arrays + config values)
    sha256: str  # payload_digest of the reply content
    epsilon: float | None  # cumulative ε after this message, when the reply reports it
    session: str = ""  # secure-aggregation session (setup id) the request named, "" for none
    detail: str = ""  # for an error reply: the hospital-local cause (never sent; the reply has a fixed text)
    cpu_s: float | None = None  # CPU seconds this hospital spent on the message (local; read by benchmarks)


def entry_for(
    request: Message, reply_content: RecordDict, site_id: str, *, detail: str = "", cpu_s: float | None = None
) -> AuditEntry:
    """The audit entry of ``reply_content``, sent in answer to ``request``."""
    privacy = reply_content.config_records.get("privacy")
    epsilon: float | None = None
    status = "-"
    if privacy is not None:
        status = str(privacy.get("status", "-"))
        raw = privacy.get("epsilon")
        if isinstance(raw, int | float) and math.isfinite(float(raw)):
            epsilon = float(raw)
    return AuditEntry(
        time=time.time(),
        run=str(request.metadata.run_id),
        group=str(request.metadata.group_id),
        action=str(request.metadata.message_type),
        site=site_id,
        status=status,
        bytes=content_bytes(reply_content),
        sha256=payload_digest(reply_content),
        epsilon=epsilon,
        session=_session_of(request),
        detail=detail,
        cpu_s=cpu_s,
    )


def _session_of(request: Message) -> str:
    """The setup id a secure-aggregation request names ("" when it names none)."""
    rec = request.content.config_records.get("secagg")
    return str(rec["setup"]) if rec is not None and "setup" in rec else ""


def append_entry(path: Path, entry: AuditEntry) -> None:
    """Append one JSON line durably (O_APPEND, fsync); creates the log with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_entries(path: Path) -> list[AuditEntry]:
    """Every entry; a missing log is empty, a malformed line raises :class:`AuditLogCorrupt`."""
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(AuditEntry(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            raise AuditLogCorrupt(f"{path}:{number}: not an audit entry ({exc})") from exc
    return entries


def format_entries(entries: list[AuditEntry]) -> str:
    """A table a privacy officer can read."""
    lines = [f"{'time (UTC)':<20} {'run':<20} {'round':<8} {'session':<8} {'action':<20} {'status':<16} "
             f"{'bytes':>10} {'ε after':>8}  payload sha256"]
    for e in entries:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.time))
        eps = f"{e.epsilon:.4f}" if e.epsilon is not None else "-"
        lines.append(f"{stamp:<20} {e.run:<20} {e.group:<8} {e.session or '-':<8} {e.action:<20} {e.status:<16} "
                     f"{e.bytes:>10} {eps:>8}  {e.sha256[:16]}…" + (f"  ({e.detail})" if e.detail else ""))
    lines.append(f"{len(entries)} message(s) left this hospital; {sum(e.bytes for e in entries)} bytes in all")
    return "\n".join(lines)
