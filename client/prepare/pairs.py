"""Pair mode: give each image without a PNG mask its mask from the DICOM SEG files that name it.

The workers (``client.prepare.workers``) read every file on its own: an image with a PNG mask
``masks/<same path>.png`` comes back paired; an image without one comes back waiting, with its
SOP Instance UID (0008,0018); a DICOM SEG file comes back rejected as ``not-an-image`` with the
masks it holds at full size (``common.dicom.seg``). Once all files are read,
:func:`pair_with_segmentations` joins them by that UID:

* a waiting image named by one or more SEG files gets the union of their masks (a pixel is
  foreground when any of them says so), resized and thresholded as a PNG mask would be
  (``client.prepare.workers.mask_channel``); a SEG mask of another size than the image, or an image
  of several frames, is ``mask-mismatch``; an image no SEG names is ``no-mask``;
* a SEG that names no image read in this folder is ``mask-mismatch`` (nothing else is lost);
* a PNG mask wins: a SEG naming an image that has one is not used for it.

The UIDs live only in memory while preparing; neither the cache nor the report holds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from client.prepare.workers import FileOutcome, SegmentationPart, mask_channel
from common.pairs import mask_rel

_NO_IMAGE_FIX = ("copy the image the SEG references (by SOP Instance UID) into the data folder, or remove "
                 "the SEG from it")


@dataclass(frozen=True)
class SegmentationPairing:
    """Outcomes after matching, and how many kept images took their mask from a DICOM SEG."""

    outcomes: list[FileOutcome]
    masks_from_seg: int


def pair_with_segmentations(outcomes: Sequence[FileOutcome], image_size: int) -> SegmentationPairing:
    """Resolve every waiting image and every SEG file of one prepare run (see the module doc)."""
    named: dict[str, list[SegmentationPart]] = {}
    for outcome in outcomes:
        for part in outcome.segmentation:
            named.setdefault(part.source_uid, []).append(part)
    read = {o.sop_instance_uid for o in outcomes if o.images is not None and o.sop_instance_uid}
    resolved: list[FileOutcome] = []
    from_seg = 0
    for outcome in outcomes:
        if outcome.images is not None and outcome.frame_shape is not None:
            parts = named.get(outcome.sop_instance_uid, [])
            outcome = _with_seg_mask(outcome, len(outcome.images), outcome.frame_shape, parts, image_size)
            from_seg += outcome.masks is not None
        elif outcome.segmentation and not any(p.source_uid in read for p in outcome.segmentation):
            outcome = replace(outcome, reason="mask-mismatch", segmentation=(), fix=_NO_IMAGE_FIX,
                              message=f"a DICOM SEG naming {len(outcome.segmentation)} image(s), none of "
                                      "them an image read in the data folder")
        resolved.append(outcome)
    return SegmentationPairing(resolved, from_seg)


def _with_seg_mask(image: FileOutcome, frames: int, frame_shape: tuple[int, int],
                   parts: list[SegmentationPart], image_size: int) -> FileOutcome:
    """The waiting ``image`` ((``frames``, H, W) before resizing) with the union of the SEG masks
    naming it, or its rejection."""
    if not parts:
        return _rejected(image, "no-mask", f"no mask {mask_rel(image.rel)} and no DICOM SEG in the data folder "
                                           "names this image")
    if frames != 1:
        return _rejected(image, "mask-mismatch", f"the image has {frames} frames; a pair needs one frame per file")
    height, width = frame_shape
    for part in parts:
        if part.shape != frame_shape:
            return _rejected(image, "mask-mismatch", f"DICOM SEG mask {part.shape[1]}×{part.shape[0]} but image "
                                                     f"{width}×{height} pixels")
    union = np.logical_or.reduce([part.mask() for part in parts])  # (H, W) bool
    return replace(image, masks=mask_channel(union, image_size), frame_shape=None)


def _rejected(image: FileOutcome, reason: str, message: str) -> FileOutcome:
    return FileOutcome(image.rel, reason=reason, message=message)
