"""The record of an empirical privacy audit (``medsynth audit``): one typed finding per attack and run.

An audit runs attacks against what a federation releases or shows the server, and turns each
attack's success into a *lower bound* on ε at a stated confidence: what an attacker demonstrably
learned. The claimed ε (from the ledgers) is an upper bound; a correct implementation keeps every
lower bound at or below it, and a broken control (no noise, no clipping) must exceed it, or the
audit could not fail. Two kinds of attack write findings here:

* the one-run audit of DP training (Steinke, Nasr, Jagielski, "Privacy auditing with one (1)
  training run", NeurIPS 2023): canaries included at random, scored from the per-round global
  models the server sees;
* membership inference on the released artefacts (the generator, the synthetic set, the global
  discriminator every hospital receives), with held-out non-members: AUC and the true-positive
  rate at a low false-positive rate, and the ε bound that (TPR, FPR) implies.

The simulation harness is the one writer (``write_audit``) and the run report the reader
(``read_audit``). JSON shape (``audit.json`` in the run folder)::

    {"findings": [{"attack": "one-run", "target": "DP-SGD updates", "run": "ε = 10, seed 0",
                   "claimed_epsilon": 10.0, "epsilon_lower_bound": 0.4, "confidence": 0.95,
                   "auc": null, "tpr_at_1pct_fpr": null, "tpr_at_01pct_fpr": null,
                   "detail": "1000 canaries, 200 guesses, 120 correct"}, …]}

``claimed_epsilon`` is ``null`` for a non-private control; the three rates are ``null`` where an
attack does not produce them. Reading is strict: unknown or missing keys and wrong types are an
``AuditRecordError`` naming the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from common.atomic import write_json_atomic
from common.errors import UserError

AUDIT_FILE = "audit.json"


class AuditRecordError(UserError, ValueError):
    """``audit.json`` does not have the shape :func:`write_audit` writes."""


@dataclass(frozen=True)
class AuditFinding:
    """One attack against one run: what it achieved, as an ε lower bound at ``confidence``."""

    attack: str  # e.g. "one-run", "GAN-Leaks", "DOMIAS", "discriminator logits"
    target: str  # e.g. "DP-SGD updates", "generator", "synthetic set", "discriminator"
    run: str  # a human label of the audited run, e.g. "ε = 10, seed 0" or "no DP (control)"
    claimed_epsilon: float | None  # the ledgers' ε; None for a non-private control
    epsilon_lower_bound: float  # ≥ 0; what the attack demonstrates at `confidence`
    confidence: float  # in (0, 1), e.g. 0.95
    auc: float | None  # ROC AUC of the attack's scores (members positive)
    tpr_at_1pct_fpr: float | None
    tpr_at_01pct_fpr: float | None
    detail: str  # one line: sizes, guesses, thresholds

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not self.epsilon_lower_bound >= 0.0:
            raise ValueError(f"an ε lower bound is >= 0, got {self.epsilon_lower_bound}")

    @property
    def exceeds_claim(self) -> bool:
        """True when the attack demonstrates more privacy loss than the ledgers claim."""
        return self.claimed_epsilon is not None and self.epsilon_lower_bound > self.claimed_epsilon


@dataclass(frozen=True)
class AuditReport:
    """Every finding of one audit, in the order the attacks ran."""

    findings: tuple[AuditFinding, ...]


_OPTIONAL_FLOATS = {"claimed_epsilon", "auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr"}
_FLOATS = {"epsilon_lower_bound", "confidence"}
_STRINGS = {"attack", "target", "run", "detail"}


def write_audit(folder: Path, report: AuditReport) -> Path:
    """Write ``folder/audit.json`` atomically; returns its path."""
    path = folder / AUDIT_FILE
    write_json_atomic(path, {"findings": [asdict(f) for f in report.findings]})
    return path


def _finding(obj: object, where: str) -> AuditFinding:
    if not isinstance(obj, dict):
        raise AuditRecordError(f"{where}: expected an object, got {type(obj).__name__}")
    names = {f.name for f in fields(AuditFinding)}
    if set(obj) != names:
        raise AuditRecordError(f"{where}: unknown key(s) {sorted(set(obj) - names)}, "
                               f"missing key(s) {sorted(names - set(obj))}")
    values: dict[str, object] = {}
    for key, value in obj.items():
        if key in _STRINGS:
            if not isinstance(value, str):
                raise AuditRecordError(f"{where}: {key} must be a string")
            values[key] = value
        elif value is None and key in _OPTIONAL_FLOATS:
            values[key] = None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values[key] = float(value)
        else:
            raise AuditRecordError(f"{where}: {key} must be a number")
    try:
        return AuditFinding(**values)  # type: ignore[arg-type]
    except ValueError as exc:
        raise AuditRecordError(f"{where}: {exc}") from exc


def read_audit(folder: Path) -> AuditReport | None:
    """``folder/audit.json`` as an :class:`AuditReport`; None when no audit ran there."""
    path = folder / AUDIT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditRecordError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict) or set(data) != {"findings"} or not isinstance(data["findings"], list):
        raise AuditRecordError(f"{path}: expected {{\"findings\": [...]}}")
    findings = tuple(_finding(obj, f"{path} finding {i}") for i, obj in enumerate(data["findings"]))
    for f in findings:
        if f.auc is not None and not math.isfinite(f.auc):
            raise AuditRecordError(f"{path}: a finding's AUC is not finite")
    return AuditReport(findings)
