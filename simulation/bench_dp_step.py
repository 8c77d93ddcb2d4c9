"""Benchmark: one local training step with DP-SGD on D against the same step without DP, and
the cost of drawing DP-SGD's noise from ChaCha20 instead of a ``torch.Generator``.

The model, training and DP settings are the defaults of ``[tool.flwr.app.config]`` in
``pyproject.toml`` (what ``medsynth simulate`` runs); flags override image size, steps and batch.

Table 1 runs the production loop (``common.dp.train.train_local_round``) with and without DP on
the same synthetic data, interleaved (DP, plain, plain, DP, …) so that machine noise hits both
alike. A "step" is one D step plus one G step every ``train.d-steps-per-g``. The site has
``medsynth simulate``'s default patient count. Both wall time and this process's CPU time are
reported: on a shared machine the wall time of a single-threaded round mostly measures the other
jobs (a wall-time ratio of 1.07× was printed at load 5 on 2 cores where the CPU-time ratio was
1.5×), so the CPU-time ratio is the figure to quote there.

Table 2 times only the D update (forward, backward, clip, noise, Adam) of the production wiring
(``make_private_discriminator``: noise from ChaCha20, ``common.dp.noise``) against the same
wiring with Opacus's stock ``DPOptimizer`` (``torch.normal`` from a ``torch.Generator``): two
copies of D take turns on the same batches, step by step. It also times the two noise draws
alone for D's parameter count ("extra / step": the difference over a D update). Ratios of
medians are the figures to report; nothing here asserts a time.

    python -m simulation.bench_dp_step [--steps 50] [--repeats 5] [--patients 200] [--image-size 32 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleExpandedWeights, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

from common.config import ModelConfig, PrivacyConfig, TrainConfig, run_config
from common.dataset import LocalDataset
from common.dp.noise import ChaCha20Gaussian
from common.dp.train import (
    PatientSampler,
    PrivateDiscriminator,
    discriminator_loss,
    make_private_discriminator,
    sample_noise,
    train_local_round,
)
from common.models import build_models, select_device
from simulation.runner import SimulateOptions

# the patient count of a site of `medsynth simulate` (its --patients-per-site default)
SIMULATE_PATIENTS = cast(int, SimulateOptions.__dataclass_fields__["patients_per_site"].default)


def bench_model(image_size: int | None = None) -> ModelConfig:
    """The model timed: the app's default (``[tool.flwr.app.config]``), at ``image_size`` if given."""
    model = run_config().model
    return model if image_size is None else replace(model, image_size=image_size)


def synthetic_site(num_patients: int, per_patient: int, size: int, seed: int = 0) -> LocalDataset:
    """Random images in [-1, 1]: timing does not depend on content."""
    rng = np.random.default_rng(seed)
    n = num_patients * per_patient
    patients = np.repeat(np.arange(num_patients), per_patient).astype(np.int64)
    return LocalDataset(
        images=rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32),
        labels=(patients % 2).astype(np.int64),
        patients=patients,
        class_names=("normal", "lesion"),
        patient_identity=True,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_round(
    data: LocalDataset,
    model: ModelConfig,
    train: TrainConfig,
    privacy: PrivacyConfig,
    private: bool,
    device: torch.device,
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per step (D + G) over ``train.local_steps`` steps."""
    netG, netD = build_models(model, seed=0)
    t0, c0 = time.perf_counter(), time.process_time()
    train_local_round(
        netG,
        netD,
        data,
        model=model,
        train=train,
        sample_rate=privacy.sample_rate,
        noise_multiplier=privacy.noise_multiplier if private else None,
        max_grad_norm=privacy.max_grad_norm,
        device=device,
        seed=0,
    )
    _sync(device)
    return (time.perf_counter() - t0) / train.local_steps, (time.process_time() - c0) / train.local_steps


def with_torch_generator(priv: PrivateDiscriminator, device: torch.device) -> PrivateDiscriminator:
    """The same module, Adam and accountant hook under Opacus's stock ``DPOptimizer``, whose
    noise is ``torch.normal`` from a ``torch.Generator``: the baseline (not cryptographic)."""
    ours = priv.optimizer
    stock = DPOptimizer(
        ours.original_optimizer,
        noise_multiplier=ours.noise_multiplier,
        max_grad_norm=ours.max_grad_norm,
        expected_batch_size=ours.expected_batch_size,
        loss_reduction=ours.loss_reduction,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    stock.attach_step_hook(ours.step_hook)
    return replace(priv, optimizer=stock)


def _d_update(priv: PrivateDiscriminator, batch: tuple[torch.Tensor, ...], conditional: bool,
              device: torch.device) -> float:
    """Seconds of one private D update on ``batch`` = (real, y_real, fake, y_fake)."""
    real, y_real, fake, y_fake = batch
    _sync(device)
    t0 = time.perf_counter()
    priv.optimizer.zero_grad(set_to_none=True)
    loss, _, _ = discriminator_loss(priv.module, real, y_real, fake, y_fake, conditional)
    loss.backward()
    priv.optimizer.step()
    _sync(device)
    return time.perf_counter() - t0


def time_d_steps_paired(
    data: LocalDataset,
    model: ModelConfig,
    train: TrainConfig,
    privacy: PrivacyConfig,
    device: torch.device,
) -> tuple[list[float], list[float]]:
    """Seconds of each private D update (forward, backward, clip, noise, Adam): (torch, ChaCha20).

    Two copies of D from the same initial weights, one per noise source, take turns on the
    same batch at every step (who goes first alternates), so load on a shared machine hits
    both alike. Batches are drawn as in ``train_local_round`` (Poisson over patients, fakes
    from G) outside the timed span.
    """
    netG, _ = build_models(model, seed=0)
    netG.to(device)
    sample_rate = privacy.sample_rate
    privs: list[PrivateDiscriminator] = []
    for torch_noise in (True, False):
        _, netD = build_models(model, seed=1)  # same initial D for both
        priv = make_private_discriminator(
            netD.to(device),
            train=train,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            sample_rate=sample_rate,
        )
        privs.append(with_torch_generator(priv, device) if torch_noise else priv)
    sampler = PatientSampler(data.patients, sample_rate, seed=0)
    latent_gen = torch.Generator(device=device).manual_seed(1)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)  # (N, 1, S, S), (N,)
    spent: tuple[list[float], list[float]] = ([], [])
    try:
        for step in range(train.local_steps):
            idx = torch.from_numpy(sampler.sample())
            z, y_fake = sample_noise(train.batch_size, model, device, latent_gen)
            with torch.no_grad():
                fake = netG(z, y_fake if model.conditional else None)  # (m, 1, S, S)
            batch = (images[idx].to(device), labels[idx].to(device), fake, y_fake)  # real (b, 1, S, S), (b,)
            for k in ((0, 1) if step % 2 == 0 else (1, 0)):
                spent[k].append(_d_update(privs[k], batch, model.conditional, device))
    finally:
        for priv in privs:
            priv.module._close()
    return spent


# Table 3: the D update under Opacus's ways of computing per-sample gradients (the issue-20 levers).
GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch", "ghost", "fake-apart")


@dataclass
class ModeD:
    """One copy of D wired for a grad-sample mode; ``plain`` is D without DP (the baseline)."""

    mode: str
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer


def mode_discriminator(mode: str, model: ModelConfig, train: TrainConfig, privacy: PrivacyConfig) -> ModeD:
    """D (same initial weights for every mode) wired as ``mode`` says, noise from a ``torch.Generator``.

    ``hooks``: Opacus's ``GradSampleModule`` (per-sample gradients from module hooks; the input
    requires a gradient so that the first layer's full backward hook does not warn);
    ``functorch``: the same module with every layer's per-sample gradient by ``torch.func``;
    ``ew``: torch's ExpandedWeights, production (``common.dp.train``); ``ghost``: Opacus's fast
    gradient clipping (per-sample norms only, ghost norms for the linear layers, then a second
    backward of the clip-weighted loss);
    ``fake-apart``: per-sample gradients for the real rows only, the fake rows' gradient as one
    plain sum: NOT the production update (fake rows unclipped), timed to size the lever only.
    """
    _, netD = build_models(model, seed=1)
    adam = torch.optim.Adam(netD.parameters(), lr=train.lr_d, betas=(train.beta1, 0.999))
    if mode == "plain":
        return ModeD(mode, netD, adam)
    gen = torch.Generator().manual_seed(0)
    common = {"noise_multiplier": privacy.noise_multiplier, "max_grad_norm": privacy.max_grad_norm,
              "expected_batch_size": 2 * train.batch_size, "loss_reduction": "mean", "generator": gen}
    module: torch.nn.Module
    if mode == "ghost":
        module = GradSampleModuleFastGradientClipping(netD, batch_first=True, loss_reduction="sum",
                                                      max_grad_norm=privacy.max_grad_norm, use_ghost_clipping=True)
        return ModeD(mode, module, DPOptimizerFastGradientClipping(adam, **common))
    if mode == "ew":
        module = GradSampleModuleExpandedWeights(netD, batch_first=True, loss_reduction="sum")
    else:
        module = GradSampleModule(netD, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
    return ModeD(mode, module, DPOptimizer(adam, **common))


def _row_losses(d: torch.nn.Module, real: torch.Tensor, y_real: torch.Tensor, fake: torch.Tensor,
                y_fake: torch.Tensor, conditional: bool) -> torch.Tensor:
    """Per-row loss (b+m,) of ``common.dp.train.discriminator_loss`` (whose sum it is)."""
    x = torch.cat([real, fake]).requires_grad_(True)  # (b+m, 1, S, S)
    y = torch.cat([y_real, y_fake])  # (b+m,)
    target = torch.cat([torch.ones(real.shape[0]), torch.zeros(fake.shape[0])])
    logits, class_logits = d(x, y if conditional else None)  # (b+m,), (b+m, K) | None
    rows = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if class_logits is not None:
        ce = F.cross_entropy(class_logits[: real.shape[0]], y_real, reduction="none")  # (b,)
        rows = rows + torch.cat([ce, torch.zeros(fake.shape[0])])
    return rows


def mode_update(d: ModeD, batch: tuple[torch.Tensor, ...], conditional: bool) -> float:
    """CPU seconds of one D update (forward, backward, per-sample work, clip, noise, Adam)."""
    real, y_real, fake, y_fake = batch
    t0 = time.process_time()
    d.optimizer.zero_grad(set_to_none=True)
    if d.mode == "ghost":
        ghost = cast(GradSampleModuleFastGradientClipping, d.module)
        rows = _row_losses(ghost, real, y_real, fake, y_fake, conditional)  # (b+m,)
        rows.sum().backward(retain_graph=True)  # hooks: per-sample norms
        coef = ghost.get_clipping_coef()  # (b+m,) min(1, C / norm)
        ghost.disable_hooks()
        (coef.detach() * rows).sum().backward()  # Σ_rows clip(g_row) in .grad
        ghost.enable_hooks()
        d.optimizer.step()
    elif d.mode == "fake-apart":
        gsm, opt = cast(GradSampleModule, d.module), cast(DPOptimizer, d.optimizer)
        gsm.disable_hooks()
        _row_losses(gsm, real[:0], y_real[:0], fake, y_fake, conditional).sum().backward()
        fake_sum = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in gsm.parameters()]
        opt.zero_grad(set_to_none=True)
        gsm.enable_hooks()
        _row_losses(gsm, real, y_real, fake[:0], y_fake[:0], conditional).sum().backward()
        opt.pre_step()  # clip the real rows, add noise, divide
        for p, g in zip(gsm.parameters(), fake_sum, strict=True):
            p.grad.add_(g / opt.expected_batch_size)
        opt.original_optimizer.step()
    elif d.mode in ("hooks", "functorch"):
        _row_losses(d.module, real, y_real, fake, y_fake, conditional).sum().backward()
        d.optimizer.step()
    else:  # plain and ew: the production loss
        loss, _, _ = discriminator_loss(d.module, real, y_real, fake, y_fake, conditional)
        loss.backward()
        d.optimizer.step()
    return time.process_time() - t0


def time_modes(data: LocalDataset, model: ModelConfig, train: TrainConfig, privacy: PrivacyConfig,
               modes: tuple[str, ...]) -> dict[str, list[float]]:
    """CPU seconds of each D update per mode (and ``plain``), all on the same batches, the order of
    the modes reversed every other step; the first 5 steps are warm-up. CPU only."""
    variants = [mode_discriminator(m, model, train, privacy) for m in ("plain", *modes)]
    netG, _ = build_models(model, seed=0)
    sampler = PatientSampler(data.patients, privacy.sample_rate, seed=0)
    latent_gen = torch.Generator().manual_seed(1)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)  # (N, 1, S, S), (N,)
    spent: dict[str, list[float]] = {d.mode: [] for d in variants}
    for step in range(train.local_steps + 5):
        idx = torch.from_numpy(sampler.sample())
        z, y_fake = sample_noise(train.batch_size, model, torch.device("cpu"), latent_gen)
        with torch.no_grad():
            fake = netG(z, y_fake if model.conditional else None)  # (m, 1, S, S)
        batch = (images[idx], labels[idx], fake, y_fake)
        for d in variants if step % 2 == 0 else variants[::-1]:
            spent_s = mode_update(d, batch, model.conditional)
            if step >= 5:
                spent[d.mode].append(spent_s)
    return spent


def time_noise_draw(shapes: list[torch.Size], std: float, torch_noise: bool, repeats: int = 200) -> float:
    """Median seconds to draw one step's noise for parameters of these shapes, as each optimizer
    does it: ``torch.normal`` per parameter, or one ChaCha20 draw of Σ numel split per parameter."""
    gen = torch.Generator().manual_seed(0)
    source = ChaCha20Gaussian.from_os()
    sizes = [int(torch.Size(s).numel()) for s in shapes]

    def draw_torch() -> None:
        for shape in shapes:
            torch.normal(mean=0.0, std=std, size=shape, generator=gen)

    def draw_chacha() -> None:
        flat = torch.from_numpy(source.standard_normal(sum(sizes)) * std)  # (Σ numel,) float64
        for piece, shape in zip(flat.split(sizes), shapes, strict=True):
            piece.view(shape).to(torch.float32)

    draw: Callable[[], None] = draw_torch if torch_noise else draw_chacha
    draw()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        draw()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    defaults = run_config()  # [tool.flwr.app.config]: what medsynth simulate runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=defaults.train.local_steps, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (interleaved)")
    p.add_argument("--batch-size", type=int, default=defaults.train.batch_size,
                   help="generated rows per step (the real rows are q × patients, q = dp.sample-rate)")
    p.add_argument("--patients", type=int, default=SIMULATE_PATIENTS,
                   help=f"patients in the synthetic site; default {SIMULATE_PATIENTS}, as medsynth simulate's sites")
    p.add_argument("--image-size", type=int, nargs="+", default=[defaults.model.image_size], choices=(32, 64))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--modes", nargs="*", default=list(GRAD_SAMPLE_MODES), choices=GRAD_SAMPLE_MODES,
                   help="grad-sample modes of table 3 (CPU only; none: skip it); default all")
    args = p.parse_args(argv)
    device = select_device(args.device)
    privacy = defaults.privacy
    train = replace(defaults.train, local_steps=args.steps, batch_size=args.batch_size)
    m = defaults.model
    print(f"device {device}, torch threads {torch.get_num_threads()}, q {privacy.sample_rate} of {args.patients} "
          f"patients (+{args.batch_size} fake rows), {args.steps} steps × {args.repeats} repeats, interleaved; "
          f"pyproject defaults: latent {m.latent_dim}, g-width {m.g_width}, d-width {m.d_width}, "
          f"conditional {m.conditional}, aux-classifier {m.aux_classifier}, d-steps-per-g {train.d_steps_per_g}, "
          f"σ {privacy.noise_multiplier}, C {privacy.max_grad_norm}")
    rows: list[str] = []
    for size in args.image_size:
        model = bench_model(size)
        data = synthetic_site(args.patients, 2, size)
        netG, netD = build_models(model)
        d_shapes = [q.shape for q in netD.parameters()]
        d_params = sum(q.numel() for q in netD.parameters())
        g_params = sum(q.numel() for q in netG.parameters())
        warm = replace(train, local_steps=3)
        for private in (True, False):
            time_round(data, model, warm, privacy, private, device)
        time_d_steps_paired(data, model, warm, privacy, device)
        dp: list[tuple[float, float]] = []  # (wall, CPU) s/step per timed round
        plain: list[tuple[float, float]] = []
        for r in range(args.repeats):
            for private in ((True, False) if r % 2 == 0 else (False, True)):  # who goes first alternates
                (dp if private else plain).append(time_round(data, model, train, privacy, private, device))
        d_torch, d_chacha = [], []  # per D update, over all repeats
        for _ in range(args.repeats):
            t_torch, t_chacha = time_d_steps_paired(data, model, train, privacy, device)
            d_torch += t_torch
            d_chacha += t_chacha
        std = privacy.noise_multiplier * privacy.max_grad_norm
        draw_torch = time_noise_draw(d_shapes, std, torch_noise=True)
        draw_chacha = time_noise_draw(d_shapes, std, torch_noise=False)
        m_dp, m_plain = statistics.median(t for t, _ in dp), statistics.median(t for t, _ in plain)
        c_dp, c_plain = statistics.median(c for _, c in dp), statistics.median(c for _, c in plain)
        m_torch, m_chacha = statistics.median(d_torch), statistics.median(d_chacha)
        paired = statistics.median(c / t for c, t in zip(d_chacha, d_torch, strict=True))
        if not rows:
            print(f"{'image':>6} {'D params':>9} {'G params':>9} {'plain ms/step':>14} {'DP ms/step':>11} "
                  f"{'DP / plain':>11} {'plain CPU ms':>13} {'DP CPU ms':>10} {'CPU DP / plain':>15}")
        print(f"{size:>4}² {d_params:>9,} {g_params:>9,} {1e3 * m_plain:>14.1f} {1e3 * m_dp:>11.1f} "
              f"{m_dp / m_plain:>10.2f}× {1e3 * c_plain:>13.1f} {1e3 * c_dp:>10.1f} {c_dp / c_plain:>14.2f}×")
        rows.append(f"{size:>4}² {d_params:>9,} {1e3 * m_torch:>10.1f} {1e3 * m_chacha:>13.1f} "
                    f"{m_chacha / m_torch:>15.3f}× {paired:>12.3f}× {1e6 * draw_torch:>9.0f} "
                    f"{1e6 * draw_chacha:>12.0f} {100 * (draw_chacha - draw_torch) / m_torch:>11.2f}%")
    print("\nD update only (forward, backward, clip, noise, Adam), noise from torch.Generator vs ChaCha20; "
          "the two take turns on the same batches; µs: the noise draw alone, per step")
    print(f"{'image':>5} {'D params':>9} {'torch ms/D':>10} {'ChaCha20 ms/D':>13} {'ratio of medians':>16} "
          f"{'median ratio':>13} {'torch µs':>9} {'ChaCha20 µs':>12} {'extra / step':>12}")
    for row in rows:
        print(row)
    if args.modes and device.type == "cpu":
        size = args.image_size[0]
        spent = time_modes(synthetic_site(args.patients, 2, size), bench_model(size), train, privacy, tuple(args.modes))
        base = statistics.median(spent["plain"])
        print(f"\nD update at {size}² by grad-sample mode (CPU ms, median over {train.local_steps} steps, all modes "
              "on the same batches; fake-apart is not the production update: fake rows unclipped)")
        print(f"{'mode':>11} {'CPU ms/D':>9} {'/ plain':>8}")
        for mode, times in spent.items():
            med = statistics.median(times)
            print(f"{mode:>11} {1e3 * med:>9.2f} {med / base:>7.2f}×")


if __name__ == "__main__":
    main()
