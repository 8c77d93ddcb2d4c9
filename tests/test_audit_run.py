"""``medsynth audit`` end to end on a tiny federation, and its command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.audit_record import AuditFinding, read_audit
from common.config import ConfigError
from simulation.audit.membership import ATTACKS, CONTROL, AttackSettings
from simulation.audit.mia_runs import GridSettings
from simulation.audit.run import AuditOptions, audit
from simulation.bench_audit import chance_se, goals

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_tiny_audit_writes_its_findings_and_the_reports(tmp_path: Path) -> None:
    # prepare: 2 phantom hospitals of 12 patients, one round of 4 steps, 64 canaries; the membership
    # part on 4 × 4 member patients and 16 non-members, one round of 2 steps, small attacks
    opts = AuditOptions(out=tmp_path, sites=2, partition="iid", patients_per_site=12, epsilons=(1.0,),
                        control=False, broken=1.0, rounds=1, local_steps=4, canaries=64,
                        grid=GridSettings(members_per_site=4, rounds=1, local_steps=2, pretrain_steps=5,
                                          non_members=16),
                        attack_settings=AttackSettings(n_synthetic=40, latent_steps=2))
    # act
    report = audit(opts, say=lambda line: None)
    # assert: one one-run finding per run, the ledger's ε as the claim, the DP run within it
    assert read_audit(tmp_path) == report
    dp, broken, *membership = report.findings
    assert dp.claimed_epsilon == pytest.approx(1.0, abs=0.02) and broken.claimed_epsilon == dp.claimed_epsilon
    assert dp.claimed_epsilon is not None and dp.epsilon_lower_bound <= dp.claimed_epsilon
    assert "64 canaries" in dp.detail and broken.detail.startswith("broken control")
    # assert: the membership part attacked the ε = 1 federation with every attack and its control
    assert len(membership) == 2 * len(ATTACKS) and {f.run for f in membership} == {"phantoms, ε = 1, seed 0"}
    assert all(f.auc is not None and f.claimed_epsilon == pytest.approx(1.0, abs=0.02) for f in membership)
    pages = sorted(tmp_path.glob("*/report.html")) + sorted(tmp_path.glob("membership/*/report.html"))
    assert len(pages) == 3 and all("Empirical privacy" in p.read_text() for p in pages)


def test_an_impossible_setting_is_refused() -> None:
    with pytest.raises(ConfigError):
        audit(AuditOptions(out=Path("unused"), confidence=1.0))


def test_help_says_it_is_a_lower_bound() -> None:
    done = subprocess.run([sys.executable, "-m", "medsynth", "audit", "--help"], capture_output=True, text=True,
                          cwd=REPO, check=False, timeout=300)
    text = " ".join(done.stdout.split())
    assert done.returncode == 0 and "LOWER BOUND" in text and "not a proof" in text


def _finding(attack: str, run: str, claim: float | None, bound: float, auc: float | None = None,
             tpr: float | None = None, detail: str = "dp; 10 right") -> AuditFinding:
    return AuditFinding(attack=attack, target="t", run=run, claimed_epsilon=claim, epsilon_lower_bound=bound,
                        confidence=0.95, auc=auc, tpr_at_1pct_fpr=tpr, tpr_at_01pct_fpr=tpr, detail=detail)


def test_the_benchmark_reads_each_goal_off_the_findings() -> None:
    # prepare: a DP run within its claim, a broken control caught, membership attacks at ε = 10 within
    # the goal but one at ε = 1 above it, a non-private control above chance on one seed only
    findings = [
        _finding("one-run", "ε = 1, seed 0", 1.0, 0.0),
        _finding("one-run", "broken, seed 0", 1.0, 1.4, detail="broken control (σ × 1e-3); 345 right"),
        _finding("DOMIAS", "ε = 10, seed 0", 10.0, 0.0, auc=0.53, tpr=0.004),
        _finding("DOMIAS", "ε = 1, seed 0", 1.0, 0.0, auc=0.57, tpr=0.004),
        _finding("DOMIAS" + CONTROL, "ε = 1, seed 0", 1.0, 0.0, auc=0.70, tpr=0.5),  # a control: not a goal
        _finding("discriminator logit", "no DP, seed 0", None, 0.5, auc=0.68, tpr=0.02),
        _finding("discriminator logit", "no DP, seed 1", None, 0.0, auc=0.53, tpr=0.0),
    ]
    # act
    lines = goals(findings, members=512, non_members=512)
    # assert: the line of each goal, in order, with its verdict
    assert len(lines) == 5 and "every lower bound ≤ its claim" in lines[0] and "broken control" in lines[1]
    verdicts = [("NOT met" if "NOT met" in line else "met") for line in lines]
    assert verdicts == ["met", "met", "met", "NOT met", "NOT met"]
    assert "ε = 10" in lines[2] and "ε = 1:" in lines[3] and "0.570" in lines[3]
    assert "0.680, 0.530" in lines[4] and f"{0.5 + 3 * chance_se(512, 512):.3f}" in lines[4]


def test_the_chance_level_of_an_auc_shrinks_with_the_queries() -> None:
    # Hanley–McNeil at AUC 0.5: √((m + n + 1) / (12 m n)); 128 + 128 queries: 0.036, 512 + 512: 0.018,
    # 512 members + 4096 non-members: 0.0135
    assert chance_se(128, 128) == pytest.approx(0.0361, abs=1e-4)
    assert chance_se(512, 512) == pytest.approx(0.0180, abs=1e-4)
    assert chance_se(512, 4096) == pytest.approx(0.0135, abs=1e-4)
