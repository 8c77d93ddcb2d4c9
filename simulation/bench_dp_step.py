"""Benchmark: one local training step with DP-SGD on D against the same step without DP.

Both variants run the production loop (``common.dp_train.train_local_round``) on the same
synthetic data, same model and same batch size, in one process, interleaved (DP, plain, DP,
plain, …) so that machine noise hits both alike. A "step" is one D step plus one G step.
The ratio of medians is the figure to report; nothing here asserts a time.

    python -m simulation.bench_dp_step [--steps 30] [--repeats 5] [--batch-size 32] [--image-size 32 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from common.config import ModelConfig, TrainConfig
from common.dataset import LocalDataset
from common.dp_train import train_local_round
from common.models import build_models, select_device


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


def time_round(
    data: LocalDataset, model: ModelConfig, train: TrainConfig, private: bool, device: torch.device
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
        sample_rate=min(1.0, train.batch_size / data.num_patients),  # the benchmark's q: B real rows expected
        noise_multiplier=1.0 if private else None,
        max_grad_norm=1.0,
        device=device,
        seed=0,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / train.local_steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (interleaved)")
    p.add_argument("--batch-size", type=int, default=32, help="expected patients per step (Poisson)")
    p.add_argument("--patients", type=int, default=640, help="patients in the synthetic site")
    p.add_argument("--image-size", type=int, nargs="+", default=[32, 64], choices=(32, 64))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    device = select_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size} patients "
          f"(+{args.batch_size} fake rows), {args.steps} steps × {args.repeats} repeats, interleaved")
    print(f"{'image':>6} {'D params':>9} {'G params':>9} {'plain ms/step':>14} {'DP ms/step':>11} {'DP / plain':>11}")
    for size in args.image_size:
        model = ModelConfig(image_size=size)
        train = TrainConfig(local_steps=args.steps, batch_size=args.batch_size)
        data = synthetic_site(args.patients, 2, size)
        netG, netD = build_models(model)
        d_params = sum(q.numel() for q in netD.parameters())
        g_params = sum(q.numel() for q in netG.parameters())
        warm = TrainConfig(local_steps=3, batch_size=args.batch_size)
        time_round(data, model, warm, True, device)
        time_round(data, model, warm, False, device)
        dp, plain = [], []
        for _ in range(args.repeats):
            dp.append(time_round(data, model, train, True, device))
            plain.append(time_round(data, model, train, False, device))
        m_dp, m_plain = statistics.median(dp), statistics.median(plain)
        print(f"{size:>4}² {d_params:>9,} {g_params:>9,} {1e3 * m_plain:>14.1f} {1e3 * m_dp:>11.1f} "
              f"{m_dp / m_plain:>10.2f}×")


if __name__ == "__main__":
    main()
