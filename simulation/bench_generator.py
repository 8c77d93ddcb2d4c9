"""Benchmark: the generator's resize upsampling, folded into one transposed convolution
(``common.models.ResizeConv2d``) against nn.Upsample followed by the same 3×3 nn.Conv2d.

Both generators hold the same weights (the app's model, ``[tool.flwr.app.config]``) and take
turns on the same latents, so machine noise hits both alike. Timed per batch (``train.batch-size``),
in this process's CPU time:

* ``draw``: G's forward without gradients (D's fake rows, every D step);
* ``G step``: forward, backward and Adam (every ``train.d-steps-per-g`` D steps, and each
  warm-start pre-training step, whose feature map costs the same both ways).

    OMP_NUM_THREADS=1 python -m simulation.bench_generator [--repeats 200] [--image-size 32 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from common.config import run_config
from common.models import Generator, ResizeConv2d, build_models


def unfolded(netG: Generator) -> Generator:
    """A copy of ``netG`` that upsamples, then convolves (the layout ResizeConv2d replaces)."""
    ref = copy.deepcopy(netG)
    for i, layer in enumerate(ref.body):
        if isinstance(layer, ResizeConv2d):
            conv = nn.Conv2d(layer.in_channels, layer.out_channels, 3, 1, 1, bias=layer.bias is not None)
            conv.load_state_dict(layer.state_dict())
            ref.body[i - 1], ref.body[i] = nn.Upsample(scale_factor=2, mode="nearest"), conv
    return ref


def paired_cpu_ms(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median CPU ms per call of each function, the functions taking turns call by call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(5):  # warm-up
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(1e3 * (time.process_time() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def draw(g: Generator, z: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """G's forward without gradients (D's fake rows)."""
    def fn() -> None:
        with torch.no_grad():
            g(z, y)
    return fn


def step(g: Generator, opt: torch.optim.Optimizer, z: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """G's forward, backward and Adam step (the loss's own cost is left out: the same both ways)."""
    def fn() -> None:
        loss = g(z, y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return fn


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200, help="timed batches per variant (default 200)")
    p.add_argument("--image-size", type=int, nargs="+", default=[32, 64], choices=[32, 64])
    args = p.parse_args(argv)
    run = run_config()
    batch = run.train.batch_size
    print(f"torch threads {torch.get_num_threads()}, batch {batch}, g-width {run.model.g_width}, "
          f"CPU ms per batch (median of {args.repeats}, variants interleaved)")
    print(f"{'image':>6} {'what':>7} {'upsample+conv':>14} {'folded':>8} {'ratio':>6} {'max |diff|':>11}")
    for size in args.image_size:
        model = replace(run.model, image_size=size)
        folded, _ = build_models(model, seed=0)
        plain = unfolded(folded)
        z = torch.randn(batch, model.latent_dim, generator=torch.Generator().manual_seed(0))  # (B, latent)
        y = torch.arange(batch) % model.num_classes  # (B,)
        with torch.no_grad():
            diff = float((folded(z, y) - plain(z, y)).abs().max())
        opts = {name: torch.optim.Adam(g.parameters(), lr=run.train.lr_g) for name, g in
                (("upsample+conv", plain), ("folded", folded))}

        rows = {"draw": paired_cpu_ms({"upsample+conv": draw(plain, z, y), "folded": draw(folded, z, y)}, args.repeats),
                "G step": paired_cpu_ms({"upsample+conv": step(plain, opts["upsample+conv"], z, y),
                                         "folded": step(folded, opts["folded"], z, y)}, args.repeats)}
        for what, ms in rows.items():
            print(f"{size:>5}² {what:>7} {ms['upsample+conv']:>14.2f} {ms['folded']:>8.2f} "
                  f"{ms['upsample+conv'] / ms['folded']:>5.2f}× {diff:>11.1e}")


if __name__ == "__main__":
    main()
