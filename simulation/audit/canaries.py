"""Gradient canaries in the in-process DP-SGD federation, scored from the global models the server sees.

The white-box one-run audit of Steinke, Nasr, Jagielski (NeurIPS 2023, §6: "Dirac canaries"),
adapted to federated DP-GAN training:

* **m canaries**, each one coordinate of D's flat parameter vector, each owned by one hospital
  (at random, equal shares) and **included** with probability 1/2, independently. The
  coordinates are the m *quietest* of D: those whose clipped gradient sum, probed for a few steps
  on the initial model (:func:`gradient_probe`), is smallest. On the others the patients' own
  gradients (about 0.5 to 8 per step at the preset, against a canary's q·C = 0.11 on average)
  drown the canary even without noise: choosing at random, the broken control's bound was 0.20
  against a claim of 1 (1 round of 50 steps). The choice uses the data but not the inclusion
  bits, which is all the paper's theorem needs (the guesses may depend on anything but S).
* **Charged like a patient.** An included canary is an extra patient of its hospital: at every
  D step it is Poisson-sampled at the run's public rate q, and when sampled it adds one row of
  norm exactly C (``dp.max-grad-norm``, the clipping bound, so clipping leaves it unchanged) to
  the clipped sum, on its coordinate, before the noise: through ``train_local_round``'s
  ``audit_canary`` hook, inside the real optimizer. q, σ and the claimed ε are those of the
  run's calibration (the ledger's); a canary is a neighbouring input under exactly the
  mechanism the ledger accounts for.
* **Score** from what the server sees: the global model after each round's FedAvg. U_j, the
  sum over rounds of the global update on canary j's coordinate (the telescoped total), is
  compared with the same sum in a *shadow* run: the same federation and initial model with no
  canary included and other coins (patient samples, latents, noise), so it is independent of
  the inclusion bits and the guesses stay valid (the theorem conditions on everything but
  them). Score = |U_j − U_j^shadow|: "in" scores high. Why not simply −U_j: D's optimizer is
  Adam, which turns any consistent gradient, however small, into steps of about the learning
  rate, so the patients' own gradients move an "out" coordinate by up to one learning rate per
  step while an included canary takes over its coordinate's second moment and moves it by a
  few per sampled step. Measured (PneumoniaMNIST, 1 round of 50 steps, no noise, claim ε = 1):
  −U_j gave a bound of 0.34; the shadow removes the patients' part of an "out" coordinate's
  drift.
* **Broken control**: the same run with every σ multiplied by 0 while the records keep the
  calibrated ε. The audit must then show more than the claim, or it could not fail.

What it audits: the clipping, Poisson sampling and noise of D's steps, FedAvg and what the
rounds add up to, at the per-patient level. It does not audit the accountant's arithmetic
beyond that (a lower bound below the claim is consistent with the claim, not a proof of it),
the warm-start release (its charge is in the claim, its output is not scored), nor secure
aggregation (the in-process engine sums in the clear; the server sees the same sum).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from common.config import ModelConfig, TrainConfig
from common.dataset import LocalDataset
from common.dp.train import PatientSampler, discriminator_loss, make_private_discriminator, sample_noise
from common.models import Discriminator, Generator
from common.weights import Arrays


def gradient_probe(netG: Generator, netD: Discriminator, sites: list[LocalDataset], *, model: ModelConfig,
                   train: TrainConfig, sample_rate: float, max_grad_norm: float, steps: int = 3,
                   seed: int = 0) -> np.ndarray:
    """(d,) mean |clipped gradient sum| per coordinate of D, over ``steps`` D steps per site at the
    initial model (a copy of D is stepped; ``netD`` is left as it was). The canaries' placement."""
    import copy

    d = sum(p.numel() for p in netD.parameters())
    total = np.zeros(d)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    for i, site in enumerate(sites):
        probe = copy.deepcopy(netD)
        seen: list[np.ndarray] = []

        def record(grads: list[torch.Tensor], seen: list[np.ndarray] = seen) -> None:
            seen.append(torch.cat([g.detach().reshape(-1) for g in grads]).abs().numpy())

        private = make_private_discriminator(probe, train=train, noise_multiplier=1.0, max_grad_norm=max_grad_norm,
                                             sample_rate=sample_rate, noise_seed=seed + i, audit_canary=record)
        sampler = PatientSampler(site.patients, sample_rate, seed=seed + i)
        images, labels = torch.from_numpy(site.images), torch.from_numpy(site.labels)
        try:
            for _ in range(steps):
                idx = torch.from_numpy(sampler.sample())
                z, y_fake = sample_noise(train.batch_size, model, device, gen)
                with torch.no_grad():
                    fake = netG(z, y_fake if model.conditional else None)  # (B, 1, S, S)
                private.optimizer.zero_grad(set_to_none=True)
                loss, _, _ = discriminator_loss(private.module, images[idx], labels[idx], fake, y_fake,
                                                model.conditional)
                loss.backward()
                private.optimizer.step()
        finally:
            private.module._close()
        total += np.mean(seen, axis=0)
    return total / len(sites)


@dataclass(frozen=True)
class Canaries:
    """Where the m canaries live and which are in: (m,) arrays over D's parameters in ``netD.parameters()`` order."""

    names: tuple[str, ...]  # D's parameter names, in order (keys "d.<name>" of the model arrays)
    param: np.ndarray  # (m,) int: index into names
    offset: np.ndarray  # (m,) int: flat offset in that parameter
    site: np.ndarray  # (m,) int: the hospital that owns the canary
    included: np.ndarray  # (m,) bool

    @property
    def size(self) -> int:
        """m."""
        return int(self.param.size)


def place_canaries(netD: Discriminator, m: int, sites: int, seed: int, loudness: np.ndarray | None = None) -> Canaries:
    """m distinct coordinates of D (the m smallest of ``loudness`` (d,), else drawn uniformly), owned by
    sites at random in equal shares, each included with probability 1/2."""
    named = list(netD.named_parameters())
    sizes = np.array([p.numel() for _, p in named])  # (P,)
    total = int(sizes.sum())
    if not 0 < m <= total:
        raise ValueError(f"need 0 < m <= {total} (D's parameters), got m = {m}")
    rng = np.random.default_rng(seed)
    if loudness is None:
        flat = np.sort(rng.choice(total, size=m, replace=False))  # (m,)
    else:
        if loudness.shape != (total,):
            raise ValueError(f"loudness must be ({total},), got {loudness.shape}")
        flat = np.sort(np.argsort(loudness, kind="stable")[:m])  # (m,) the quietest coordinates
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (P,)
    param = np.searchsorted(starts, flat, side="right") - 1  # (m,)
    return Canaries(names=tuple(n for n, _ in named), param=param, offset=flat - starts[param],
                    site=rng.permutation(m) % sites, included=rng.random(m) < 0.5)


@dataclass
class GradientCanaries:
    """The :class:`simulation.fed_inprocess.AuditHooks` of a one-run audit: inject, observe, score."""

    canaries: Canaries
    sample_rate: float  # q, the run's public Poisson rate
    norm: float  # C: each sampled canary adds a row of this norm
    seed: int
    noise_scale: float = 1.0  # ≈ 0: the broken control
    coins: int = 0  # added to the rounds' seeds: the shadow run uses other coins
    observed: list[np.ndarray] = field(default_factory=list)  # per global model: (m,) values at the canaries

    def canary(self, site: int, rnd: int) -> Callable[[list[torch.Tensor]], None] | None:
        """Site ``site``'s hook for round ``rnd``: each D step, every included canary of the site with
        probability q adds C on its coordinate of the clipped sum (``grads``, one tensor per parameter)."""
        mine = np.flatnonzero(self.canaries.included & (self.canaries.site == site))  # (m_s,)
        if mine.size == 0:
            return None
        param, offset = self.canaries.param[mine], self.canaries.offset[mine]
        rng = np.random.default_rng([self.seed, site, rnd])

        def add(grads: list[torch.Tensor]) -> None:
            sampled = rng.random(mine.size) < self.sample_rate  # (m_s,) Poisson sampling, as a patient
            for p in np.unique(param[sampled]):
                at = offset[sampled & (param == p)]
                flat = grads[int(p)].view(-1)  # a view: the clipped sum itself
                flat[torch.from_numpy(at)] += self.norm
        return add

    def on_global(self, rnd: int, arrays: Arrays) -> None:
        """Record the global model's values at the canaries (what the server holds after round ``rnd``)."""
        c = self.canaries
        flats = [np.asarray(arrays["d." + name]).reshape(-1) for name in c.names]
        self.observed.append(np.array([flats[p][o] for p, o in zip(c.param, c.offset, strict=True)]))

    def total_update(self) -> np.ndarray:
        """(m,) U: the global updates on each canary's coordinate, summed over the rounds."""
        if len(self.observed) < 2:
            raise ValueError("no round observed: train first")
        updates = np.diff(np.stack(self.observed), axis=0)  # (rounds, m) per-round global updates
        total: np.ndarray = updates.sum(axis=0)
        return total

    def scores(self, shadow: np.ndarray | None = None) -> np.ndarray:
        """(m,) |U − U_shadow| (or −U without a shadow): "in" scores high."""
        if shadow is None:
            return -self.total_update()
        if shadow.shape != (self.canaries.size,):
            raise ValueError(f"shadow must be ({self.canaries.size},), got {shadow.shape}")
        score: np.ndarray = np.abs(self.total_update() - shadow)
        return score
