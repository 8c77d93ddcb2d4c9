"""Models ⇄ named arrays, and the flat update vector that hospitals send.

One hospital's reply is a single float64 vector, laid out by ``UpdateLayout``:

    [ w·Δ_1 | w·Δ_2 | … | w | w·m_1 | … | w·m_k ]

where Δ_i = local_i − global_i for every floating-point tensor of G and D (keys ``g.*`` and
``d.*``), w is the hospital's aggregation weight (its patient count) and m_j its round metrics
(losses). Everything data-dependent — the delta, the weight, the losses — lives in that one
vector, so the server only ever needs the *sum* of the vectors:

    Σ_h v_h = [ Σ w_h Δ_h | Σ w_h | Σ w_h m_h ]  →  global + Σ w_h Δ_h / Σ w_h  (FedAvg)

With plain aggregation the server sees each vector; with secure aggregation it sees only the
sum. Integer buffers (BatchNorm's ``num_batches_tracked``) carry no learned information and
are not averaged: the server keeps its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where models are touched: the secure-aggregation steps of a
    from torch import nn  # hospital (a fresh process per message in deployment) never need it

Arrays = dict[str, np.ndarray]

METRIC_NAMES: tuple[str, ...] = ("loss_d_fake", "loss_g")  # computed on generated rows only


class UpdateLayoutError(ValueError):
    """An update vector or model state does not match the agreed layout."""


def model_arrays(netG: nn.Module, netD: nn.Module) -> Arrays:
    """All tensors of G and D as numpy arrays, keyed ``g.<name>`` / ``d.<name>``."""
    out: Arrays = {}
    for prefix, net in (("g.", netG), ("d.", netD)):
        for name, tensor in net.state_dict().items():
            out[prefix + name] = tensor.detach().cpu().numpy().copy()
    return out


def load_model_arrays(netG: nn.Module, netD: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load ``g.*``/``d.*`` arrays into G and D (strict: every key must match)."""
    import torch

    for prefix, net in (("g.", netG), ("d.", netD)):
        state = {
            k[len(prefix) :]: torch.from_numpy(np.asarray(v).copy()) for k, v in arrays.items() if k.startswith(prefix)
        }
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UpdateLayoutError(
                f"model arrays do not match the model ({prefix}): missing {missing}, unexpected {unexpected}; "
                "was the checkpoint made with another model config?"
            )


@dataclass(frozen=True)
class UpdateLayout:
    """Order and shapes of the float tensors in an update vector, then weight and metrics."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    metric_names: tuple[str, ...] = METRIC_NAMES

    @staticmethod
    def of(arrays: Mapping[str, np.ndarray]) -> UpdateLayout:
        names = tuple(sorted(k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating)))
        return UpdateLayout(names, tuple(tuple(arrays[k].shape) for k in names))

    @property
    def num_params(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @property
    def size(self) -> int:
        """Vector length: parameters, then the weight, then one slot per metric."""
        return self.num_params + 1 + len(self.metric_names)

    def pack(
        self,
        local: Mapping[str, np.ndarray],
        global_: Mapping[str, np.ndarray],
        weight: float,
        metrics: Mapping[str, float],
    ) -> np.ndarray:
        """One hospital's vector (size,) float64: [w·Δ | w | w·metrics]."""
        if not weight > 0:
            raise UpdateLayoutError(f"aggregation weight must be > 0, got {weight}")
        if set(metrics) != set(self.metric_names):
            raise UpdateLayoutError(f"metrics {sorted(metrics)} != layout {list(self.metric_names)}")
        parts: list[np.ndarray] = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            lo, gl = np.asarray(local[name], np.float64), np.asarray(global_[name], np.float64)
            if lo.shape != shape or gl.shape != shape:
                raise UpdateLayoutError(f"{name}: shape {lo.shape}/{gl.shape} != layout {shape}")
            parts.append((weight * (lo - gl)).ravel())
        parts.append(np.array([weight], np.float64))
        parts.append(weight * np.array([metrics[m] for m in self.metric_names], np.float64))
        return np.concatenate(parts)

    def unpack_sum(self, total: np.ndarray) -> tuple[Arrays, float, dict[str, float]]:
        """Σ vectors → (Σ w·Δ per tensor, Σ w, Σ w·metric per metric)."""
        if total.shape != (self.size,):
            raise UpdateLayoutError(f"update vector has shape {total.shape}, layout needs ({self.size},)")
        deltas: Arrays = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = int(np.prod(shape))
            deltas[name] = total[offset : offset + n].reshape(shape)
            offset += n
        weight = float(total[offset])
        metrics = {m: float(v) for m, v in zip(self.metric_names, total[offset + 1 :], strict=True)}
        return deltas, weight, metrics


def fedavg(
    global_: Mapping[str, np.ndarray], layout: UpdateLayout, total: np.ndarray
) -> tuple[Arrays, dict[str, float]]:
    """Apply a summed update: new = global + Σ w·Δ / Σ w; metrics are weighted means."""
    deltas, weight, metric_sums = layout.unpack_sum(total)
    if not weight > 0:
        raise UpdateLayoutError(f"summed aggregation weight is {weight}; no hospital contributed")
    new = {k: np.array(v, copy=True) for k, v in global_.items()}
    for name, delta in deltas.items():
        new[name] = (np.asarray(global_[name], np.float64) + delta / weight).astype(global_[name].dtype)
    return new, {m: s / weight for m, s in metric_sums.items()}


def sum_vectors(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Plain (insecure) aggregation: the element-wise sum of the hospitals' vectors."""
    if not vectors:
        raise UpdateLayoutError("no update vectors to sum")
    total: np.ndarray = np.sum(np.stack(vectors), axis=0)
    return total


# ---- bounds for quantising an update vector into the secure-sum ring -------------------------
PUBLIC_WEIGHT = 1.0  # ω of every contributing hospital: public, so the sum holds no patient count
METRIC_BOUND = 1e3  # |ω·loss| ≤ 1e3: a mean BCE above that (logits ≈ ∓1000) is a diverged model, refused
ADAM_BETA2 = 0.999  # the β2 both optimizers use (common.dp.train)


def adam_step_bound(beta1: float, beta2: float, steps: int) -> float:
    """Largest |Δθ| / lr of one Adam step, for any gradients (ε = 0, no weight decay).

    With a_i = (1−β1)β1^(t−i) and b_i = (1−β2)β2^(t−i), m_t = Σ a_i g_i and v_t = Σ b_i g_i²;
    Cauchy–Schwarz gives |m_t| ≤ sqrt(Σ a_i²/b_i) · sqrt(v_t), so
        |m̂_t / sqrt(v̂_t)| ≤ (1−β1)/sqrt(1−β2) · sqrt(1/(1−β1²/β2)) · sqrt(1−β2^t)/(1−β1^t),
    maximised over t ≤ steps (Kingma & Ba, ICLR 2015, §2.1 state the looser
    (1−β1)/sqrt(1−β2) for the case 1−β1 > sqrt(1−β2)). Needs β1² < β2.
    """
    if not beta1**2 < beta2 < 1:
        raise ValueError(f"Adam bound needs beta1² < beta2 < 1, got {beta1}, {beta2}")
    t = np.arange(1, max(steps, 1) + 1, dtype=np.float64)
    bias = float(np.max(np.sqrt(1 - beta2**t) / (1 - beta1**t)))
    return float((1 - beta1) / np.sqrt(1 - beta2) * np.sqrt(1 / (1 - beta1**2 / beta2)) * bias)


def update_bounds(
    layout: UpdateLayout, *, lr_d: float, lr_g: float, beta1: float, d_steps: int, g_steps: int
) -> np.ndarray:
    """Per-element bounds (layout.size,) for [ω·Δ | ω | ω·metrics] of one local round.

    |Δθ| ≤ steps · lr · adam_step_bound for every parameter of the model it belongs to, and
    ω ≤ 1 only shrinks it. Example (defaults: lr 2e-4, β1 0.5, 50 D steps): 0.18 for D.
    """
    d_bound = d_steps * lr_d * adam_step_bound(beta1, ADAM_BETA2, d_steps)
    g_bound = max(g_steps, 1) * lr_g * adam_step_bound(beta1, ADAM_BETA2, max(g_steps, 1))
    parts = [
        np.full(int(np.prod(shape)), d_bound if name.startswith("d.") else g_bound)
        for name, shape in zip(layout.names, layout.shapes, strict=True)
    ]
    parts.append(np.ones(1))  # ω ∈ (0, 1]
    parts.append(np.full(len(layout.metric_names), METRIC_BOUND))
    return np.concatenate(parts).astype(np.float64)
