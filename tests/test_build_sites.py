"""``medsynth simulate`` prepares its sites several at a time (simulation.runner.build_sites):
each site's prepared data must be what preparing the sites one after another gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.config import site_paths
from common.dataset import load_cache
from simulation.runner import SimulateOptions, build_sites, load_source


def _prepared(out: Path, parallel: int) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    opts = SimulateOptions(out=out, sites=2, patients_per_site=3, images_per_patient=2)
    said: list[str] = []
    ledgers = build_sites(opts, load_source(opts), say=said.append, parallel=parallel)
    assert [line.split(":")[0] for line in said] == ["site-0", "site-1"]  # site order, whatever finished first
    assert list(ledgers) == ["site-0", "site-1"]
    caches = {site: load_cache(site_paths(out / "sites" / site).cache_dir) for site in ledgers}
    return {site: (ds.images, ds.labels, ds.num_patients) for site, ds in caches.items()}


def test_sites_prepared_at_once_hold_what_one_after_another_gives(tmp_path: Path) -> None:
    # prepare: the same two phantom sites, built one at a time and both at once
    serial = _prepared(tmp_path / "serial", parallel=1)
    # act
    parallel = _prepared(tmp_path / "parallel", parallel=2)
    # assert: every site has the same images, labels and patient count either way
    assert serial.keys() == parallel.keys()
    for site, (images, labels, patients) in serial.items():
        p_images, p_labels, p_patients = parallel[site]
        assert patients == p_patients == 3
        np.testing.assert_array_equal(images, p_images)
        np.testing.assert_array_equal(labels, p_labels)


def test_a_simulated_site_holds_what_the_nodes_sandboxed_prepare_gives(tmp_path: Path) -> None:
    # prepare: a site built by the simulation (its own files, decoded in the preparing process)
    from client.prepare.pipeline import load_or_create_salt, prepare_site

    built = _prepared(tmp_path / "built", parallel=2)
    site = site_paths(tmp_path / "built" / "sites" / "site-0")
    # act: the same files through a hospital node's sandboxed decoding workers, with the site's salt
    prepare_site(tmp_path / "built" / "sites" / "site-0" / "dicom", tmp_path / "sandboxed",
                 image_size=SimulateOptions(out=tmp_path, sites=2).run.model.image_size,
                 salt=load_or_create_salt(site.salt_path), class_names=("normal", "lesion"), progress=False,
                 workers=1)
    sandboxed = load_cache(tmp_path / "sandboxed")
    # assert: the same images, labels and patients
    images, labels, patients = built["site-0"]
    np.testing.assert_array_equal(images, sandboxed.images)
    np.testing.assert_array_equal(labels, sandboxed.labels)
    assert patients == sandboxed.num_patients
