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

import numpy as np
import torch
from torch import nn

Arrays = dict[str, np.ndarray]

METRIC_NAMES: tuple[str, ...] = ("loss_d", "loss_g")


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
