"""``medsynth audit`` end to end on a tiny federation, and its command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.audit_record import read_audit
from common.config import ConfigError
from simulation.audit.membership import ATTACKS, AttackSettings
from simulation.audit.mia_runs import GridSettings
from simulation.audit.run import AuditOptions, audit

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_tiny_audit_writes_its_findings_and_the_reports(tmp_path: Path) -> None:
    # prepare: 2 phantom hospitals of 12 patients, one round of 4 steps, 64 canaries; the membership
    # part on 4 × 4 member patients, one round of 2 steps, small attacks
    opts = AuditOptions(out=tmp_path, sites=2, partition="iid", patients_per_site=12, epsilons=(1.0,),
                        control=False, broken=1.0, rounds=1, local_steps=4, canaries=64,
                        grid=GridSettings(members_per_site=4, rounds=1, local_steps=2, pretrain_steps=5),
                        attack_settings=AttackSettings(n_synthetic=40, latent_steps=2))
    # act
    report = audit(opts, say=lambda line: None)
    # assert: one one-run finding per run, the ledger's ε as the claim, the DP run within it
    assert read_audit(tmp_path) == report
    dp, broken, *membership = report.findings
    assert dp.claimed_epsilon == pytest.approx(1.0, abs=0.02) and broken.claimed_epsilon == dp.claimed_epsilon
    assert dp.epsilon_lower_bound <= dp.claimed_epsilon
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
