"""``medsynth simulate --write-sites DIR``: a simulated consortium's data, for rehearsing a deployment.

A rehearsal follows ``deploy/README.md`` with real processes (CA, server, one node per hospital)
before any patient image is involved. Each hospital needs a DICOM folder laid out as ``node
prepare`` reads it: ``DIR/site-N/<class name>/*.dcm``. This writes exactly the data a
``medsynth simulate`` run with the same options trains on: the built-in phantoms (default) or a
MedMNIST ``.npz``, split by patient with the same partition and seed (:func:`simulation.runner.site_shares`),
written by the same :func:`simulation.partition.write_site_dicom`. Phantom patients keep one Patient ID
(0010,0020) across their images, and a patient is in one site only. MedMNIST publishes no patient
identity, so its files carry none (``node prepare`` then says that privacy is per file).

Nothing is trained and no key is made: the rehearsal makes its keys with ``medsynth certs`` as the
real deployment does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import ConfigError
from simulation.partition import SourceData, write_site_dicom
from simulation.runner import SimulateOptions, load_source, site_shares


@dataclass(frozen=True)
class WrittenSite:
    """One hospital's folder: where, how many images and patients, images per class."""

    site: str
    folder: Path
    images: int
    patients: int
    class_counts: dict[str, int]


def _patients(source: SourceData, indices: np.ndarray) -> int:
    """Distinct patients among ``indices`` (each image is its own patient without ids)."""
    if source.patient_ids is None:
        return int(indices.size)
    return int(np.unique(source.patient_ids[indices]).size)


def write_sites(opts: SimulateOptions, out: Path, say: Callable[[str], None] = print) -> list[WrittenSite]:
    """Write every simulated hospital's DICOM folder under ``out``; refuse to mix with earlier files.

    A site folder that exists and is not empty is refused before anything is written: files of
    two rehearsals in one folder would be read as one hospital's data.
    """
    folders = {f"site-{i}": out / f"site-{i}" for i in range(opts.sites)}
    used = [str(f) for f in folders.values() if f.exists() and any(f.iterdir())]
    if used:
        raise ConfigError(f"{', '.join(used)} already {'holds' if len(used) == 1 else 'hold'} files: write the "
                          "sites to an empty folder "
                          "(or delete the old rehearsal's data first)")
    source = load_source(opts)
    seed = opts.run.federation.seed
    say(f"data: {'phantoms' if opts.dataset is None else opts.dataset} — {source.labels.size} images, "
        f"classes {list(source.class_names)}, partition {opts.partition}, seed {seed}, {opts.sites} sites")
    written: list[WrittenSite] = []
    for site, indices in site_shares(opts, source).items():
        write_site_dicom(source, indices, folders[site], site_name=site, seed=seed, masks=opts.run.model.pairs)
        counts = np.bincount(source.labels[indices], minlength=len(source.class_names))
        done = WrittenSite(site, folders[site], int(indices.size), _patients(source, indices),
                           {name: int(n) for name, n in zip(source.class_names, counts, strict=True)})
        written.append(done)
        say(f"{site}: {done.images} images of {done.patients} patients {done.class_counts} → {done.folder}")
    say(f"each hospital's node.toml: [node] data-dir = \"{out / 'site-N'}\"; "
        f"[prepare] class-names = \"{','.join(source.class_names)}\"")
    say(f"server.toml [run]: \"data.class-names\" = \"{','.join(source.class_names)}\"")
    if source.patient_ids is None:
        say("note: this data set has no patient identity (no Patient ID): each file is its own privacy unit")
    say("rehearse with a separate state-dir for the server and every node, and delete those state folders "
        "before the real run (deploy/README.md, \"Rehearse first\")")
    return written
