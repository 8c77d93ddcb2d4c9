"""Federated DP-GAN training in one process, without Flower: for the benchmark's references and for tuning.

The same local round as a hospital (``common.dp.train.train_local_round``), the same noise
calibration (``common.dp.accounting.calibrate_noise_multiplier``: σ chosen so the planned rounds end
at, never above, ε), the same FedAvg weighted by patient count (the hospitals'
``UpdateLayout.pack`` and the server's ``fedavg``, summed in the clear), checkpoints written by
``common.checkpoint`` with the same round records (losses, each site's ε) and sample grids, so
``medsynth evaluate``/``sample`` and ``report.html`` work on its output unchanged.

What it is not: there is no ledger file, no secure aggregation and no message passing. Its
two uses are the non-private upper reference of the quality benchmark (``epsilon=None``:
plain Adam on D, no clipping, no noise — a path ``medsynth simulate`` does not offer on
purpose) and quick tuning of training settings, whose privacy arithmetic is the production one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from common.checkpoint import save_checkpoint
from common.checkpoint_model import load_initial_model
from common.config import ModelConfig, RunConfig, TrainConfig, WarmStartConfig
from common.dataset import LocalDataset
from common.dp.accounting import Charge, calibrate_noise_multiplier, epsilon_of
from common.dp.embedding import Anchor, patient_sum, warm_start_generator
from common.dp.noise import ChaCha20Gaussian
from common.dp.plan import release_noise_multiplier
from common.dp.release import noisy_release
from common.dp.train import train_local_round
from common.dp.warm_start import EmbeddingSpec
from common.evaluation.reference import to_model_range, unit_per_image
from common.models import build_models
from common.report.samples import sample_grid, save_png
from common.round_record import (
    RECORDS_FILE,
    Initialisation,
    InProcessRun,
    RoundMetrics,
    RoundRecord,
    ServerState,
    SitePrivacyReport,
    write_server_state,
)
from common.weights import PUBLIC_WEIGHT, Arrays, UpdateLayout, fedavg, load_model_arrays, model_arrays, sum_vectors
from simulation.partition import split_by_patient
from simulation.runner import SimulateOptions, load_source


@dataclass(frozen=True)
class FedPlan:
    """Rounds, model, local training and privacy of an in-process federation (``epsilon`` None: no DP)."""

    rounds: int
    model: ModelConfig
    train: TrainConfig
    sample_rate: float  # the public Poisson rate over patients
    epsilon: float | None
    delta: float
    max_grad_norm: float
    seed: int
    warm_start: WarmStartConfig
    init_from: Path | None = None  # a public checkpoint G and D start from; None: the seeded random init

    @staticmethod
    def from_run(run: RunConfig, epsilon: float | None) -> FedPlan:
        """The plan of ``run`` (rounds, model, training, q, δ, C, seed) at budget ``epsilon`` (None: no DP)."""
        init = run.federation.init_from
        return FedPlan(rounds=run.federation.num_rounds, model=run.model, train=run.train,
                       sample_rate=run.privacy.sample_rate, epsilon=epsilon, delta=run.privacy.delta,
                       max_grad_norm=run.privacy.max_grad_norm, seed=run.federation.seed,
                       warm_start=run.warm_start, init_from=Path(init) if init else None)


class AuditHooks(Protocol):
    """What an empirical audit (``simulation.audit.canaries``) plugs into :func:`train_federated`.

    ``noise_scale`` multiplies every site's calibrated σ in training (1: as calibrated; 0: the
    broken control, no noise) while the round records keep the ε of the calibrated σ, as a
    ledger would. ``canary`` gives site i's hook for one round (``train_local_round``'s
    ``audit_canary``); ``on_global`` sees the global model the server holds, before round 1
    (``rnd`` 0) and after every round. ``coins`` shifts every round's seed (patient samples,
    latents, noise): a shadow run with other coins is independent of the audited run's.
    """

    noise_scale: float
    coins: int

    def canary(self, site: int, rnd: int) -> Callable[[list[torch.Tensor]], None] | None: ...

    def on_global(self, rnd: int, arrays: Arrays) -> None: ...


def medmnist_sites(npz: Path, sites: int, partition: str, seed: int, image_size: int,
                   max_images: int | None = None) -> list[LocalDataset]:
    """The sites ``medsynth simulate`` would make of a MedMNIST file: same subsample, same split, same pixels.

    Pixels as ``prepare`` makes them of the simulation's DICOM files (``common.evaluation.reference``).
    """
    opts = SimulateOptions(out=Path("unused"), sites=sites, dataset=npz, partition=partition, seed=seed,
                           max_images=max_images, image_size=image_size)
    source = load_source(opts)
    out = []
    for idx in split_by_patient(source, sites, partition, seed):
        images = to_model_range(unit_per_image(source.images[idx]), image_size)
        out.append(LocalDataset(images=images, labels=source.labels[idx], patients=np.arange(idx.size, dtype=np.int64),
                                class_names=source.class_names, patient_identity=False))
    return out


def train_federated(sites: Sequence[LocalDataset], plan: FedPlan, out: Path,
                    say: Callable[[str], None] = print, audit: AuditHooks | None = None) -> ServerState:
    """Run ``plan.rounds`` rounds over ``sites``; writes checkpoints/, samples/, server_state.json.

    ``audit`` (simulation only): the empirical audit's canaries and observer (:class:`AuditHooks`).
    """
    t0 = time.monotonic()
    netG, netD = build_models(plan.model, seed=plan.seed)
    initialisation = Initialisation.random(plan.seed)
    if plan.init_from is not None:  # before the warm start, which pre-trains G from these weights
        initial = load_initial_model(plan.init_from, plan.model)
        load_model_arrays(netG, netD, initial.arrays)
        initialisation = initial.initialisation
        say(f"model: {initialisation.describe()}")
    arrays = model_arrays(netG, netD)
    steps = plan.rounds * plan.train.local_steps
    layout = UpdateLayout.of(arrays)
    rates = [plan.sample_rate for _ in sites]
    device = torch.device("cpu")
    anchor, past = warm_start(netG, sites, plan, device, say)
    sigmas: list[float | None] = []
    for i, (site, q) in enumerate(zip(sites, rates, strict=True)):
        sigma = None if plan.epsilon is None else calibrate_noise_multiplier(
            past, sample_rate=q, planned_steps=steps, delta=plan.delta, budget=plan.epsilon)
        sigmas.append(sigma)
        say(f"site-{i}: {site.num_patients} patients {np.bincount(site.labels).tolist()}, q={q:.4f}, "
            f"σ={'none (no DP)' if sigma is None else f'{sigma:.3f}'}")
    if anchor is not None:
        arrays = model_arrays(netG, netD)
    trained = sigmas if audit is None else [None if s is None else s * audit.noise_scale for s in sigmas]
    coins = 0 if audit is None else audit.coins * 7_777_777  # shifts every round seed
    if audit is not None:
        audit.on_global(0, arrays)
    history: list[RoundRecord] = []
    for rnd in range(1, plan.rounds + 1):
        t_round = time.monotonic()
        vectors: list[np.ndarray] = []
        privacy: dict[str, SitePrivacyReport] = {}
        for i, site in enumerate(sites):
            load_model_arrays(netG, netD, arrays)
            res = train_local_round(netG, netD, site, model=plan.model, train=plan.train, sample_rate=rates[i],
                                    noise_multiplier=trained[i],
                                    max_grad_norm=plan.max_grad_norm, device=device,
                                    seed=plan.seed * 1_000_003 + rnd * 101 + i + coins,
                                    anchor=anchor,
                                    audit_canary=None if audit is None else audit.canary(i, rnd))
            # the hospitals' update vector and the server's FedAvg, as in a real round
            vectors.append(layout.pack(model_arrays(netG, netD), arrays, weight=PUBLIC_WEIGHT,
                                       metrics={"loss_d_fake": res.loss_d_fake, "loss_g": res.loss_g}))
            sigma = sigmas[i]
            eps = 0.0 if sigma is None else epsilon_of(
                [*past, Charge(sigma, rates[i], rnd * plan.train.local_steps)], plan.delta)
            privacy[f"site-{i}"] = SitePrivacyReport(status="ok", epsilon=eps,
                                                     epsilon_budget=plan.epsilon or float("inf"),
                                                     delta=plan.delta, steps=rnd * plan.train.local_steps)
        arrays, means = fedavg(arrays, layout, sum_vectors(vectors))
        record = RoundRecord(round=rnd, sites_trained=tuple(sorted(privacy)), sites_budget_exhausted=(), failures=(),
                             privacy=privacy, metrics=RoundMetrics.from_means(means),
                             seconds=round(time.monotonic() - t_round, 2))
        history.append(record)
        if audit is not None:
            audit.on_global(rnd, arrays)
        save_checkpoint(out / "checkpoints", rnd, arrays, history, class_names=sites[0].class_names,
                        initialisation=initialisation)
        load_model_arrays(netG, netD, arrays)
        save_png(sample_grid(netG, plan.model, seed=plan.seed), out / "samples" / f"round-{rnd:04d}.png")
        say(f"round {rnd}/{plan.rounds}: loss_d_fake={means['loss_d_fake']:.3f} loss_g={means['loss_g']:.3f} "
            f"{record.seconds:.0f} s")
    state = ServerState(rounds=tuple(history), finished=True, secure_aggregation=False,
                        in_process=InProcessRun(wall_seconds=round(time.monotonic() - t0, 1)),
                        initialisation=initialisation)
    write_server_state(out / RECORDS_FILE, state)
    return state


def warm_start(netG: torch.nn.Module, sites: Sequence[LocalDataset], plan: FedPlan, device: torch.device,
               say: Callable[[str], None]) -> tuple[Anchor | None, list[Charge]]:
    """The private mean-embedding release of every site, summed, and G pre-trained on it.

    Returns the anchor for the G steps and the charge each site's ledger carries before DP-SGD
    (none without DP: the release is then exact, the non-private reference's same path).
    """
    ws = plan.warm_start
    if not ws.enabled:
        return None, []
    spec = EmbeddingSpec.of_parts(plan.model, ws, plan.seed)
    sigma = None if plan.epsilon is None else release_noise_multiplier(
        [], budget=plan.epsilon, share=ws.budget_share, delta=plan.delta, accountant="prv")  # as every sim call
    total = np.zeros(spec.size)
    for site in sites:
        total += (patient_sum(spec, site.images, site.labels, site.patients) if sigma is None else
                  noisy_release(spec, site.images, site.labels, site.patients, sigma, ChaCha20Gaussian.from_os()))
    t0 = time.monotonic()
    anchor, last = warm_start_generator(netG, spec, total, warm_start=ws, model=plan.model, train=plan.train,
                                        seed=plan.seed, device=device)
    say(f"warm start: release σ={'none (no DP)' if sigma is None else f'{sigma:.2f}'}, noisy counts "
        f"{[round(float(c)) for c in anchor.targets.counts]}, G pre-trained {ws.pretrain_steps} steps "
        f"(loss {last:.4f}, {time.monotonic() - t0:.0f} s)")
    return anchor, ([] if sigma is None else [Charge(sigma, 1.0, 1)])
