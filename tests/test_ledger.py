"""The per-site privacy ledger: durable, atomic, never silently reset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from client.ledger import LedgerCorrupt, LedgerMismatch, PrivacyLedger
from common.dp.accounting import Charge, epsilon_of


def _open(path: Path, budget: float = 10.0) -> PrivacyLedger:
    return PrivacyLedger.open(path, site="site-0", accountant="prv", delta=1e-5, epsilon_budget=budget)


def test_ledger_survives_a_process_restart(tmp_path: Path) -> None:
    # prepare
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    ledger.charge(Charge(1.1, 0.05, 20), run=7, round=1)
    ledger.charge(Charge(1.1, 0.05, 20), run=7, round=2)
    # act: a new process would do exactly this
    reopened = _open(path)
    # assert
    assert [(e.run, e.round, e.steps) for e in reopened.entries] == [(7, 1, 20), (7, 2, 20)]
    assert reopened.epsilon() == pytest.approx(epsilon_of([Charge(1.1, 0.05, 40)], 1e-5))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    raw = json.loads(path.read_text())
    assert {"accountant", "delta", "epsilon_budget", "history"} <= raw.keys()
    assert set(raw["history"][0]) >= {"noise_multiplier", "sample_rate", "steps", "run", "round"}


def test_torn_write_leaves_previous_ledger_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: one committed charge, then a crash between writing the temp file and renaming
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    ledger.charge(Charge(1.0, 0.1, 5), run=1, round=1)

    def crash(src: object, dst: object) -> None:
        raise OSError("power lost")

    monkeypatch.setattr(os, "replace", crash)
    # act
    with pytest.raises(OSError, match="power lost"):
        ledger.charge(Charge(1.0, 0.1, 5), run=1, round=2)
    monkeypatch.undo()
    # assert: the previous ledger is intact and readable
    assert [e.round for e in _open(path).entries] == [1]


def test_corrupt_ledger_is_never_reset_to_zero(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _open(path).charge(Charge(1.0, 0.1, 5), run=1, round=1)
    path.write_text(path.read_text()[:40])  # damaged outside our control
    with pytest.raises(LedgerCorrupt, match="restore it from backup"):
        _open(path)


def test_ledger_refuses_another_delta(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _open(path)
    with pytest.raises(LedgerMismatch):
        PrivacyLedger.open(path, site="site-0", accountant="prv", delta=1e-6, epsilon_budget=10.0)
