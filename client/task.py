"""A hospital's side of one round, as a typed function (the ClientApp only translates messages).

Order of operations, each step before the next:

0. check the received global model (the run's names and shapes, finite, in range: ``client.policy``);
1. read the prepared local dataset (the cache; DICOM files are not touched again);
2. fix the noise multiplier: the run's plan in the ledger, else calibrate so that the run's
   remaining rounds end at, never above, the run's target given everything already spent (the
   budget, or what other runs spent + ``max-epsilon-per-run``: ``common.dp.plan``) — or use
   the run's fixed σ when calibration is off; a σ above ``max-noise-multiplier`` is refused;
3. budget check: if this round would take ε above the target, do not train (typed status);
4. charge the round's steps to the ledger, durably;
5. train (private D, post-processing G) and check the accountant counted what was charged;
6. pack the update vector (delta, weight and losses together; see ``common.weights``).

Round 0 of a run with a warm start (``warm-start.budget-share`` > 0) is not a training round:
the hospital releases its class-conditional mean embedding once through the Gaussian mechanism
(``common.dp.embedding``), charged to the ledger as one step at q = 1 before it is computed, and
the later rounds' σ is calibrated on top of it. Every later round carries the summed release,
which anchors the G steps.

Everything that leaves is DP output or public: the delta is post-processing of the private D
steps; the weight is the public constant 1 (each contributing hospital counts once, so the sum
carries no patient count); the losses are computed on generated rows only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np

from client.ledger import AccountingMismatch, NoisePlan, PrivacyLedger
from client.policy import ModelRefused, check_global_model, check_noise_multiplier, check_warm_start
from client.prepare.pipeline import load_or_create_salt, prepare_site
from common.checkpoint import save_checkpoint
from common.config import ConfigError, RunConfig, SiteConfig
from common.dataset import DatasetError, LocalDataset, load_cache
from common.dp.accounting import Charge, PrivacyBudgetExceeded, check_budget, epsilon_of
from common.dp.embedding import Anchor, patient_sum
from common.dp.noise import ChaCha20Gaussian
from common.dp.plan import release_noise_multiplier, run_target, training_noise_multiplier
from common.dp.release import noisy_release
from common.dp.train import train_local_round
from common.dp.warm_start import WARM_START_ROUND, EmbeddingSpec
from common.models import build_models, select_device
from common.protocol.messages import SiteReply, Status
from common.round_record import SitePrivacyReport
from common.weights import PUBLIC_WEIGHT, UpdateLayout, load_model_arrays, model_arrays


def round_seed(run: RunConfig, site: SiteConfig, server_round: int) -> int | None:
    """``None`` (OS randomness) except in a simulation run with ``sim.deterministic-noise``.

    Deterministic noise lets a test compare secure and plain aggregation on identical updates;
    it is refused outside simulation because noise the server can recompute protects nothing.
    """
    if not run.federation.deterministic_noise:
        return None
    if not site.simulated:
        raise ConfigError("sim.deterministic-noise is for simulations only; this hospital refuses it")
    digest = hashlib.sha256(f"{run.federation.seed}|{site.site_id}|{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def load_site_dataset(site: SiteConfig, run: RunConfig) -> LocalDataset:
    """The site's prepared dataset; prepares the DICOM folder first if the cache is stale.

    In pair mode (``model.pairs``) each image is paired with its mask (``common.pairs``)."""
    prepare_site(
        site.data_dir,
        site.cache_dir,
        image_size=run.model.image_size,
        salt=load_or_create_salt(site.salt_path),
        class_names=site.class_names,
        progress=False,
        denoise=site.denoise,
        pairs=run.model.pairs,
    )
    data = load_cache(site.cache_dir)
    if data.pairs != run.model.pairs:  # the fingerprint covers the mode: only a hand-made cache gets here
        raise DatasetError(f"the prepared cache in {site.cache_dir} holds {'pairs' if data.pairs else 'images'} "
                           f"but the run trains {'pairs' if run.model.pairs else 'images'}; run prepare again")
    return data


def keep_global_model(
    site: SiteConfig, run: RunConfig, arrays: dict[str, np.ndarray], *, run_id: int, model_round: int,
    site_privacy: Mapping[str, SitePrivacyReport] | None = None,
) -> None:
    """Keep the newest global model the server sent, so ``medsynth node evaluate`` can judge it here.

    The global model is what every hospital receives anyway (a sum of masked updates, not this
    site's data); it is written under the site's state folder and never sent anywhere. Older
    copies are removed: one model is enough to evaluate and the folder must not grow per round.
    """
    if site.model_dir is None:
        return
    path = save_checkpoint(site.model_dir, model_round, arrays, [], class_names=run.class_names, run_id=run_id,
                           site_privacy=site_privacy)
    for older in site.model_dir.glob("round-*.safetensors"):
        if older != path:
            older.unlink(missing_ok=True)


def run_target_of(ledger: PrivacyLedger, site: SiteConfig, run_id: int) -> float:
    """The ε this run ends at, never above: the budget, or what other runs spent + ``max-epsilon-per-run``."""
    before = epsilon_of([e.charge for e in ledger.entries if e.run != run_id], ledger.delta, ledger.accountant)
    return run_target(before, budget=ledger.epsilon_budget, max_epsilon_per_run=site.max_epsilon_per_run)


def noise_for_round(
    ledger: PrivacyLedger, run: RunConfig, site: SiteConfig, *, run_id: int, server_round: int, target: float
) -> float:
    """σ for this round: fixed, or the run's calibrated plan (made at the site's first round).

    The plan covers the run's remaining rounds (``num_rounds − round + 1``) on top of the whole
    ledger history and ends at ``target`` (:func:`run_target_of`), so a resumed or later run only
    ever gets what is left. A σ above the hospital's ``max-noise-multiplier`` is refused
    (``NoiseRefused``) before the plan is kept or anything charged.
    """
    sample_rate = run.privacy.sample_rate
    plan = ledger.plan(run_id) if run.privacy.calibrate else None
    if plan is not None and plan.sample_rate == sample_rate:
        check_noise_multiplier(plan.noise_multiplier, site, calibrated=True)
        return plan.noise_multiplier
    sigma = training_noise_multiplier(ledger.charges, run, server_round=server_round, target=target,
                                      delta=ledger.delta, accountant=ledger.accountant)
    check_noise_multiplier(sigma, site, calibrated=run.privacy.calibrate)
    if run.privacy.calibrate:
        ledger.set_plan(run_id, NoisePlan(noise_multiplier=sigma, sample_rate=sample_rate))
    return sigma


def open_ledger(site: SiteConfig) -> PrivacyLedger:
    """The site's ledger (hold ``PrivacyLedger.locked`` around its use)."""
    return PrivacyLedger.open(
        site.ledger_path,
        site=site.site_id,
        accountant=site.accountant,
        delta=site.delta,
        epsilon_budget=site.epsilon_budget,
        audit_path=site.audit_path,
    )


def site_reply(site: SiteConfig, ledger: PrivacyLedger, status: Status, eps: float, sigma: float | None,
               update: np.ndarray | None) -> SiteReply:
    """The reply of a round: the ledger's public figures, and the update (DP output) if any."""
    return SiteReply(site_id=site.site_id, status=status, epsilon=eps, epsilon_budget=ledger.epsilon_budget,
                     delta=ledger.delta, total_steps=ledger.total_steps, noise_multiplier=sigma, update=update)


def no_dp_reply(site: SiteConfig, update: np.ndarray) -> SiteReply:
    """The reply of a round without DP (``dp.enabled = false``, simulation only): nothing charged,
    no budget (∞, as the in-process non-private reference reports it), no σ."""
    return SiteReply(site_id=site.site_id, status="ok", epsilon=0.0, epsilon_budget=math.inf, delta=site.delta,
                     total_steps=0, noise_multiplier=None, update=update)


def release_round(run: RunConfig, site: SiteConfig, global_arrays: dict[str, np.ndarray], *, run_id: int
                  ) -> SiteReply:
    """Round 0: charge, then release Σ_patients v + N(0, σ²·I), padded into an update-sized vector."""
    if not run.warm_start.enabled:
        raise ModelRefused("round 0 is the warm-start release, and this run has none (warm-start.budget-share = 0)")
    netG, netD = build_models(run.model)
    check_global_model(global_arrays, {k: tuple(v.shape) for k, v in model_arrays(netG, netD).items()})
    spec, layout = EmbeddingSpec.of(run), UpdateLayout.of(global_arrays)
    if spec.size > layout.num_params:
        raise ConfigError(f"warm-start.frequencies = {run.warm_start.frequencies} makes a release of {spec.size} "
                          f"values, more than the model's {layout.num_params}; lower it")
    data = load_site_dataset(site, run)
    if not run.privacy.enabled:  # a virtual hospital of `simulate --no-dp` (check_run_allowed): the exact sum
        update = np.zeros(layout.size, dtype=np.float64)
        update[: spec.size] = patient_sum(spec, data.images, data.labels, data.patients)
        return no_dp_reply(site, update)
    with PrivacyLedger.locked(site.ledger_path):
        ledger = open_ledger(site)
        target = run_target_of(ledger, site, run_id)
        try:
            sigma = release_noise_multiplier(ledger.charges, budget=target, share=run.warm_start.budget_share,
                                             delta=ledger.delta, accountant=ledger.accountant)
            charge = Charge(sigma, 1.0, 1)
            eps_after = check_budget(ledger.charges, charge, delta=ledger.delta, budget=target,
                                     accountant=ledger.accountant)
        except PrivacyBudgetExceeded:
            return site_reply(site, ledger, "budget-exhausted", ledger.epsilon(), None, None)
        ledger.charge(charge, run=run_id, round=WARM_START_ROUND)  # durable before the data is read
    seed = round_seed(run, site, WARM_START_ROUND)
    noise = ChaCha20Gaussian.from_os() if seed is None else ChaCha20Gaussian.from_seed(seed)
    update = np.zeros(layout.size, dtype=np.float64)  # (L,) the release in front, zeros after
    update[: spec.size] = noisy_release(spec, data.images, data.labels, data.patients, sigma, noise)
    return site_reply(site, ledger, "ok", eps_after, sigma, update)


def anchor_of(run: RunConfig, warm_start: np.ndarray | None) -> Anchor | None:
    """The G steps' anchor from the summed release a train request carries (None: no warm start)."""
    if not run.warm_start.enabled:
        return None
    spec = EmbeddingSpec.of(run)
    total = check_warm_start(warm_start, spec.size)
    return Anchor.of_release(spec, total, run.warm_start.anchor_weight)


def train_round(
    run: RunConfig,
    site: SiteConfig,
    global_arrays: dict[str, np.ndarray],
    *,
    run_id: int,
    server_round: int,
    warm_start: np.ndarray | None = None,
) -> SiteReply:
    """Do one round at this hospital; see the module docstring for the order of operations."""
    if server_round == WARM_START_ROUND:
        return release_round(run, site, global_arrays, run_id=run_id)
    netG, netD = build_models(run.model)
    check_global_model(global_arrays, {k: tuple(v.shape) for k, v in model_arrays(netG, netD).items()})
    anchor = anchor_of(run, warm_start)
    keep_global_model(site, run, global_arrays, run_id=run_id, model_round=server_round - 1)
    data = load_site_dataset(site, run)
    sample_rate = run.privacy.sample_rate  # public: ε below depends on no patient count
    sigma: float | None = None
    charge: Charge | None = None
    if run.privacy.enabled:
        with PrivacyLedger.locked(site.ledger_path):
            ledger = open_ledger(site)
            target = run_target_of(ledger, site, run_id)
            try:
                sigma = noise_for_round(ledger, run, site, run_id=run_id, server_round=server_round, target=target)
                charge = Charge(sigma, sample_rate, run.train.local_steps)
                eps_after = check_budget(ledger.charges, charge, delta=ledger.delta, budget=target,
                                         accountant=ledger.accountant)
            except PrivacyBudgetExceeded:
                return site_reply(site, ledger, "budget-exhausted", ledger.epsilon(), None, None)
            ledger.charge(charge, run=run_id, round=server_round)  # durable before any training

    load_model_arrays(netG, netD, global_arrays)
    result = train_local_round(
        netG,
        netD,
        data,
        model=run.model,
        train=run.train,
        sample_rate=sample_rate,
        noise_multiplier=sigma,
        max_grad_norm=run.privacy.max_grad_norm,
        device=select_device(run.train.device),
        seed=round_seed(run, site, server_round),
        anchor=anchor,
    )
    if result.charge != charge:  # both None without DP
        raise AccountingMismatch(f"ledger charged {charge}, optimizer accounted {result.charge}")
    layout = UpdateLayout.of(global_arrays)
    update = layout.pack(
        model_arrays(netG, netD),
        global_arrays,
        weight=PUBLIC_WEIGHT,
        metrics={"loss_d_fake": result.loss_d_fake, "loss_g": result.loss_g},
    )
    if charge is None:
        return no_dp_reply(site, update)
    return site_reply(site, ledger, "ok", eps_after, sigma, update)
