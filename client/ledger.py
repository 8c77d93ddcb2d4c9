"""A hospital's persistent privacy ledger: every DP step it ever took, across rounds and runs.

File format (JSON, one per hospital)::

    {"format": 2, "site": "site-0", "accountant": "prv", "delta": 1e-05,
     "epsilon_budget": 10.0,
     "history": [{"noise_multiplier": 0.9, "sample_rate": 0.1, "steps": 20,
                  "run": 123, "round": 1, "charged_at": "2026-…Z"}, …],
     "plans": {"123": {"noise_multiplier": 0.9, "sample_rate": 0.1}},
     "sequence": 7, "previous_chain": "<64 hex>", "chain": "<64 hex>"}

Epsilon is always recomputed from the whole ``history`` (``common.dp.accounting.epsilon_of``), so
anyone can verify it from the file alone. Steps are charged *before* training starts: a round
that crashes or whose update is never sent is still counted (conservatively, in full).

Writes are atomic and durable (``common.atomic``): temp file, fsync, rename, fsync folder.
A crash at any point leaves either the old or the new ledger, never a torn one. A ledger that
cannot be parsed is never replaced by an empty one (that would reset the privacy spent to
zero): it raises ``LedgerCorrupt``.

Rollback protection: ε must never go down, so the ledger may not be deleted or replaced by an
older copy. Every write increments ``sequence`` and extends a hash chain, ``chain = SHA-256(
previous_chain ‖ "\n" ‖ canonical JSON of the ledger without its two chain fields)``, starting
from 64 zeros (:func:`chain_of`). Each write is followed by a ``ledger-state`` line in the
hospital's audit log (``client.audit``) recording (sequence, chain). Opening with the audit log
(``audit_path``) then refuses, before anything is trained:

- a missing ledger when the audit log shows the hospital spent privacy before (``LedgerMissing``);
- a ledger whose sequence is below the newest recorded one, or equal with another chain, or
  one step ahead without following the recorded chain or without every recorded charge
  (the line also holds :func:`accounting_digest`) (``LedgerRolledBack``);
- a ledger more than one step ahead of the log: the log lost lines (``AuditLogBehind``);
- a ledger whose content does not hash to its own ``chain`` (``LedgerCorrupt``: edited by hand).

A ledger exactly one step ahead (a crash between the ledger write and the audit line) is
accepted and the missing line appended; a ledger written before ``sequence`` existed, next to an
audit log without ledger-state lines, is accepted and gets its first sequence. Out of scope:
someone who rewrites the ledger and the audit log consistently (the chain is not keyed).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from client.audit import AuditEntry, LedgerStateEntry, append_entry, latest_ledger_state, read_records
from common.atomic import exclusive_lock, json_safe, write_json_atomic
from common.dp.accounting import Charge, epsilon_of
from common.errors import UserError

FORMAT = 2  # 2: sequence and hash chain (format 1 files are migrated on their first open)
GENESIS_CHAIN = "0" * 64  # the chain value "before" a ledger's first write
_CHAIN_FIELDS = ("previous_chain", "chain")


class LedgerCorrupt(UserError):
    """The ledger file exists but cannot be read; training is refused until a person looks."""


class AccountingMismatch(RuntimeError):
    """The optimizer took other steps than the ledger charged: a bug, so nothing is sent."""


class LedgerMismatch(UserError):
    """The run asks for an accounting setting (delta, accountant) other than the ledger's."""


class LedgerMissing(UserError):
    """No ledger file, but the audit log shows this hospital spent privacy: it must be restored."""


class LedgerRolledBack(UserError):
    """The ledger is older than, or differs from, the ledger state the audit log recorded."""


class AuditLogBehind(UserError):
    """The ledger is more than one write ahead of the audit log's newest ledger-state line."""


def _canonical(obj: Any) -> bytes:
    """JSON with sorted keys, no spaces, NaN/inf as null: the same bytes for the same content."""
    return json.dumps(json_safe(obj), sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def chain_of(previous_chain: str, state: dict[str, Any]) -> str:
    """The chain value of ``state``: SHA-256 over the previous value and the canonical JSON of the
    state without its chain fields."""
    body = {k: v for k, v in state.items() if k not in _CHAIN_FIELDS}
    return hashlib.sha256(previous_chain.encode("ascii") + b"\n" + _canonical(body)).hexdigest()


def accounting_digest(state: dict[str, Any], charges: int) -> str:
    """SHA-256 of what ε is computed from: the accountant, δ and the first ``charges`` history
    entries. A ledger one write ahead of the audit log must match the recorded digest on the
    recorded number of charges: it may add a charge, never drop or change one."""
    body = {"accountant": state["accountant"], "delta": state["delta"], "history": state["history"][:charges]}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _is_chain(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _history_in_audit_log(audit_path: Path) -> str | None:
    """What in the audit log shows the hospital had a ledger (None: nothing does)."""
    records = read_records(audit_path)
    states = [r for r in records if isinstance(r, LedgerStateEntry)]
    spent = [r for r in records if isinstance(r, AuditEntry) and r.status in ("ok", "budget-exhausted")]
    if states:
        newest = max(states, key=lambda r: r.sequence)
        return (f"the ledger was written {len(states)} time(s) there, last at sequence {newest.sequence} "
                f"with {newest.total_steps} DP steps charged")
    if spent:
        eps = [r.epsilon for r in spent if r.epsilon is not None]
        last = f", the last with ε = {eps[-1]:.4f}" if eps else ""
        return f"{len(spent)} training repl{'y' if len(spent) == 1 else 'ies'} left this hospital{last}"
    return None


def _last_reported_epsilon(audit_path: Path) -> str:
    """A sentence with the last ε the hospital reported, per its audit log ('' when none)."""
    eps = [r.epsilon for r in read_records(audit_path) if isinstance(r, AuditEntry) and r.epsilon is not None]
    return f" The last ε this hospital reported, per the audit log, was {eps[-1]:.4f}." if eps else ""


# How an opened ledger stands against the audit log: the recorded state; one write ahead of it
# (a crash before the audit line); or written before sequences existed, with nothing recorded.
Verdict = Literal["current", "one-ahead", "unsequenced"]


@dataclass(frozen=True)
class LedgerEntry:
    """One charge: ``steps`` steps at (σ, q) in round ``round`` of Flower run ``run``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    run: int
    round: int
    charged_at: str

    @property
    def charge(self) -> Charge:
        return Charge(self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class NoisePlan:
    """The noise multiplier a hospital fixed for a run, and the sample rate it assumed."""

    noise_multiplier: float
    sample_rate: float


class PrivacyLedger:
    """Read-modify-write access to one ledger file, under an exclusive file lock."""

    def __init__(self, path: Path, state: dict[str, Any], *, audit_path: Path | None = None) -> None:
        self.path = path
        self._state = state
        self.audit_path = audit_path  # where each write's ledger-state line goes; None: nowhere

    # ---- opening -------------------------------------------------------------------------
    @staticmethod
    def read(path: Path, *, audit_path: Path | None = None) -> PrivacyLedger:
        """Open an existing ledger read-only (for reports); raises ``LedgerCorrupt``.

        With ``audit_path`` the ledger is also checked against the audit log, as
        :meth:`open` does, without writing anything: ``LedgerMissing``, ``LedgerRolledBack``,
        ``AuditLogBehind``. A missing file the audit log knows nothing of raises ``FileNotFoundError``.
        """
        if audit_path is not None and not path.exists():
            PrivacyLedger._refuse_fresh_ledger(path, audit_path)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise LedgerCorrupt(
                f"privacy ledger {path} is unreadable ({exc}); restore it from backup — "
                "training stays refused because the privacy spent cannot be known"
            ) from exc
        if not isinstance(state, dict):
            raise LedgerCorrupt(f"privacy ledger {path} is not a JSON object; restore it from backup")
        for key in ("accountant", "delta", "epsilon_budget", "history"):
            if key not in state:
                raise LedgerCorrupt(f"privacy ledger {path} lacks '{key}'; restore it from backup")
        ledger = PrivacyLedger(path, state)
        ledger._check_own_chain()
        if audit_path is not None:
            ledger._verdict(audit_path)
        return ledger

    @staticmethod
    def open(
        path: Path,
        *,
        site: str,
        accountant: str,
        delta: float,
        epsilon_budget: float,
        audit_path: Path | None = None,
    ) -> PrivacyLedger:
        """Open or create. The ledger's delta and accountant are fixed at creation.

        ``audit_path`` is the hospital's audit log: every write then appends a ledger-state line
        to it, and the ledger is checked against it first (see the module docstring). ``None``
        (tools and tests without an audit log) skips both: a missing ledger is created.
        """
        if not path.exists():
            if audit_path is not None:
                PrivacyLedger._refuse_fresh_ledger(path, audit_path)
            ledger = PrivacyLedger(
                path,
                {
                    "format": FORMAT,
                    "site": site,
                    "accountant": accountant,
                    "delta": delta,
                    "epsilon_budget": epsilon_budget,
                    "history": [],
                    "plans": {},
                },
                audit_path=audit_path,
            )
            ledger._save()
            return ledger
        ledger = PrivacyLedger.read(path)
        verdict = ledger._verdict(audit_path) if audit_path is not None else "current"
        if ledger.accountant != accountant or ledger.delta != delta:
            raise LedgerMismatch(
                f"ledger {path} accounts with {ledger.accountant} at δ={ledger.delta}, the run asks for "
                f"{accountant} at δ={delta}; run with the ledger's settings"
            )
        ledger.audit_path = audit_path
        if verdict == "unsequenced":  # written before rollback protection: its first sequence
            ledger._save()
        elif verdict == "one-ahead":  # crashed between the ledger write and its audit line
            ledger._record_state()
        if ledger.epsilon_budget != epsilon_budget:  # the hospital changed its own budget
            ledger._state["epsilon_budget"] = epsilon_budget
            ledger._save()
        return ledger

    @staticmethod
    def _refuse_fresh_ledger(path: Path, audit_path: Path) -> None:
        """``LedgerMissing`` when the audit log shows a ledger existed: a new one would restart ε at 0."""
        evidence = _history_in_audit_log(audit_path)
        if evidence is not None:
            raise LedgerMissing(
                f"privacy ledger {path} is missing, but the audit log {audit_path} shows this hospital "
                f"has spent privacy before ({evidence}). A new ledger would count ε from 0, so training "
                f"is refused: restore {path.name} from backup (the newest copy) to {path}. Never delete "
                "the ledger to start over."
            )

    def _check_own_chain(self) -> None:
        """``LedgerCorrupt`` when a sequenced ledger's content does not hash to its ``chain``."""
        if "sequence" not in self._state:
            return
        seq, previous, chain = (self._state.get(k) for k in ("sequence", "previous_chain", "chain"))
        if not (isinstance(seq, int) and not isinstance(seq, bool) and seq >= 1 and isinstance(previous, str)
                and _is_chain(previous) and _is_chain(chain)):
            raise LedgerCorrupt(f"privacy ledger {self.path} has a malformed sequence or chain; restore it from backup")
        if chain_of(previous, self._state) != chain:
            raise LedgerCorrupt(
                f"privacy ledger {self.path} (sequence {seq}) does not match its own hash chain: it was "
                "changed outside medsynth after it was written (e.g. a charge removed). Training is refused: "
                "restore the ledger from backup; never edit it by hand."
            )

    def _verdict(self, audit_path: Path) -> Verdict:
        """Compare with the newest ledger state in the audit log; raise if this ledger is not it."""
        recorded = latest_ledger_state(audit_path)
        seq = self._state.get("sequence")
        if seq is None:
            if recorded is None:
                return "unsequenced"
            raise LedgerRolledBack(
                f"privacy ledger {self.path} has no sequence (written before rollback protection), but the "
                f"audit log {audit_path} recorded ledger sequence {recorded.sequence}: this is an older copy "
                "that lacks the charges written since, so its ε would be too low. Training is refused: restore "
                f"the ledger copy at sequence {recorded.sequence} or later from backup."
                + _last_reported_epsilon(audit_path)
            )
        r_seq = recorded.sequence if recorded is not None else 0
        r_chain = recorded.chain if recorded is not None else GENESIS_CHAIN
        chain, previous = self._state["chain"], self._state["previous_chain"]
        if seq < r_seq:
            raise LedgerRolledBack(
                f"privacy ledger {self.path} is at sequence {seq}, but the audit log {audit_path} recorded "
                f"sequence {r_seq}: this is an older copy that lacks the charges written since, so its ε "
                f"would be too low. Training is refused: restore the ledger copy at sequence {r_seq} from "
                f"backup; never put back an older copy.{_last_reported_epsilon(audit_path)}"
            )
        if seq == r_seq and chain != r_chain:
            raise LedgerRolledBack(
                f"privacy ledger {self.path} is at sequence {seq} and the audit log {audit_path} recorded "
                f"sequence {r_seq}, but with other content (chain {chain[:16]}… there {r_chain[:16]}…): the "
                "ledger was replaced or changed outside medsynth (e.g. a charge removed). Training is refused: "
                f"restore the ledger copy written at sequence {r_seq} from backup.{_last_reported_epsilon(audit_path)}"
            )
        if seq == r_seq:
            return "current"
        if seq == r_seq + 1:
            history = self._state["history"]
            extends = recorded is None or (
                len(history) >= recorded.charges
                and accounting_digest(self._state, recorded.charges) == recorded.accounting_sha256
            )
            if previous != r_chain or not extends:
                raise LedgerRolledBack(
                    f"privacy ledger {self.path} is at sequence {seq} but does not follow the state the audit "
                    f"log {audit_path} recorded at sequence {r_seq or 'none'}"
                    + ("" if previous != r_chain else " (charges recorded there are missing or changed)")
                    + ": the ledger was replaced or changed outside medsynth. Training is refused: restore "
                    f"the ledger copy at sequence {r_seq} or the one written right after it from backup."
                    + _last_reported_epsilon(audit_path)
                )
            return "one-ahead"
        raise AuditLogBehind(
            f"privacy ledger {self.path} is at sequence {seq}, but the newest ledger state in the audit log "
            f"{audit_path} is sequence {r_seq or 'none'}: the audit log lost lines (deleted, truncated or an "
            "older copy put back), so it no longer shows every message that left this hospital. The ledger "
            "is the newer file, so ε is not understated, but training is refused until the audit log is "
            "restored from backup."
        )

    @staticmethod
    @contextlib.contextmanager
    def locked(path: Path) -> Iterator[None]:
        """Exclusive lock for a read-modify-write cycle (one trainer per hospital at a time)."""
        with exclusive_lock(path):
            yield

    # ---- reading -------------------------------------------------------------------------
    @property
    def accountant(self) -> str:
        return str(self._state["accountant"])

    @property
    def delta(self) -> float:
        return float(self._state["delta"])

    @property
    def epsilon_budget(self) -> float:
        return float(self._state["epsilon_budget"])

    @property
    def entries(self) -> list[LedgerEntry]:
        return [LedgerEntry(**e) for e in self._state["history"]]

    @property
    def charges(self) -> list[Charge]:
        return [e.charge for e in self.entries]

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.entries)

    def epsilon(self) -> float:
        """Epsilon of the whole history at the ledger's delta."""
        return epsilon_of(self.charges, self.delta, self.accountant)

    def plan(self, run: int) -> NoisePlan | None:
        raw = self._state.get("plans", {}).get(str(run))
        return NoisePlan(**raw) if raw else None

    # ---- writing -------------------------------------------------------------------------
    def set_plan(self, run: int, plan: NoisePlan) -> None:
        self._state.setdefault("plans", {})[str(run)] = asdict(plan)
        self._save()

    def charge(self, charge: Charge, *, run: int, round: int) -> LedgerEntry:
        """Append a charge durably. Call before training: the steps count even if it fails."""
        entry = LedgerEntry(
            noise_multiplier=charge.noise_multiplier,
            sample_rate=charge.sample_rate,
            steps=charge.steps,
            run=run,
            round=round,
            charged_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        self._state["history"].append(asdict(entry))
        self._save()
        return entry

    @property
    def sequence(self) -> int:
        """How many times this ledger has been written since it had a sequence (0: never)."""
        return int(self._state.get("sequence", 0))

    @property
    def chain(self) -> str:
        """The hash chain after the last write (``GENESIS_CHAIN`` for a ledger without one)."""
        return str(self._state.get("chain", GENESIS_CHAIN))

    def _save(self) -> None:
        """Write the next sequence durably, then record it in the audit log (if there is one).

        The in-memory state changes only once the file is written, so a failed write leaves this
        object as the file on disk is. A crash before the audit line leaves the ledger one step
        ahead of the log, which the next :meth:`open` accepts and completes.
        """
        state = {**self._state, "format": FORMAT, "sequence": self.sequence + 1, "previous_chain": self.chain}
        state["chain"] = chain_of(state["previous_chain"], state)
        write_json_atomic(self.path, state, mode=0o600)
        self._state = state
        self._record_state()

    def _record_state(self) -> None:
        """Append this ledger's (sequence, chain) to the audit log; nothing without an audit log."""
        if self.audit_path is None:
            return
        append_entry(
            self.audit_path,
            LedgerStateEntry(
                time=time.time(),
                site=str(self._state.get("site", "")),
                ledger=str(self.path),
                sequence=self.sequence,
                chain=self.chain,
                total_steps=self.total_steps,
                charges=len(self._state["history"]),
                accounting_sha256=accounting_digest(self._state, len(self._state["history"])),
            ),
        )
