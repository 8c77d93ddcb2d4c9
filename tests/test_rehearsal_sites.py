"""``medsynth simulate --write-sites DIR``: one DICOM folder per hospital that ``node prepare`` reads
whole, holding the split a simulation with the same options trains on."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from client.prepare.pipeline import PrepareReport, prepare_site
from common.dataset import CACHE_FILE
from medsynth.cli import main
from simulation.partition import load_medmnist_npz, split_by_patient
from simulation.phantoms import phantom_population


def _write_sites(*argv: str | Path) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["simulate", *map(str, argv)])
    return code, out.getvalue()


def _prepare(folder: Path, cache: Path, class_names: tuple[str, ...], salt: bytes) -> PrepareReport:
    return prepare_site(folder, cache, image_size=32, salt=salt, class_names=class_names, progress=False)


def _patient_hashes(cache: Path) -> set[str]:
    """The salted patient hashes ``prepare`` stored in the cache."""
    with np.load(cache / CACHE_FILE, allow_pickle=False) as npz:
        return {str(h) for h in npz["patient_hashes"]}


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5"])
def test_phantom_sites_are_read_whole_by_node_prepare_with_the_simulations_split(tmp_path: Path,
                                                                                  partition: str) -> None:
    # prepare: the split the simulation makes of the same phantoms (3 sites × 8 patients × 2 images, seed 7)
    source = phantom_population(24, 2, image_size=64, seed=7)
    expected = split_by_patient(source, 3, partition, seed=7)
    # act: write the sites, then read each folder with the hospital's own prepare code
    code, printed = _write_sites("--write-sites", tmp_path / "sites", "--sites", "3", "--patients-per-site", "8",
                                 "--images-per-patient", "2", "--seed", "7", "--partition", partition)
    salt = b"s" * 32  # one salt for all sites, so a patient in two sites would show as one hash twice
    reports = {site: _prepare(tmp_path / "sites" / site, tmp_path / "cache" / site, source.class_names, salt)
               for site in ("site-0", "site-1", "site-2")}
    # assert: nothing rejected, each site holds exactly its share of the split, patients intact
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == ["site-0", "site-1", "site-2"]
    hashes: list[set[str]] = []
    for (site, report), indices in zip(reports.items(), expected, strict=True):
        assert report.rejected == {} and report.files_seen == report.images_kept == indices.size
        counts = np.bincount(source.labels[indices], minlength=2)
        assert report.label_counts == {"normal": int(counts[0]), "lesion": int(counts[1])}
        assert report.patient_identity is True
        assert report.patients == np.unique(source.patient_ids[indices]).size  # type: ignore[index]
        assert f"{site}: {indices.size} images of {report.patients} patients" in printed
        hashes.append(_patient_hashes(tmp_path / "cache" / site))
    assert sum(len(h) for h in hashes) == len(set().union(*hashes)) == 24  # no patient in two sites
    assert 'class-names = "normal,lesion"' in printed


def test_the_same_options_write_the_same_files(tmp_path: Path) -> None:
    argv = ("--sites", "2", "--patients-per-site", "3", "--images-per-patient", "1", "--seed", "2")
    _write_sites("--write-sites", tmp_path / "a", *argv)
    _write_sites("--write-sites", tmp_path / "b", *argv)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.dcm"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.dcm"))
    assert files_a == files_b and len(files_a) == 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)


def test_an_earlier_rehearsal_or_a_training_option_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sites" / "site-1").mkdir(parents=True)
    (tmp_path / "sites" / "site-1" / "old.dcm").write_bytes(b"x")
    code = main(["simulate", "--write-sites", str(tmp_path / "sites"), "--sites", "2", "--patients-per-site", "2"])
    assert code == 2 and "site-1 already holds files" in capsys.readouterr().err
    assert not (tmp_path / "sites" / "site-0").exists()
    code = main(["simulate", "--write-sites", str(tmp_path / "other"), "--rounds", "3"])
    assert code == 2 and "--rounds would have no effect" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_a_missing_dataset_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--write-sites", str(tmp_path / "sites"), "--dataset", str(tmp_path / "absent.npz")])
    assert code == 2 and "absent.npz not found: pass a MedMNIST" in capsys.readouterr().err


def test_medmnist_sites_have_the_simulations_split(tmp_path: Path, shared_data_dir: Path) -> None:
    npz = shared_data_dir / "medmnist" / "pneumoniamnist.npz"
    if not npz.is_file():
        pytest.skip(f"{npz} not found")
    code, printed = _write_sites("--write-sites", tmp_path / "sites", "--dataset", npz, "--max-images", "60",
                                 "--sites", "2", "--partition", "dirichlet:1.0", "--seed", "4")
    total = {"normal": 0, "pneumonia": 0}
    for site in ("site-0", "site-1"):
        report = _prepare(tmp_path / "sites" / site, tmp_path / "cache" / site, ("normal", "pneumonia"), b"t" * 32)
        assert report.rejected == {} and report.patient_identity is False
        assert report.patients == report.images_kept  # no patient identity: each file its own unit
        for name, n in report.label_counts.items():
            total[name] += n
    # the 60 images are the subset the simulation draws with seed 4 (same rule, same counts)
    labels = load_medmnist_npz(npz).labels
    keep = np.random.default_rng(4).choice(labels.size, 60, replace=False)
    assert total == {"normal": int((labels[keep] == 0).sum()), "pneumonia": int((labels[keep] == 1).sum())}
    assert code == 0 and "no patient identity" in printed
