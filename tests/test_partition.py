"""simulation.partition + simulation.phantoms: patient-level splits and DICOM site folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from simulation.partition import (
    PartitionError,
    PartitionScheme,
    SourceData,
    SourceDataError,
    load_medmnist_npz,
    parse_partition,
    split_by_patient,
    write_site_dicom,
)
from simulation.phantoms import HU_OFFSET, phantom_population


def grouped_source(patient_sizes: list[int], patient_labels: list[int]) -> SourceData:
    """Tiny images; patient p has ``patient_sizes[p]`` images, all labelled ``patient_labels[p]``."""
    ids = np.repeat([f"P{p}" for p in range(len(patient_sizes))], patient_sizes)
    labels = np.repeat(patient_labels, patient_sizes).astype(np.int64)
    return SourceData(images=np.zeros((ids.size, 2, 2), np.uint8), labels=labels,
                      patient_ids=ids.astype(np.str_), class_names=("a", "b", "c"))


def label_skew(source: SourceData, sites: list[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label mix and the global mix."""
    k = len(source.class_names)
    overall = np.bincount(source.labels, minlength=k) / source.labels.size
    site_mix = [np.bincount(source.labels[s], minlength=k) / s.size for s in sites]
    return float(np.mean([0.5 * np.abs(mix - overall).sum() for mix in site_mix]))


@pytest.mark.parametrize(("text", "expected"), [
    ("iid", PartitionScheme("iid")),
    (" IID ", PartitionScheme("iid")),
    ("dirichlet:0.5", PartitionScheme("dirichlet", 0.5)),
    ("Dirichlet:1e-2", PartitionScheme("dirichlet", 0.01)),
])
def test_parse_partition_accepts(text: str, expected: PartitionScheme) -> None:
    assert parse_partition(text) == expected


@pytest.mark.parametrize("text", ["", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1",
                                  "dirichlet:nan", "dirichlet:inf", "dirichlet:abc", "shards:2"])
def test_parse_partition_rejects_with_a_value_error(text: str) -> None:
    with pytest.raises(PartitionError, match="iid") as info:
        parse_partition(text)
    assert isinstance(info.value, ValueError)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=4, max_size=30),
    n_sites=st.integers(1, 4),
    scheme=st.sampled_from(["iid", "dirichlet:0.05", "dirichlet:1", "dirichlet:100"]),
    seed=st.integers(0, 2**31),
)
def test_split_covers_every_image_once_and_never_splits_a_patient(sizes: list[int], n_sites: int,
                                                                  scheme: str, seed: int) -> None:
    # prepare
    source = grouped_source(sizes, [p % 3 for p in range(len(sizes))])
    assert source.patient_ids is not None
    # act
    sites = split_by_patient(source, n_sites, scheme, seed)
    # assert
    assert len(sites) == n_sites
    assert np.array_equal(np.sort(np.concatenate(sites)), np.arange(sum(sizes)))
    patient_sets = [set(source.patient_ids[s].tolist()) for s in sites]
    assert all(patient_sets)  # every site has at least one patient
    assert sum(len(p) for p in patient_sets) == len(sizes)  # pairwise disjoint


def test_same_seed_same_split_and_other_seed_other_split() -> None:
    source = phantom_population(40, 2, image_size=8, seed=0)
    first = split_by_patient(source, 4, "dirichlet:0.5", seed=11)
    again = split_by_patient(source, 4, "dirichlet:0.5", seed=11)
    other = split_by_patient(source, 4, "dirichlet:0.5", seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_small_alpha_skews_labels_far_more_than_iid() -> None:
    # prepare: 300 patients, 3 balanced classes, 5 sites; averaged over 5 seeds
    source = grouped_source([1] * 300, [p % 3 for p in range(300)])
    # act
    iid = np.mean([label_skew(source, split_by_patient(source, 5, "iid", s)) for s in range(5)])
    skewed = np.mean([label_skew(source, split_by_patient(source, 5, "dirichlet:0.1", s))
                      for s in range(5)])
    # assert: iid stays near the global mix; Dirichlet(0.1) moves far from it
    assert iid < 0.02
    assert skewed > 0.35


def test_dirichlet_repair_guarantees_the_minimum_per_site() -> None:
    source = grouped_source([2] * 20, [0] * 20)  # one class: Dirichlet piles it on few sites
    for seed in range(10):
        sites = split_by_patient(source, 10, "dirichlet:0.01", seed, min_patients_per_site=2)
        assert [s.size for s in sites] == [4] * 10  # exactly 2 patients x 2 images each
    with pytest.raises(PartitionError, match="fewer sites"):
        split_by_patient(source, 11, "dirichlet:0.01", 0, min_patients_per_site=2)


def test_without_patient_ids_each_image_is_a_patient() -> None:
    source = SourceData(images=np.zeros((7, 2, 2), np.uint8), labels=np.zeros(7, np.int64),
                        patient_ids=None, class_names=("x",))
    sites = split_by_patient(source, 7, "iid", seed=3)
    assert sorted(s.size for s in sites) == [1] * 7


def test_write_site_dicom_writes_conformant_secondary_capture(tmp_path: Path) -> None:
    # prepare
    source = phantom_population(2, 2, image_size=16, seed=4)
    # act
    count = write_site_dicom(source, np.array([0, 3]), tmp_path / "a", site_name="siteA", seed=9)
    again = write_site_dicom(source, np.array([0, 3]), tmp_path / "b", site_name="siteA", seed=9)
    files = sorted((tmp_path / "a").rglob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    # assert
    assert count == again == len(files) == 2
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
    assert (ds.PhotometricInterpretation, ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (
        "MONOCHROME2", 16, 16, 16, 12)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -float(HU_OFFSET))
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 400.0)
    assert ds.PatientID.startswith("PHANTOM-4-") and "StudyInstanceUID" in ds
    assert np.array_equal(ds.pixel_array, source.images[int(ds.InstanceNumber) - 1])
    for name in ("siteA_000000.dcm", "siteA_000001.dcm"):  # same seed -> byte-identical files
        a, b = next((tmp_path / "a").rglob(name)), next((tmp_path / "b").rglob(name))
        assert a.read_bytes() == b.read_bytes()


def test_write_site_dicom_omits_identity_without_patient_ids(tmp_path: Path) -> None:
    source = SourceData(images=np.full((1, 4, 4), 7, np.uint8), labels=np.zeros(1, np.int64),
                        patient_ids=None, class_names=("only",))
    write_site_dicom(source, np.array([0]), tmp_path, site_name="s", seed=0)
    ds = pydicom.dcmread(next(tmp_path.rglob("*.dcm")))
    assert "PatientID" not in ds and "StudyInstanceUID" not in ds and ds.BitsStored == 8
    with pytest.raises(SourceDataError):
        write_site_dicom(source, np.array([0]), tmp_path, site_name="../escape", seed=0)


def test_phantoms_have_a_lesion_signal_and_patient_consistency() -> None:
    # prepare
    source = phantom_population(20, 4, image_size=32, seed=7)
    hu = source.images.astype(np.float64) - HU_OFFSET
    # act: fraction of pixels in the lesion band (brighter than organ, darker than bone)
    bright = ((hu > 170) & (hu < 400)).mean(axis=(1, 2))
    flat = hu.reshape(20, 4, -1)
    within = np.mean([np.corrcoef(flat[p])[0, 1:].mean() for p in range(20)])
    between = np.mean([np.corrcoef(flat[p, 0], flat[(p + 1) % 20, 0])[0, 1] for p in range(20)])
    # assert
    assert source.images.dtype == np.uint16 and source.images.max() < 4096
    assert np.bincount(source.labels).tolist() == [40, 40]
    assert bright[source.labels == 1].mean() > 2 * bright[source.labels == 0].mean()
    assert within > between + 0.02
    assert np.array_equal(phantom_population(20, 4, image_size=32, seed=7).images, source.images)


def test_source_data_validates_arrays() -> None:
    with pytest.raises(SourceDataError):
        SourceData(images=np.zeros((2, 4, 4), np.float32), labels=np.zeros(2, np.int64),
                   patient_ids=None, class_names=("a",))
    with pytest.raises(SourceDataError):
        SourceData(images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1]),
                   patient_ids=None, class_names=("a",))


def test_load_medmnist_pneumonia(shared_data_dir: Path) -> None:
    path = shared_data_dir / "medmnist/pneumoniamnist.npz"
    source = load_medmnist_npz(path, split="train")
    assert source.images.shape == (4708, 28, 28) and source.images.dtype == np.uint8
    assert np.bincount(source.labels).tolist() == [1214, 3494]
    assert source.class_names == ("normal", "pneumonia") and source.patient_ids is None
    with pytest.raises(SourceDataError, match="split"):
        load_medmnist_npz(path, split="validation")
