"""DP-SGD's Gaussian noise from a cryptographic source: ChaCha20 keystream → Box–Muller.

Why: the Gaussian mechanism's guarantee (Dwork & Roth 2014, §3.5.3; DP-SGD, Abadi et al. 2016)
assumes noise nobody can predict. Opacus draws it with ``torch.normal`` from a
``torch.Generator`` (Mersenne Twister, Matsumoto & Nishimura 1998, on CPU; Philox on CUDA),
seeded here with 63 bits: fine statistically, but not designed to be unpredictable. MT19937 is
linear over GF(2), and its whole state follows from 624 consecutive 32-bit outputs, so the
noise is only as secret as the seed and everything else drawn from the generator. Opacus's own
answer (``secure_mode=True``) needs ``torchcsprng``, which has no torch 2.x release. Here the
noise comes from ChaCha20 (Bernstein 2008; RFC 8439), keyed with 32 bytes from the OS
(``secrets.token_bytes``), read as a stream and never rewound, so no keystream byte is used
twice. The same cipher is the secure-aggregation mask PRG
(``common/secagg/primitives.py``); the cipher itself comes from ``cryptography`` (OpenSSL).

From keystream to N(0, 1), exactly as computed in :func:`words_to_normals`:
  * the keystream is read as little-endian 64-bit words w, uniform on {0, …, 2⁶⁴ − 1} as long
    as ChaCha20 is a PRF;
  * two radius words (h, l) → U₁ = h · 2⁻⁶⁴ + (l + 1) · 2⁻¹²⁸ ∈ [2⁻¹²⁸, 1]: the uniform grid of
    step 2⁻¹²⁸ on (0, 1], rounded to binary64 (relative error ≤ 2⁻⁵²). 128 bits rather than 64
    push the radius cap from 9.4 to 13.3 standard deviations (see Precision). U₁ > 0, so
    log U₁ is always finite: no log(0);
  * angle word w₂ → U₂ = ⌊w₂ / 2¹¹⌋ · 2⁻⁵³ ∈ [0, 1): exact, 53-bit uniform;
  * Box–Muller (Box & Muller 1958): R = √(−2 ln U₁), Θ = 2π U₂; then Z₀ = R cos Θ and
    Z₁ = R sin Θ are independent N(0, 1) when U₁, U₂ are independent uniforms, because
    R² = −2 ln U₁ is Exp(1/2) = χ²₂ and Θ is a uniform angle. Every three words give two
    normals; an odd count drops the last one (the stream moves on, nothing is reused).

Precision. The transform is exact in real arithmetic; in binary64 ``log``, ``sqrt``, ``cos``,
``sin`` add a few ulp (relative ~1e-16), far below the float32 the gradients are kept in. The
only distributional change is at the tail: U₁ ≥ 2⁻¹²⁸ caps the radius at
R_max = √(256 ln 2) ≈ 13.32, and P(R > R_max) = 2⁻¹²⁸ ≈ 2.9e-39 for a true Gaussian pair. A
neighbouring dataset shifts the noisy sum by at most C, i.e. 1/σ in units of the noise's std,
so the outputs that one neighbour can produce and the other cannot have probability of at most
about exp(−(R_max − 1/σ)² / 2) per step (worst when the whole shift falls on one pair of
coordinates), a term that adds to δ, T times over T steps: σ = 0.3 gives ~2e-22 per step and
σ = 0.2 ~1e-15, against the δ = 1e-5 in use (with 64 radius bits σ = 0.3 gave ~1e-8 per step).
As with any floating-point sampler, the low-order bits of a float32 noisy
gradient are not protected against the attacks of Mironov (CCS 2012) and Jin et al. (IEEE S&P
2022, arXiv:2112.05307); Opacus's mitigation for that (summing 2n draws, Holohan & Braghin 2021,
arXiv:2107.10138) is not applied, as it was not before.

Tests and ``sim.deterministic-noise`` pass an integer seed: the key is then SHA-256 of the seed
(:meth:`ChaCha20Gaussian.from_seed`), reproducible by anyone and therefore NOT private.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from common.keystream import keystream_words

KEY_BYTES = 32
# ChaCha20's 32-bit block counter (RFC 8439 §2.3): 2³² blocks of 64 bytes = 2³⁵ words of 8 bytes
# per key. One round uses steps × D params words (50 × 13 035 at the default config).
MAX_WORDS = 2**35
_SEED_DOMAIN = b"medsynth dp-noise test seed v1|"
_TWO_PI = 2.0 * math.pi


def words_to_normals(words: np.ndarray) -> np.ndarray:
    """(3m,) uint64 keystream words → (2m,) float64 standard normals (Box–Muller, see module doc).

    Words [0, m) are the radii's high words h, [m, 2m) their low words l, [2m, 3m) the angles;
    output [0, m) is R cos Θ and [m, 2m) is R sin Θ.
    """
    if words.ndim != 1 or words.size % 3:
        raise ValueError(f"need a multiple of three words in a flat array, got shape {words.shape}")
    m = words.size // 3
    high, low = words[:m].astype(np.float64), words[m : 2 * m].astype(np.float64)
    u1 = high * 2.0**-64 + (low + 1.0) * 2.0**-128  # (m,) in [2⁻¹²⁸, 1], never 0
    u2 = (words[2 * m :] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # (m,) in [0, 1)
    radius = np.sqrt(-2.0 * np.log(u1))  # (m,) in [0, √(256 ln 2)]
    angle = _TWO_PI * u2  # (m,)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])  # (2m,)


class ChaCha20Gaussian:
    """A stream of N(0, 1) draws from one ChaCha20 keystream (zero nonce, counter from 0).

    One instance per key, one key per local round: the stream is consumed in order and never
    rewound, so no keystream byte is used twice; :data:`MAX_WORDS` bounds one key's stream.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"ChaCha20 keys are {KEY_BYTES} bytes, got {len(key)}")
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._words_used = 0

    @classmethod
    def from_os(cls) -> ChaCha20Gaussian:
        """Keyed with 32 bytes from the OS CSPRNG (``secrets``): the production source."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_seed(cls, seed: int) -> ChaCha20Gaussian:
        """Keyed with SHA-256(domain | decimal seed): same seed, same noise. Tests only."""
        return cls(hashlib.sha256(_SEED_DOMAIN + str(seed).encode("ascii")).digest())

    @property
    def words_used(self) -> int:
        """Keystream words consumed so far (three per pair of normals)."""
        return self._words_used

    def words(self, n: int) -> np.ndarray:
        """(n,) uint64: the next n keystream words, little-endian."""
        if n < 0:
            raise ValueError(f"word count must be >= 0, got {n}")
        if self._words_used + n > MAX_WORDS:
            raise RuntimeError(f"ChaCha20 stream exhausted: {self._words_used} + {n} words > 2**35 for one key")
        self._words_used += n
        return keystream_words(self._stream, n)

    def standard_normal(self, n: int) -> np.ndarray:
        """(n,) float64 i.i.d. N(0, 1); consumes 3·⌈n/2⌉ words."""
        pairs = (n + 1) // 2
        return words_to_normals(self.words(3 * pairs))[:n]


class CsprngDPOptimizer(DPOptimizer):  # type: ignore[misc]  # opacus ships no type information
    """Opacus's ``DPOptimizer`` with the Gaussian noise drawn from a :class:`ChaCha20Gaussian`.

    Only :meth:`add_noise` is replaced; clipping (``clip_and_accumulate``), the skip-step
    queue, scaling by the expected batch size (``scale_grad``), the accountant's step hook and
    the wrapped optimizer's step are Opacus's own. ``generator`` and ``secure_mode`` of the
    parent are unused (``None``/``False``): the noise source is ``noise``.

    ``audit_canary`` (default None, off) is the empirical audit's hook (``simulation.audit``):
    called with the per-parameter clipped sums just before the noise is added, it adds gradient
    canaries as extra rows of norm ≤ C. No configuration key reaches it; only the simulation
    harness passes it (tests/test_audit_canaries.py checks that client/ and server/ never do).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise: ChaCha20Gaussian,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int | None,
        loss_reduction: str = "mean",
        audit_canary: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
        )
        self.noise_source = noise
        self.audit_canary = audit_canary

    def add_noise(self) -> None:
        """p.grad = p.summed_grad + N(0, (σC)² I), for every parameter, as Opacus does.

        Same contract as ``DPOptimizer.add_noise`` in Opacus 1.6: refuses a ``summed_grad``
        already used in a step, stores ``(summed_grad + noise).view_as(p)`` in ``p.grad``,
        marks ``summed_grad`` as used, and adds nothing (draws nothing) when σC = 0. All
        parameters' noise is one draw of Σ numel normals, split in parameter order.
        """
        std = float(self.noise_multiplier * self.max_grad_norm)
        params: list[torch.nn.Parameter] = self.params
        summed: list[torch.Tensor] = []  # per parameter (*p.shape): the batch's clipped row sum
        for p in params:
            s: torch.Tensor | None = getattr(p, "summed_grad", None)  # an Opacus attribute, untyped
            if s is None:
                raise RuntimeError("add_noise() before clip_and_accumulate(): no summed_grad to add noise to")
            _check_processed_flag(s)
            summed.append(s)
        if self.audit_canary is not None:
            self.audit_canary(summed)  # audit only: canary rows join the clipped sum, before the noise
        sizes = [int(s.numel()) for s in summed]
        flat = torch.from_numpy(self.noise_source.standard_normal(sum(sizes)) * std) if std else None  # (Σ numel,)
        offset = 0
        for p, s, size in zip(params, summed, sizes, strict=True):
            if flat is not None:
                noise = flat[offset : offset + size].view(s.shape).to(device=s.device, dtype=s.dtype)
                p.grad = (s + noise).view_as(p)
            else:
                p.grad = s.clone().view_as(p)  # a new tensor, as Opacus's s + 0: scale_grad divides in place
            offset += size
            _mark_as_processed(s)
