"""Image–mask pairs (run mode ``model.pairs``): where a hospital keeps its masks and how one is read.

Layout. The mask of the image ``<data_dir>/<rel>`` (a DICOM file) is the PNG
``<data_dir>/masks/<rel with its suffix replaced by .png>``: a ``masks/`` folder beside the
class folders, mirroring them, same names. ``node prepare`` pairs by that name and nothing else
(no header is consulted), so a pair cannot be mis-matched by a header's content. The name
``masks`` is reserved: that folder is never read as a class of images, with or without pairs.

A mask is one greyscale PNG (8-bit ``L`` or 1-bit) of exactly the image's size; a pixel above
127 is foreground. It is resized to the model side by the same function as the image
(``common.dataset.resize_to_square``: padding to a centred square, then an antialiased resize),
then thresholded at 0.5, as the HC18 masks were made (``../shared/data/segmentation/hc18``), so
image and mask stay aligned pixel for pixel. In the cache and in the models the mask is a second
channel in {-1, 1} (-1 background, 1 foreground), the image channel's range.

Privacy: masks are private data exactly like the images. They enter the cache beside the images,
and only the DP-trained discriminator ever reads them (one row per sampled patient holds both
channels, so clipping that row's gradient bounds the image and the mask together).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

MASKS_FOLDER = "masks"  # under the data folder, mirroring the class folders
MASK_SUFFIX = ".png"
IMAGE_CHANNEL, MASK_CHANNEL = 0, 1  # channel order of a pair (N, 2, S, S)
MASK_SEGMENT_LABEL = "lesion"  # Segment Label (0062,0005) of the one segment of an exported DICOM SEG
MAX_MASK_BYTES = 64 * 2**20  # a mask file larger than this is refused before Pillow opens it


class MaskUnreadable(ValueError):
    """A mask file is missing, not a plain greyscale PNG, or too large; the message says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # a key of common.dicom.errors.REJECTION_REASONS: no-mask | mask-unreadable


def mask_rel(image_rel: str) -> str:
    """``"lesion/a.dcm"`` → ``"masks/lesion/a.png"``: the one name rule of a pair (POSIX paths)."""
    return (PurePosixPath(MASKS_FOLDER) / PurePosixPath(image_rel).with_suffix(MASK_SUFFIX)).as_posix()


def is_mask_rel(rel: str) -> bool:
    """Whether a data-folder entry lies under the masks folder (it is then no training image)."""
    return PurePosixPath(rel).parts[:1] == (MASKS_FOLDER,)


def read_mask(root: Path, image_rel: str, max_pixels: int) -> np.ndarray:
    """The mask of ``image_rel`` as bool (H, W), True = foreground; :class:`MaskUnreadable` otherwise.

    The file is checked with ``lstat`` (no link is followed), capped in bytes and in pixels before
    decoding (a PNG bomb stops at the header), and must be a one-frame greyscale PNG.
    """
    rel = mask_rel(image_rel)
    path = root / rel
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MaskUnreadable("no-mask", f"no mask {rel} for this image") from None
    except OSError as exc:
        raise MaskUnreadable("mask-unreadable", f"mask {rel}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise MaskUnreadable("mask-unreadable", f"mask {rel} is not a regular file (links are not followed)")
    if st.st_size > MAX_MASK_BYTES:
        raise MaskUnreadable("mask-unreadable", f"mask {rel} is {st.st_size} bytes, over {MAX_MASK_BYTES}")
    try:
        with Image.open(path, formats=["PNG"]) as img:
            if img.width * img.height > max_pixels:
                raise MaskUnreadable("mask-unreadable", f"mask {rel} declares {img.width}×{img.height} pixels, "
                                                        f"over the cap of {max_pixels}")
            if img.mode not in ("L", "1") or getattr(img, "n_frames", 1) != 1:
                raise MaskUnreadable("mask-unreadable", f"mask {rel} is mode {img.mode} with "
                                                        f"{getattr(img, 'n_frames', 1)} frame(s); expected one "
                                                        "8-bit greyscale (L) or 1-bit frame")
            pixels = np.asarray(img.convert("L"), dtype=np.uint8)  # (H, W)
    except MaskUnreadable:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MaskUnreadable("mask-unreadable", f"mask {rel} is not a readable PNG: {exc}") from exc
    foreground: np.ndarray = pixels > 127
    return foreground


def to_mask_channel(resized: np.ndarray) -> np.ndarray:
    """A resized mask in [0, 1] (..., S, S) → float32 {-1, 1}: threshold at 0.5, as HC18's masks."""
    return np.where(resized >= 0.5, 1.0, -1.0).astype(np.float32)


def binary_masks(channel: np.ndarray) -> np.ndarray:
    """A mask channel in [-1, 1] (a cache's, or a generator's tanh output) → bool, foreground above 0."""
    out: np.ndarray = np.asarray(channel) > 0.0
    return out
