"""client.prepare.pipeline + common.dataset: DICOM folder -> pickle-free cache, rebuilt only on change."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

import client.prepare.pipeline as prepare_module
from client.prepare.pipeline import PrepareError, PrepareReport, load_or_create_salt, prepare_site
from common.dataset import DatasetError, LocalDataset, load_cache, load_patient_hashes
from common.errors import UserError
from simulation.partition import SourceData, load_medmnist_npz, write_site_dicom
from simulation.phantoms import phantom_population

SALT = bytes(range(32))


@pytest.fixture
def phantom_site(tmp_path: Path) -> tuple[SourceData, Path]:
    """6 phantom patients x 3 images (48 px) as DICOM, plus three files that must be rejected."""
    source = phantom_population(6, 3, image_size=48, seed=5)
    data_dir = tmp_path / "data"
    write_site_dicom(source, np.arange(18), data_dir, site_name="siteA", seed=1)
    (data_dir / "stray.dcm").write_bytes(b"not under a class folder")
    ct = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    (data_dir / "lesion" / "truncated.dcm").write_bytes(ct[:-5000])  # cut inside Pixel Data
    sr = get_testdata_file("test-SR.dcm")
    (data_dir / "normal" / "report.dcm").write_bytes(Path(str(sr)).read_bytes())
    return source, data_dir


def test_phantoms_prepare_to_expected_counts_shapes_and_patients(phantom_site: tuple[SourceData, Path],
                                                                tmp_path: Path) -> None:
    # prepare
    _, data_dir = phantom_site
    # act
    report = prepare_site(data_dir, tmp_path / "cache", image_size=32, salt=SALT, progress=False)
    ds = load_cache(tmp_path / "cache")
    # assert: 3 lesion + 3 normal patients, 3 images each; 3 rejections with their reasons
    assert (report.files_seen, report.images_kept, report.patients) == (21, 18, 6)
    assert report.patient_identity and ds.patient_identity and not report.from_cache
    assert report.label_counts == {"lesion": 9, "normal": 9}
    assert report.rejected == {"no-label": 1, "not-an-image": 1, "truncated": 1}
    assert report.files_kept == 18
    assert ds.class_names == ("lesion", "normal")  # sorted folder names
    assert ds.images.shape == (18, 1, 32, 32) and ds.images.dtype == np.float32
    assert ds.images.min() == -1.0 and ds.images.max() <= 1.0  # air is black
    assert np.bincount(ds.patients).tolist() == [3] * 6
    for p in range(ds.num_patients):  # one label per patient
        assert np.unique(ds.labels[ds.patients == p]).size == 1


def test_cache_holds_only_salted_hashes(phantom_site: tuple[SourceData, Path], tmp_path: Path) -> None:
    # prepare
    source, data_dir = phantom_site
    assert source.patient_ids is not None
    raw_ids = sorted(set(source.patient_ids.tolist()))
    # act
    prepare_site(data_dir, tmp_path / "cache", image_size=32, salt=SALT, progress=False)
    hashes = set(load_patient_hashes(tmp_path / "cache").tolist())
    blob = b"".join(p.read_bytes() for p in (tmp_path / "cache").iterdir())
    # assert
    assert hashes == {hashlib.sha256(SALT + pid.encode()).hexdigest() for pid in raw_ids}
    assert not hashes & ({hashlib.sha256(pid.encode()).hexdigest() for pid in raw_ids} | set(raw_ids))
    for pid in raw_ids:  # npz stores str as UTF-32, JSON as UTF-8
        assert pid.encode() not in blob and pid.encode("utf-32-le") not in blob
    assert b"PHANTOM" not in blob and "PHANTOM".encode("utf-32-le") not in blob


def test_second_call_reads_cache_and_a_touched_folder_rebuilds(phantom_site: tuple[SourceData, Path],
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, data_dir = phantom_site
    cache = tmp_path / "cache"
    first = prepare_site(data_dir, cache, image_size=32, salt=SALT, progress=False)

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("a cache hit must not decode any file")

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "run_jobs", refuse)
        second = prepare_site(data_dir, cache, image_size=32, salt=SALT, progress=False)
    assert second.from_cache and second == replace(first, from_cache=True)

    touched = next((data_dir / "lesion").glob("siteA_*.dcm"))
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not prepare_site(data_dir, cache, image_size=32, salt=SALT, progress=False).from_cache
    assert prepare_site(data_dir, cache, image_size=32, salt=SALT, progress=False).from_cache
    assert not prepare_site(data_dir, cache, image_size=64, salt=SALT, progress=False).from_cache
    assert not prepare_site(data_dir, cache, image_size=64, salt=b"x" * 32, progress=False).from_cache
    assert not prepare_site(data_dir, cache, image_size=64, salt=b"x" * 32, progress=False,
                            force=True).from_cache


def test_files_without_patient_key_are_each_their_own_patient(tmp_path: Path) -> None:
    # prepare: 28 x 28 uint8 images with no patient ids (as MedMNIST)
    rng = np.random.default_rng(0)
    source = SourceData(images=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
                        labels=np.array([0, 1] * 5, dtype=np.int64), patient_ids=None,
                        class_names=("normal", "pneumonia"))
    write_site_dicom(source, np.arange(10), tmp_path / "data", site_name="s0", seed=0)
    # act
    report = prepare_site(tmp_path / "data", tmp_path / "cache", image_size=32, salt=SALT, progress=False)
    ds = load_cache(tmp_path / "cache")
    # assert
    assert not report.patient_identity and not ds.patient_identity
    assert report.patients == report.images_kept == ds.num_patients == 10
    assert ds.images.shape == (10, 1, 32, 32)
    assert "NOT per patient" in report.format() and report.units_without_patient_id == 10


def test_medmnist_roundtrip_has_no_patient_identity(shared_data_dir: Path, tmp_path: Path) -> None:
    # prepare: 12 PneumoniaMNIST training images, 6 per class
    source = load_medmnist_npz(shared_data_dir / "medmnist/pneumoniamnist.npz", split="train")
    subset = np.concatenate([np.flatnonzero(source.labels == c)[:6] for c in (0, 1)])
    # act
    written = write_site_dicom(source, subset, tmp_path / "data", site_name="m0", seed=0)
    report = prepare_site(tmp_path / "data", tmp_path / "cache", image_size=32, salt=SALT, progress=False)
    ds = load_cache(tmp_path / "cache")
    # assert
    assert written == 12 and report.images_kept == 12 and report.rejected == {}
    assert not report.patient_identity and report.patients == 12
    assert report.label_counts == {"normal": 6, "pneumonia": 6}
    assert ds.images.shape == (12, 1, 32, 32) and -1.0 <= ds.images.min() < ds.images.max() <= 1.0


def test_salt_is_created_once_private_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "salt.bin"
    first = load_or_create_salt(path)
    assert len(first) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_salt(path) == first
    path.write_bytes(b"short")
    with pytest.raises(PrepareError, match="32"):
        load_or_create_salt(path)


def test_report_json_roundtrip_and_table() -> None:
    report = PrepareReport(files_seen=5, images_kept=3, patients=2, patient_identity=True,
                           label_counts={"a": 1, "b": 2}, rejected={"unreadable": 2})
    assert PrepareReport.from_json(report.to_json()) == report
    table = report.format()
    assert "images kept" in table and "rejected unreadable" in table and "NOT per patient" not in table


def test_missing_or_corrupt_cache_says_run_prepare(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="prepare"):
        load_cache(tmp_path)
    (tmp_path / "dataset.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DatasetError, match="prepare"):
        load_cache(tmp_path)


def test_local_dataset_rejects_inconsistent_arrays() -> None:
    good = {"images": np.zeros((2, 1, 4, 4), np.float32), "labels": np.array([0, 1]),
            "patients": np.array([0, 1]), "class_names": ("a", "b"), "patient_identity": True}
    assert LocalDataset(**good).num_patients == 2  # type: ignore[arg-type]
    for bad in ({"images": np.zeros((2, 1, 4, 4), np.float64)}, {"labels": np.array([0, 2])},
                {"patients": np.array([0, 2])}, {"images": np.full((2, 1, 4, 4), 2.0, np.float32)}):
        with pytest.raises(DatasetError):
            LocalDataset(**{**good, **bad})  # type: ignore[arg-type]


def test_bad_layouts_are_refused(tmp_path: Path) -> None:
    (tmp_path / "data" / "normal").mkdir(parents=True)
    (tmp_path / "data" / "normal" / "x.dcm").write_bytes(b"junk")
    with pytest.raises(PrepareError, match="outside"):
        prepare_site(tmp_path / "data", tmp_path / "data" / "cache", image_size=32, salt=SALT, progress=False)
    with pytest.raises(PrepareError, match="no usable images"):
        prepare_site(tmp_path / "data", tmp_path / "cache", image_size=32, salt=SALT, progress=False)


def write_patient_file(path: Path, value: int, *, patient_id: str | None, study_uid: str | None) -> None:
    """A small MR image made with pydicom, with or without Patient ID / Study Instance UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID, "MR"
    if patient_id is not None:
        ds.PatientID = patient_id
    if study_uid is not None:
        ds.StudyInstanceUID = study_uid
    ds.set_pixel_data(np.arange(16, dtype=np.uint16).reshape(4, 4) * value, "MONOCHROME2", 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_privacy_units_link_patient_id_and_study_uid_without_splitting_a_person(tmp_path: Path) -> None:
    # prepare: P1 has two studies (1 file each) and a third file with only S1's Study UID;
    # P2 and P3 are two Patient IDs of one study S3 (a merge); P4 stands alone
    data = tmp_path / "data" / "a"
    files = {"1.dcm": ("P1", "1.2.1"), "2.dcm": ("P1", "1.2.2"), "3.dcm": (None, "1.2.1"),
             "4.dcm": ("P2", "1.2.3"), "5.dcm": ("P3", "1.2.3"), "6.dcm": ("P4", "1.2.4")}
    for i, (name, (pid, study)) in enumerate(files.items(), start=1):
        write_patient_file(data / name, i, patient_id=pid, study_uid=study)
    # act
    report = prepare_site(tmp_path / "data", tmp_path / "cache", image_size=8, salt=SALT, progress=False)
    ds = load_cache(tmp_path / "cache")
    other_salt = prepare_site(tmp_path / "data", tmp_path / "cache2", image_size=8, salt=b"y" * 32,
                              progress=False)
    # assert: files in path order 1..6 -> units P1, P1, P1, P2+P3, P2+P3, P4
    assert ds.patients.tolist() == [0, 0, 0, 1, 1, 2]
    assert load_cache(tmp_path / "cache2").patients.tolist() == ds.patients.tolist()  # salt-free index
    assert report.patients == other_salt.patients == 3
    assert report.patient_identity and ds.patient_identity
    assert (report.files_without_patient_id, report.files_linked_by_study) == (1, 1)
    assert report.units_with_several_patient_ids == 1
    assert set(load_patient_hashes(tmp_path / "cache").tolist()) == {
        hashlib.sha256(SALT + pid.encode()).hexdigest() for pid in ("P1", "P2", "P4")}
    assert "counted with that patient" in report.format() and "NOT per patient" not in report.format()


def test_a_file_without_patient_id_makes_the_privacy_unit_the_study_and_the_report_says_so(
        tmp_path: Path) -> None:
    # prepare: two identified files of P1, and two studies of someone without a Patient ID
    data = tmp_path / "data" / "a"
    write_patient_file(data / "1.dcm", 1, patient_id="P1", study_uid="1.2.1")
    write_patient_file(data / "2.dcm", 2, patient_id="P1", study_uid="1.2.1")
    write_patient_file(data / "3.dcm", 3, patient_id=None, study_uid="1.2.8")
    write_patient_file(data / "4.dcm", 4, patient_id=None, study_uid="1.2.9")
    # act
    report = prepare_site(tmp_path / "data", tmp_path / "cache", image_size=8, salt=SALT, progress=False)
    ds = load_cache(tmp_path / "cache")
    # assert: the two anonymous studies cannot be linked: two units, and no patient identity
    assert ds.patients.tolist() == [0, 0, 1, 2]
    assert not report.patient_identity and not ds.patient_identity
    assert (report.files_without_patient_id, report.files_linked_by_study) == (2, 0)
    assert report.units_without_patient_id == 2
    table = report.format()
    assert "NO PATIENT IDENTITY" in table and "privacy is per study or per file, NOT per patient" in table
    assert PrepareReport.from_json(report.to_json()) == report


def test_a_chain_of_shared_keys_is_one_unit() -> None:
    # prepare: f1 (P1, S1) - f3 (P1, S2) - f2 (P2, S2): P1 and P2 share study S2
    from client.prepare.patients import FileIdentity, group_privacy_units

    files = [FileIdentity("f1", "P1", "S1"), FileIdentity("f2", "P2", "S2"), FileIdentity("f3", "P1", "S2"),
             FileIdentity("f4", None, None), FileIdentity("f5", None, "S1")]
    # act
    units = group_privacy_units(files)
    # assert
    assert units.unit_of_file == (0, 0, 0, 1, 0)
    assert units.keys == (b"P1", b"\0file:f4")
    assert (units.units_without_patient_id, units.files_without_patient_id, units.files_linked_by_study) == (1, 2, 1)
    assert not units.patient_identity


def test_denoise_step_is_in_the_fingerprint_and_removes_impulse_noise(tmp_path: Path) -> None:
    """``--denoise median3``: a different cache fingerprint (switching it on or off rebuilds), and on a
    folder of salt-and-pepper images a cache closer to the clean pixels than without the step."""
    from common.dataset import read_cache_fingerprint
    from common.denoise import median_filter, salt_and_pepper

    # prepare: 3 patients, the same phantoms once clean and once with 10 % impulse noise
    source = phantom_population(3, 2, image_size=48, seed=2)
    noisy = replace(source, images=salt_and_pepper(source.images, 0.1, np.random.default_rng(0)))
    write_site_dicom(source, np.arange(6), tmp_path / "clean", site_name="s", seed=1)
    write_site_dicom(noisy, np.arange(6), tmp_path / "noisy", site_name="s", seed=1)
    clean = prepare_site(tmp_path / "clean", tmp_path / "c0", image_size=32, salt=SALT, progress=False, workers=0)
    assert clean.images_kept == 6
    # act
    plain = prepare_site(tmp_path / "noisy", tmp_path / "c1", image_size=32, salt=SALT, progress=False, workers=0)
    fp_plain = read_cache_fingerprint(tmp_path / "c1")
    filtered = prepare_site(tmp_path / "noisy", tmp_path / "c1", image_size=32, salt=SALT, progress=False,
                            workers=0, denoise="median3")
    fp_filtered = read_cache_fingerprint(tmp_path / "c1")
    denoised = load_cache(tmp_path / "c1").images
    again = prepare_site(tmp_path / "noisy", tmp_path / "c1", image_size=32, salt=SALT, progress=False,
                         workers=0, denoise="median3")
    prepare_site(tmp_path / "noisy", tmp_path / "c2", image_size=32, salt=SALT, progress=False, workers=0)
    # assert
    assert not plain.from_cache and not filtered.from_cache and again.from_cache
    assert fp_plain != fp_filtered and fp_filtered == read_cache_fingerprint(tmp_path / "c1")
    reference = load_cache(tmp_path / "c0").images
    err_plain = np.abs(load_cache(tmp_path / "c2").images - reference).mean()
    err_filtered = np.abs(denoised - reference).mean()
    assert err_filtered < 0.5 * err_plain
    spike = np.zeros((5, 5), np.float32)
    spike[2, 2] = 1.0
    assert median_filter(spike, 3).max() == 0.0
    with pytest.raises(UserError, match="denoise = 'blur'"):
        prepare_site(tmp_path / "noisy", tmp_path / "c3", image_size=32, salt=SALT, progress=False, denoise="blur")
