"""audit.json: what the audit writes is what the report reads, and nothing else is accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.audit_record import AUDIT_FILE, AuditFinding, AuditRecordError, AuditReport, read_audit, write_audit


def _finding(**over: object) -> AuditFinding:
    base: dict[str, object] = dict(attack="one-run", target="DP-SGD updates", run="ε = 10, seed 0",
                                   claimed_epsilon=10.0, epsilon_lower_bound=0.4, confidence=0.95, auc=None,
                                   tpr_at_1pct_fpr=None, tpr_at_01pct_fpr=None, detail="1000 canaries")
    base.update(over)
    return AuditFinding(**base)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    report = AuditReport((_finding(), _finding(attack="DOMIAS", claimed_epsilon=None, auc=0.71,
                                               tpr_at_1pct_fpr=0.05, tpr_at_01pct_fpr=0.01)))
    write_audit(tmp_path, report)
    assert read_audit(tmp_path) == report


def test_no_audit_is_none(tmp_path: Path) -> None:
    assert read_audit(tmp_path) is None


@pytest.mark.parametrize("edit", [{"extra": 1}, {"auc": "high"}, {"epsilon_lower_bound": -1.0}, {"confidence": 1.0}])
def test_strict(tmp_path: Path, edit: dict[str, object]) -> None:
    write_audit(tmp_path, AuditReport((_finding(),)))
    data = json.loads((tmp_path / AUDIT_FILE).read_text())
    data["findings"][0].update(edit)
    (tmp_path / AUDIT_FILE).write_text(json.dumps(data))
    with pytest.raises(AuditRecordError):
        read_audit(tmp_path)


def test_exceeds_claim() -> None:
    assert _finding(epsilon_lower_bound=12.0).exceeds_claim
    assert not _finding(epsilon_lower_bound=0.4).exceeds_claim
    assert not _finding(claimed_epsilon=None, epsilon_lower_bound=50.0).exceeds_claim
