"""Benchmark: one local training step with DP-SGD on D against the same step without DP, and
the cost of drawing DP-SGD's noise from ChaCha20 instead of a ``torch.Generator``.

The model, training and DP settings are the defaults of ``[tool.flwr.app.config]`` in
``pyproject.toml`` (what ``medsynth simulate`` runs); flags override image size, steps and batch.

Table 1 runs the production loop (``common.dp.train.train_local_round``) with and without DP on
the same synthetic data, interleaved (DP, plain, DP, plain, …) so that machine noise hits both
alike. A "step" is one D step plus one G step every ``train.d-steps-per-g``.

Table 2 times only the D update (forward, backward, clip, noise, Adam) of the production wiring
(``make_private_discriminator``: noise from ChaCha20, ``common.dp.noise``) against the same
wiring with Opacus's stock ``DPOptimizer`` (``torch.normal`` from a ``torch.Generator``): two
copies of D take turns on the same batches, step by step. It also times the two noise draws
alone for D's parameter count ("extra / step": the difference over a D update). Ratios of
medians are the figures to report; nothing here asserts a time.

    python -m simulation.bench_dp_step [--steps 50] [--repeats 5] [--batch-size 32] [--image-size 32 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from opacus.optimizers import DPOptimizer

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
) -> float:
    """Seconds per step (D + G) over ``train.local_steps`` steps."""
    netG, netD = build_models(model, seed=0)
    t0 = time.perf_counter()
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
    return (time.perf_counter() - t0) / train.local_steps


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
    loss, _, _ = discriminator_loss(priv.module, real, y_real, fake, y_fake, conditional)
    priv.optimizer.zero_grad(set_to_none=True)
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
    p.add_argument("--patients", type=int, default=640, help="patients in the synthetic site")
    p.add_argument("--image-size", type=int, nargs="+", default=[defaults.model.image_size], choices=(32, 64))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
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
        dp, plain = [], []
        for _ in range(args.repeats):
            dp.append(time_round(data, model, train, privacy, True, device))
            plain.append(time_round(data, model, train, privacy, False, device))
        d_torch, d_chacha = [], []  # per D update, over all repeats
        for _ in range(args.repeats):
            t_torch, t_chacha = time_d_steps_paired(data, model, train, privacy, device)
            d_torch += t_torch
            d_chacha += t_chacha
        std = privacy.noise_multiplier * privacy.max_grad_norm
        draw_torch = time_noise_draw(d_shapes, std, torch_noise=True)
        draw_chacha = time_noise_draw(d_shapes, std, torch_noise=False)
        m_dp, m_plain = statistics.median(dp), statistics.median(plain)
        m_torch, m_chacha = statistics.median(d_torch), statistics.median(d_chacha)
        paired = statistics.median(c / t for c, t in zip(d_chacha, d_torch, strict=True))
        if not rows:
            print(f"{'image':>6} {'D params':>9} {'G params':>9} {'plain ms/step':>14} {'DP ms/step':>11} "
                  f"{'DP / plain':>11}")
        print(f"{size:>4}² {d_params:>9,} {g_params:>9,} {1e3 * m_plain:>14.1f} {1e3 * m_dp:>11.1f} "
              f"{m_dp / m_plain:>10.2f}×")
        rows.append(f"{size:>4}² {d_params:>9,} {1e3 * m_torch:>10.1f} {1e3 * m_chacha:>13.1f} "
                    f"{m_chacha / m_torch:>15.3f}× {paired:>12.3f}× {1e6 * draw_torch:>9.0f} "
                    f"{1e6 * draw_chacha:>12.0f} {100 * (draw_chacha - draw_torch) / m_torch:>11.2f}%")
    print("\nD update only (forward, backward, clip, noise, Adam), noise from torch.Generator vs ChaCha20; "
          "the two take turns on the same batches; µs: the noise draw alone, per step")
    print(f"{'image':>5} {'D params':>9} {'torch ms/D':>10} {'ChaCha20 ms/D':>13} {'ratio of medians':>16} "
          f"{'median ratio':>13} {'torch µs':>9} {'ChaCha20 µs':>12} {'extra / step':>12}")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
