"""The hospital's audit log: one line per message that left the hospital.

A privacy officer reads it to see exactly what was sent and when: the run, the round (the
message's group: a round number or ``setup-N``), the action, the payload size, the SHA-256 of
the payload (:func:`common.protocol.messages.payload_digest`, which the server records for what it
received), the status, and the hospital's cumulative ε after the message. Nothing of the
payload itself is kept: the digest lets the officer match an entry with the server's record
without the log holding model updates.

Format: JSON lines, appended with ``O_APPEND`` and fsynced, mode 0600. A line is written only
after the reply was built and before Flower sends it, so a crash between the two leaves an
entry for a message that may not have arrived, never a sent message without an entry.

A second kind of line, ``{"kind": "ledger-state", …}`` (:class:`LedgerStateEntry`), follows
every write of the privacy ledger (``client.ledger``): the ledger's ``sequence`` and ``chain``
hash after the write. The ledger checks itself against the newest such line when it is opened,
so a deleted ledger or an older copy put back is refused instead of lowering ε. Lines without a
``kind`` are messages (every log written before ledger-state lines existed parses unchanged).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict

from common.errors import UserError
from common.protocol.messages import content_bytes, payload_digest


class AuditLogCorrupt(UserError):
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
    noise_multiplier: float | None = None  # σ of the round, when the reply reports it (a training reply)


LEDGER_STATE = "ledger-state"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LedgerStateEntry:
    """The privacy ledger's state after one write: what ``client.ledger`` checks on open.

    Nothing leaves the hospital with it; it is in this log because the log is append-only and
    kept apart from the ledger, so putting back an older ledger no longer matches it.
    """

    time: float  # Unix time of the ledger write
    site: str
    ledger: str  # the ledger file's path, for the privacy officer
    sequence: int  # the ledger's write counter after the write
    chain: str  # SHA-256 hex of the hash chain after the write
    total_steps: int  # DP steps charged in the ledger after the write
    charges: int  # entries in the ledger's history after the write
    accounting_sha256: str  # SHA-256 of what ε is computed from: accountant, δ, history
    kind: str = LEDGER_STATE


AuditRecord = AuditEntry | LedgerStateEntry


def entry_for(
    request: Message, reply_content: RecordDict, site_id: str, *, detail: str = "", cpu_s: float | None = None
) -> AuditEntry:
    """The audit entry of ``reply_content``, sent in answer to ``request``."""
    privacy = reply_content.config_records.get("privacy")
    epsilon: float | None = None
    sigma: float | None = None
    status = "-"
    if privacy is not None:
        status = str(privacy.get("status", "-"))
        raw = privacy.get("epsilon")
        if isinstance(raw, int | float) and math.isfinite(float(raw)):
            epsilon = float(raw)
        raw = privacy.get("noise-multiplier")
        if isinstance(raw, int | float) and math.isfinite(float(raw)):
            sigma = float(raw)
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
        noise_multiplier=sigma,
    )


def _session_of(request: Message) -> str:
    """The setup id a secure-aggregation request names ("" when it names none)."""
    rec = request.content.config_records.get("secagg")
    return str(rec["setup"]) if rec is not None and "setup" in rec else ""


def append_entry(path: Path, entry: AuditRecord) -> None:
    """Append one JSON line durably (O_APPEND, fsync); creates the log with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _record(obj: Any) -> AuditRecord:
    """One parsed line as its record type; ``TypeError``/``ValueError`` when it is neither."""
    if not isinstance(obj, dict):
        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
    if "kind" not in obj:
        return AuditEntry(**obj)
    if obj["kind"] != LEDGER_STATE:
        raise ValueError(f"unknown record kind {obj['kind']!r}")
    state = LedgerStateEntry(**obj)
    if (not isinstance(state.sequence, int) or isinstance(state.sequence, bool) or state.sequence < 1
            or not isinstance(state.chain, str) or not _SHA256_HEX.fullmatch(state.chain)
            or not isinstance(state.charges, int) or isinstance(state.charges, bool) or state.charges < 0
            or not isinstance(state.accounting_sha256, str) or not _SHA256_HEX.fullmatch(state.accounting_sha256)):
        raise ValueError(f"malformed ledger-state line (sequence {state.sequence!r}, chain {state.chain!r}, "
                         f"charges {state.charges!r})")
    return state


def parse_line(line: str) -> AuditRecord:
    """One line of the log as its record; ``ValueError`` (or ``TypeError``) when it is not one."""
    return _record(json.loads(line))


def read_records(path: Path) -> list[AuditRecord]:
    """Every line, messages and ledger states, in order; a missing log is empty.

    A malformed line raises :class:`AuditLogCorrupt` naming the line: the log is evidence, so
    nothing is skipped or repaired silently.
    """
    if not path.exists():
        return []
    records: list[AuditRecord] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(parse_line(line))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise AuditLogCorrupt(
                f"{path}:{number}: not an audit entry ({exc}); medsynth never repairs the log, and training "
                "is refused while it cannot be read (the ledger is checked against it): have a person look at "
                "that line, e.g. one torn by a power loss, keeping a copy of the file as it is"
            ) from exc
    return records


def read_entries(path: Path) -> list[AuditEntry]:
    """The messages that left the hospital (ledger-state lines left out); see :func:`read_records`."""
    return [r for r in read_records(path) if isinstance(r, AuditEntry)]


def latest_ledger_state(path: Path) -> LedgerStateEntry | None:
    """The newest ledger-state line (highest sequence; the last of equals), or None if there is none."""
    newest: LedgerStateEntry | None = None
    for record in read_records(path):
        if isinstance(record, LedgerStateEntry) and (newest is None or record.sequence >= newest.sequence):
            newest = record
    return newest


def format_entries(entries: Sequence[AuditRecord]) -> str:
    """A table a privacy officer can read; ledger-state lines show the ledger's sequence and chain."""
    lines = [f"{'time (UTC)':<20} {'run':<20} {'round':<8} {'session':<8} {'action':<20} {'status':<16} "
             f"{'bytes':>10} {'ε after':>8}  payload sha256"]
    messages = [e for e in entries if isinstance(e, AuditEntry)]
    for e in entries:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.time))
        if isinstance(e, LedgerStateEntry):
            lines.append(f"{stamp:<20} {'-':<20} {'-':<8} {'ledger-state':<20} {'seq ' + str(e.sequence):<16} "
                         f"{'-':>10} {'-':>8}  chain {e.chain[:16]}… ({e.total_steps} steps charged)")
            continue
        eps = f"{e.epsilon:.4f}" if e.epsilon is not None else "-"
        lines.append(f"{stamp:<20} {e.run:<20} {e.group:<8} {e.session or '-':<8} {e.action:<20} {e.status:<16} "
                     f"{e.bytes:>10} {eps:>8}  {e.sha256[:16]}…" + (f"  ({e.detail})" if e.detail else ""))
    lines.append(f"{len(messages)} message(s) left this hospital; {sum(e.bytes for e in messages)} bytes in all")
    return "\n".join(lines)
