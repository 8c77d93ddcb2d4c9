"""A hospital's persistent privacy ledger: every DP step it ever took, across rounds and runs.

File format (JSON, one per hospital)::

    {"format": 1, "site": "site-0", "accountant": "prv", "delta": 1e-05,
     "epsilon_budget": 10.0,
     "history": [{"noise_multiplier": 0.9, "sample_rate": 0.1, "steps": 20,
                  "run": 123, "round": 1, "charged_at": "2026-…Z"}, …],
     "plans": {"123": {"noise_multiplier": 0.9, "sample_rate": 0.1}}}

Epsilon is always recomputed from the whole ``history`` (``common.privacy.epsilon_of``), so
anyone can verify it from the file alone. Steps are charged *before* training starts: a round
that crashes or whose update is never sent is still counted (conservatively, in full).

Writes are atomic and durable (``common.atomic``): temp file, fsync, rename, fsync folder.
A crash at any point leaves either the old or the new ledger, never a torn one. A ledger that
cannot be parsed is never replaced by an empty one (that would reset the privacy spent to
zero): it raises ``LedgerCorrupt``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.atomic import write_json_atomic
from common.privacy import Charge, epsilon_of

FORMAT = 1


class LedgerCorrupt(Exception):
    """The ledger file exists but cannot be read; training is refused until a person looks."""


class AccountingMismatch(RuntimeError):
    """The optimizer took other steps than the ledger charged: a bug, so nothing is sent."""


class LedgerMismatch(Exception):
    """The run asks for an accounting setting (delta, accountant) other than the ledger's."""


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

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path = path
        self._state = state

    # ---- opening -------------------------------------------------------------------------
    @staticmethod
    def read(path: Path) -> PrivacyLedger:
        """Open an existing ledger read-only (for reports); raises ``LedgerCorrupt``."""
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise LedgerCorrupt(
                f"privacy ledger {path} is unreadable ({exc}); restore it from backup — "
                "training stays refused because the privacy spent cannot be known"
            ) from exc
        for key in ("accountant", "delta", "epsilon_budget", "history"):
            if key not in state:
                raise LedgerCorrupt(f"privacy ledger {path} lacks '{key}'; restore it from backup")
        return PrivacyLedger(path, state)

    @staticmethod
    def open(
        path: Path, *, site: str, accountant: str, delta: float, epsilon_budget: float
    ) -> PrivacyLedger:
        """Open or create. The ledger's delta and accountant are fixed at creation."""
        if not path.exists():
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
            )
            ledger._save()
            return ledger
        ledger = PrivacyLedger.read(path)
        if ledger.accountant != accountant or ledger.delta != delta:
            raise LedgerMismatch(
                f"ledger {path} accounts with {ledger.accountant} at δ={ledger.delta}, the run asks for "
                f"{accountant} at δ={delta}; run with the ledger's settings"
            )
        if ledger.epsilon_budget != epsilon_budget:  # the hospital changed its own budget
            ledger._state["epsilon_budget"] = epsilon_budget
            ledger._save()
        return ledger

    @staticmethod
    @contextlib.contextmanager
    def locked(path: Path) -> Iterator[None]:
        """Exclusive lock for a read-modify-write cycle (one trainer per hospital at a time)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

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

    def _save(self) -> None:
        write_json_atomic(self.path, self._state, mode=0o600)
