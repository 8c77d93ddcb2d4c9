"""Atomic, pickle-free checkpoints of the global G and D, one file per finished round.

Format: safetensors (a JSON header and raw little-endian tensor bytes, no code execution on
load; ``torch.load`` has had ``weights_only`` bypasses, CVE-2025-32434). The header's metadata
holds the round, the server's round history (JSON), the class names and Flower run id, how the
run's model started (``initialisation``: the random seed, or the content hash and file name of
the public checkpoint it started from; absent in files written before it was recorded), so a
checkpoint file alone says what its generator draws and where it came from, and
``content_sha256``, a hash over every
tensor's name, dtype, shape and bytes, checked on load. A file is written to a temporary name,
fsynced and renamed, so a crash leaves no half-written ``round-NNNN.safetensors``; a file that
is truncated or altered anyway fails its hash and is skipped, and resume takes the newest
checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from common.atomic import write_bytes_atomic
from common.round_record import (
    NOT_RECORDED,
    Initialisation,
    RoundRecord,
    SitePrivacyReport,
    history_from_json,
    history_to_json,
    reports_from_json,
    reports_to_json,
)

log = logging.getLogger("medsynth.checkpoint")
NAME = re.compile(r"^round-(\d{4,})\.safetensors$")


class CheckpointInvalid(Exception):
    """A checkpoint file is truncated, altered or not ours; it is never loaded."""


@dataclass(frozen=True)
class Checkpoint:
    """The global model after ``round`` and the history of rounds 1..round."""

    round: int
    arrays: dict[str, np.ndarray]
    history: tuple[RoundRecord, ...]
    path: Path
    content_sha256: str
    class_names: tuple[str, ...] | None = None  # None: written before the names were recorded
    run_id: int | None = None
    initialisation: Initialisation = NOT_RECORDED  # NOT_RECORDED: written before it was recorded
    # every hospital's newest privacy report, as the final model brought it to a hospital (its kept
    # models have no round history); empty elsewhere: a server's checkpoint has the history
    site_privacy: Mapping[str, SitePrivacyReport] = field(default_factory=dict)


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def checkpoint_path(folder: Path, server_round: int) -> Path:
    return folder / f"round-{server_round:04d}.safetensors"


def save_checkpoint(
    folder: Path,
    server_round: int,
    arrays: dict[str, np.ndarray],
    history: Sequence[RoundRecord],
    *,
    class_names: Sequence[str] = (),
    run_id: int | None = None,
    initialisation: Initialisation = NOT_RECORDED,
    site_privacy: Mapping[str, SitePrivacyReport] | None = None,
) -> Path:
    """Write round ``server_round`` atomically and durably; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = content_hash(arrays)
    meta = {"round": str(server_round), "history": history_to_json(history), "content_sha256": digest}
    if class_names:
        meta["class_names"] = json.dumps(list(class_names))
    if run_id is not None:
        meta["run_id"] = str(run_id)
    if initialisation != NOT_RECORDED:
        meta["initialisation"] = json.dumps(initialisation.to_json())
    if site_privacy:
        meta["site_privacy"] = reports_to_json(site_privacy)
    blob = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
    final = checkpoint_path(folder, server_round)
    write_bytes_atomic(final, blob)
    return final


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (8-byte little-endian length, then JSON)."""
    if len(blob) < 8:
        raise CheckpointInvalid("shorter than a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise CheckpointInvalid("header length beyond end of file (truncated)")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError as exc:
        raise CheckpointInvalid(f"header is not JSON: {exc}") from exc
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise CheckpointInvalid("no metadata in header")
    return meta


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint; raises ``CheckpointInvalid`` if anything is off."""
    blob = path.read_bytes()
    meta = _metadata(blob)
    try:
        arrays = st_load(blob)
    except SafetensorError as exc:
        raise CheckpointInvalid(f"{path.name}: {exc}") from exc
    digest = content_hash(arrays)
    if digest != meta.get("content_sha256"):
        raise CheckpointInvalid(f"{path.name}: content hash mismatch (altered or torn)")
    try:
        server_round = int(meta["round"])
        history = history_from_json(meta["history"], source=path.name)
        names = tuple(str(n) for n in json.loads(meta["class_names"])) if "class_names" in meta else None
        run_id = int(meta["run_id"]) if "run_id" in meta else None
        init = (Initialisation.from_json(json.loads(meta["initialisation"]), source=path.name)
                if "initialisation" in meta else NOT_RECORDED)
        site_privacy = reports_from_json(meta["site_privacy"], source=path.name) if "site_privacy" in meta else {}
    except (KeyError, ValueError, TypeError) as exc:  # RecordError is a ValueError
        raise CheckpointInvalid(f"{path.name}: bad metadata ({exc})") from exc
    return Checkpoint(server_round, dict(arrays), history, path, digest, names, run_id, init, site_privacy)


def latest_valid_checkpoint(folder: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; invalid ones are logged and skipped, never loaded."""
    if not folder.is_dir():
        return None
    rounds = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name))
    )
    for _, path in reversed(rounds):
        try:
            return load_checkpoint(path)
        except CheckpointInvalid as exc:
            log.warning("skipping invalid checkpoint %s: %s", path, exc)
    return None
