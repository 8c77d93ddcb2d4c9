"""Synthetic CT-like phantoms: the built-in default data of ``medsynth simulate``.

Each patient is an axial "abdomen" slice: an elliptical body with a fat rim and soft tissue,
a liver-like organ, a vertebra, and a smooth tissue texture. The anatomy (sizes, positions,
organ density, texture, lesions) is drawn once per patient; each image of that patient adds
only a small jitter (shift, scale, lesion wobble) and fresh quantum noise, so a patient's
images look alike and differ from other patients'.

Class signal: "lesion" patients carry 1-3 round hyper-dense blobs (+80..+130 HU over the
organ, radius 5-9 % of the field of view) inside the organ; "normal" patients carry none.
In the soft-tissue window (center 40, width 400) blobs are clearly brighter than the organ,
yet darker than bone, so a small GAN can learn them at 32x32.

Lesion masks: the generator knows where it draws each blob, so every image comes with its
lesion mask (``SourceData.masks``, uint8 (N, S, S), 1 = lesion): the pixels where the union of
that image's blobs (with the same per-image wobble) inside the organ has membership ≥ 0.5, i.e.
the blob outline at the antialiased edge's midpoint. Normal patients' masks are empty. The
masks are drawn from no extra random numbers: images are the same with or without them.

Values are CT-like: Hounsfield units stored as uint16 = HU + 1024 (12-bit), read back with
Rescale Slope (0028,1053) 1 and Rescale Intercept (0028,1052) -1024.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulation.partition import SourceData, SourceDataError, ValueMapping

CLASS_NAMES = ("normal", "lesion")
HU_OFFSET = 1024
CT_MAPPING = ValueMapping(modality="CT", rescale_slope=1.0, rescale_intercept=-float(HU_OFFSET),
                          window_center=40.0, window_width=400.0)
_AIR, _FAT, _SOFT, _BONE, _CANAL = -1000.0, -100.0, 40.0, 600.0, 20.0
_NOISE_HU = 12.0  # per-pixel quantum noise, fresh for every image
_TEXTURE_HU = 15.0  # amplitude of the per-patient smooth tissue texture


@dataclass(frozen=True)
class Anatomy:
    """One patient's fixed geometry, in normalised coordinates (the image spans [-1, 1])."""

    body: tuple[float, float, float, float]  # center x, y, semi-axes a, b
    fat: float  # fat rim thickness
    organ: tuple[float, float, float, float, float]  # center x, y, semi-axes, angle (rad)
    organ_hu: float
    lesions: tuple[tuple[float, float, float, float], ...]  # x, y, radius, contrast HU
    texture: np.ndarray  # (S, S) smooth field, unit std


def phantom_population(n_patients: int, images_per_patient: int, *, image_size: int = 64,
                       seed: int, class_balance: float = 0.5) -> SourceData:
    """``n_patients`` x ``images_per_patient`` phantoms; round(class_balance * n) are lesions.

    Images are uint16 (N, S, S) grouped by patient; ``patient_ids`` are "PHANTOM-<seed>-<p>";
    ``masks`` uint8 (N, S, S) are the lesion masks (1 = lesion).
    """
    if n_patients < 1 or images_per_patient < 1 or image_size < 8:
        raise SourceDataError(f"need n_patients >= 1, images_per_patient >= 1, image_size >= 8; "
                              f"got {n_patients}, {images_per_patient}, {image_size}")
    if not 0.0 <= class_balance <= 1.0:
        raise SourceDataError(f"class_balance must lie in [0, 1], got {class_balance}")
    rng = np.random.default_rng(seed)
    n_lesion = round(class_balance * n_patients)
    patient_label = rng.permutation(np.repeat([0, 1], [n_patients - n_lesion, n_lesion]))
    images = np.empty((n_patients * images_per_patient, image_size, image_size), dtype=np.uint16)
    masks = np.zeros_like(images, dtype=np.uint8)  # (N, S, S) 1 = lesion
    for p in range(n_patients):
        anatomy = draw_anatomy(rng, image_size, lesion=bool(patient_label[p]))
        for k in range(images_per_patient):
            hu, lesion = render_slice(anatomy, rng, image_size)
            images[p * images_per_patient + k] = to_stored_values(hu)
            masks[p * images_per_patient + k] = lesion
    ids = np.array([f"PHANTOM-{seed}-{p:05d}" for p in range(n_patients)], dtype=np.str_)
    return SourceData(
        images=images,
        labels=np.repeat(patient_label, images_per_patient).astype(np.int64),
        patient_ids=np.repeat(ids, images_per_patient),
        class_names=CLASS_NAMES,
        mapping=CT_MAPPING,
        masks=masks,
    )


def draw_anatomy(rng: np.random.Generator, size: int, *, lesion: bool) -> Anatomy:
    """Draw one patient's body, organ, texture and (for the lesion class) lesions."""
    a, b = rng.uniform(0.78, 0.9), rng.uniform(0.58, 0.72)
    cx, cy = rng.normal(0.0, 0.03, size=2)
    ox, oy = cx - a * rng.uniform(0.25, 0.35), cy - b * rng.uniform(0.0, 0.15)
    organ = (ox, oy, a * rng.uniform(0.42, 0.5), b * rng.uniform(0.5, 0.6), rng.uniform(-0.4, 0.4))
    lesions: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, 4)) if lesion else 0):
        r, theta = 0.55 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        lx, ly = _rotate(r * organ[2] * np.cos(theta), r * organ[3] * np.sin(theta), organ[4])
        lesions.append((ox + lx, oy + ly, rng.uniform(0.1, 0.18), rng.uniform(80.0, 130.0)))
    return Anatomy(body=(cx, cy, a, b), fat=rng.uniform(0.06, 0.1), organ=organ,
                   organ_hu=rng.uniform(95.0, 110.0), lesions=tuple(lesions),
                   texture=smooth_field(rng, size))


def render_slice(anatomy: Anatomy, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image of a patient in HU (S, S), the anatomy plus per-image jitter and noise, and its
    lesion mask uint8 (S, S): 1 where the blobs drawn into this image (inside the organ) have
    membership ≥ 0.5."""
    scale = 1.0 + rng.normal(0.0, 0.015)
    shift = rng.normal(0.0, 0.02, size=2)
    grid = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    u = (grid[None, :] - shift[0]) / scale
    v = (grid[:, None] - shift[1]) / scale
    edge = 1.5 / size  # about one pixel of soft edge: antialiased outlines
    cx, cy, a, b = anatomy.body
    body = soft_ellipse(u, v, (cx, cy, a, b, 0.0), edge)
    inner = soft_ellipse(u, v, (cx, cy, a - anatomy.fat, b - anatomy.fat, 0.0), edge)
    organ = soft_ellipse(u, v, anatomy.organ, edge)
    spine_y = cy + 0.72 * (b - anatomy.fat)
    bone = soft_ellipse(u, v, (cx, spine_y, 0.11, 0.1, 0.0), edge)
    canal = soft_ellipse(u, v, (cx, spine_y + 0.02, 0.04, 0.035, 0.0), edge)
    hu = _AIR + body * (_FAT - _AIR) + inner * (_SOFT - _FAT)
    hu += inner * _TEXTURE_HU * anatomy.texture
    hu += organ * (anatomy.organ_hu - _SOFT)
    lesion = np.zeros_like(hu)  # (S, S) membership of the union of this image's blobs
    for lx, ly, radius, contrast in anatomy.lesions:
        wobble = rng.normal(0.0, 0.01, size=2)
        r = radius * (1.0 + rng.normal(0.0, 0.05))
        disc = soft_ellipse(u, v, (lx + wobble[0], ly + wobble[1], r, r, 0.0), edge)
        hu += organ * contrast * disc
        lesion = np.maximum(lesion, organ * disc)
    hu += bone * (_BONE - hu) + canal * (_CANAL - _BONE)
    return hu + rng.normal(0.0, _NOISE_HU, size=hu.shape), (lesion >= 0.5).astype(np.uint8)


def soft_ellipse(u: np.ndarray, v: np.ndarray, shape: tuple[float, float, float, float, float],
                 edge: float) -> np.ndarray:
    """Membership in [0, 1] of a rotated ellipse (cx, cy, ax, ay, angle) with a logistic edge."""
    cx, cy, ax, ay, angle = shape
    du, dv = _rotate(u - cx, v - cy, -angle)
    r = np.sqrt((du / ax) ** 2 + (dv / ay) ** 2)
    return np.asarray(0.5 * (1.0 + np.tanh((1.0 - r) * min(ax, ay) / (2.0 * edge))))


def smooth_field(rng: np.random.Generator, size: int, cycles: float = 4.0) -> np.ndarray:
    """White noise low-passed by a Gaussian (about ``cycles`` per image), unit std."""
    freq = np.fft.fftfreq(size) * size  # cycles per image
    gain = np.exp(-(freq[:, None] ** 2 + freq[None, :] ** 2) / (2.0 * cycles**2))
    field = np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * gain).real
    return np.asarray((field - field.mean()) / (field.std() + 1e-12))


def to_stored_values(hu: np.ndarray) -> np.ndarray:
    """HU -> uint16 stored values (HU + 1024, clipped to 12 bits)."""
    stored: np.ndarray = np.clip(np.rint(hu + HU_OFFSET), 0, 4095).astype(np.uint16)
    return stored


def _rotate(x: np.ndarray | float, y: np.ndarray | float, angle: float) -> tuple[
        np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return np.asarray(c * x - s * y), np.asarray(s * x + c * y)
