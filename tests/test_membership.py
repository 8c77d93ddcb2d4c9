"""Membership inference statistics on known cases (issue 16): AUC, TPR at a low FPR, and the ε lower
bound, which must stay below the ε of a mechanism that has it and catch one without noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from common.config import ModelConfig
from common.evaluation.reference import LabelledImages
from common.models import build_models
from simulation.audit.membership import (
    ATTACKS,
    AttackSettings,
    MembershipData,
    ReleasedModel,
    domias_scores,
    epsilon_lower_bound,
    epsilon_lower_bound_at,
    gan_leaks_calibrated_scores,
    gan_leaks_full_scores,
    membership_findings,
    roc_auc,
    tpr_at_fpr,
)
from simulation.audit.mia_runs import phantom_split


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact ε at δ of a Gaussian mechanism with sensitivity / σ = mu (μ-GDP; Dong, Roth, Su 2022)."""
    def excess(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)) - delta
    return float(brentq(excess, 0.0, 50.0))


def test_auc_matches_sklearn_with_ties_and_known_extremes() -> None:
    # prepare: scores on a coarse grid so that ties occur
    rng = np.random.default_rng(0)
    members, non_members = rng.integers(0, 5, 300).astype(float), rng.integers(0, 4, 200).astype(float)
    # act
    auc = roc_auc(members, non_members)
    # assert
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[members, non_members])
    assert auc == pytest.approx(expected, abs=1e-12)
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.ones(5), np.ones(7)) == 0.5


def test_tpr_at_fpr_reads_the_step_roc_without_interpolation() -> None:
    # prepare: 10 non-members 0..9, members 5..14
    members, non_members = np.arange(5, 15, dtype=float), np.arange(10, dtype=float)
    # act / assert: FPR ≤ 10 % allows one false positive (score 9): t ∈ (8, 9], members ≥ 9 → 6/10
    assert tpr_at_fpr(members, non_members, 0.1) == 0.6
    # FPR ≤ 1 % of 10 non-members allows none: t > 9 → members 10..14
    assert tpr_at_fpr(members, non_members, 0.01) == 0.5
    assert tpr_at_fpr(members, non_members, 1.0) == 1.0


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_randomized_response_gives_a_bound_at_most_its_epsilon(eps: float) -> None:
    # prepare: ε-DP randomized response: a member says 1 w.p. e^ε/(1+e^ε), a non-member w.p. 1/(1+e^ε)
    rng = np.random.default_rng(1)
    p = math.exp(eps) / (1 + math.exp(eps))
    members = (rng.random(20000) < p).astype(float)
    non_members = (rng.random(20000) < 1 - p).astype(float)
    # act
    bound = epsilon_lower_bound(members, non_members, seed=0, delta=0.0)
    # assert: valid, and tight to within the sampling error of 10,000 evaluation draws per side
    assert bound.epsilon <= eps
    assert bound.epsilon >= 0.85 * eps


def test_gaussian_shift_gives_a_bound_at_most_the_mechanisms_epsilon() -> None:
    # prepare: scores of a Gaussian mechanism, members shifted by μ = 2 (μ-GDP)
    rng = np.random.default_rng(2)
    mu, delta = 2.0, 1e-5
    members, non_members = rng.normal(mu, 1.0, 20000), rng.normal(0.0, 1.0, 20000)
    # act
    bound = epsilon_lower_bound(members, non_members, seed=0, delta=delta)
    # assert: below the true ε(δ = 1e-5) of 2-GDP (≈ 10.0); 10,000 evaluated draws per side reach
    # only the tail FPR ≈ 1e-4, where the ratio of the two densities is e^≈4.5
    true_eps = gaussian_epsilon(mu, delta)
    assert true_eps == pytest.approx(10.0, abs=0.01)
    assert 3.5 < bound.epsilon <= true_eps


def test_a_mechanism_without_noise_is_caught_up_to_the_sample_size() -> None:
    # prepare: perfectly separated scores of 400 members and 400 non-members (no noise at all)
    members, non_members = np.arange(400, 800, dtype=float), np.arange(400, dtype=float)
    # act
    bound = epsilon_lower_bound(members, non_members, seed=0)
    # assert: 200 vs 200 evaluated, all correct: log((p - δ)/(1 - p)), p = 0.025^(1/200) (Clopper–Pearson)
    p = 0.025 ** (1 / 200)
    assert bound.epsilon == pytest.approx(math.log((p - 1e-5) / (1 - p)), abs=1e-9)
    assert bound.epsilon > 3.5  # well above ε = 1: a claim of ε = 1 would be refuted
    assert (bound.true_positives, bound.false_positives) == (200, 0)


def test_identical_distributions_give_about_zero() -> None:
    # prepare: members and non-members from one distribution
    rng = np.random.default_rng(3)
    members, non_members = rng.normal(size=500), rng.normal(size=500)
    # act
    bound = epsilon_lower_bound(members, non_members, seed=0)
    # assert
    assert bound.epsilon < 0.1


def test_counts_bound_is_monotone_and_zero_without_evidence() -> None:
    # act
    none = float(epsilon_lower_bound_at(50, 100, 50, 100))
    more = epsilon_lower_bound_at(np.array([60, 80, 100]), 100, 0, 100)
    # assert
    assert none == 0.0
    assert np.all(np.diff(more) > 0)


def _images(rng: np.random.Generator, n: int, size: int = 8) -> LabelledImages:
    return LabelledImages(np.tanh(rng.normal(size=(n, 1, size, size))).astype(np.float32),
                          rng.integers(0, 2, n).astype(np.int64))


def test_gan_leaks_and_domias_catch_a_synthetic_set_that_copies_its_members() -> None:
    # prepare: 60 members, 60 non-members, a reference; the "synthetic set" is the members plus small noise
    rng = np.random.default_rng(4)
    members, non_members, reference = _images(rng, 60), _images(rng, 60), _images(rng, 200)
    copies = members.images + 0.05 * rng.normal(size=members.images.shape).astype(np.float32)
    # act
    full = [gan_leaks_full_scores(x, copies) for x in (members, non_members)]
    calibrated = [gan_leaks_calibrated_scores(x, copies, reference.images) for x in (members, non_members)]
    domias = [domias_scores(x, copies, reference.images, dims=4) for x in (members, non_members)]
    # assert: every member has a copy, no non-member has: full separation; the density ratio sees it too
    assert roc_auc(*full) == 1.0 and roc_auc(*calibrated) == 1.0
    assert roc_auc(*domias) > 0.8
    assert epsilon_lower_bound(*full, seed=0).epsilon > 2.0


def test_membership_findings_of_a_tiny_model_name_every_attack_and_its_control() -> None:
    # prepare: an untrained tiny conditional model (it has seen nobody: no attack should find much)
    cfg = ModelConfig(image_size=32, latent_dim=8, g_width=4, d_width=4, num_classes=2, conditional=True,
                      aux_classifier=True, upsample="resize", pairs=False)
    netG, netD = build_models(cfg, seed=0)
    rng = np.random.default_rng(5)
    data = MembershipData(_images(rng, 40, 32), _images(rng, 40, 32), _images(rng, 80, 32))
    # act
    findings = membership_findings(ReleasedModel(netG.eval(), netD.eval(), cfg), data, run="tiny", claimed_epsilon=1.0,
                                   seed=0, settings=AttackSettings(n_synthetic=50, latent_steps=2), say=lambda _: None)
    # assert: 5 attacks, 5 controls; targets as the record names them; rates are rates
    assert [f.attack for f in findings[:5]] == [a.name for a in ATTACKS]
    assert all(f.attack.endswith("(member-vs-member control)") for f in findings[5:]) and len(findings) == 10
    assert {f.target for f in findings} == {"discriminator", "generator", "synthetic set"}
    for f in findings:
        assert f.auc is not None and 0.0 <= f.auc <= 1.0 and f.claimed_epsilon == 1.0 and f.confidence == 0.95
        assert f.tpr_at_01pct_fpr is not None and f.tpr_at_1pct_fpr is not None
        assert f.tpr_at_01pct_fpr <= f.tpr_at_1pct_fpr
        assert not f.exceeds_claim


def test_phantom_split_keeps_members_and_non_members_apart() -> None:
    # act
    split = phantom_split(members_per_site=3, seed=7, size=16, reference_patients=5)
    # assert: 4 sites × 3 member patients (2 images each); queries: one image per patient, none shared
    assert [s.num_patients for s in split.sites] == [3, 3, 3, 3]
    members = {x.tobytes() for x in split.data.members.images}
    trained = {x.tobytes() for s in split.sites for x in s.images}
    assert members <= trained
    assert not {x.tobytes() for x in split.data.non_members.images} & trained
    assert len(split.data.members) == len(split.data.non_members) == 12


def test_the_splits_query_as_many_non_members_as_asked() -> None:
    # act: 4 × 2 members, 20 non-members
    split = phantom_split(members_per_site=2, seed=3, size=16, reference_patients=5, non_members=20)
    # assert: every member trained at one site, 20 non-member queries none of which trained
    assert len(split.data.members) == 8 and len(split.data.non_members) == 20
    trained = {x.tobytes() for s in split.sites for x in s.images}
    assert not {x.tobytes() for x in split.data.non_members.images} & trained
