"""client.prepare.pipeline: labels from CSV or attribute, selection, unsafe entries, report, real series."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from client.prepare.pipeline import PrepareError, prepare_site
from common.dataset import load_cache
from tests.dicom_bytes import EXPLICIT_LE, element, image_dataset, part10, text

SALT = bytes(range(32))


def write_image(path: Path, *, uid: str, patient: str = "P1", modality: str = "OT",
                body_part: str | None = None, columns: int = 6) -> Path:
    extra = element(0x0018, 0x0015, b"CS", text(body_part)) if body_part is not None else b""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(part10(EXPLICIT_LE, image_dataset(4, columns, extra=extra, modality=modality,
                                                       patient_id=patient, sop_instance_uid=uid)))
    return path


def test_labels_from_csv_by_path_and_by_sop_instance_uid(tmp_path: Path) -> None:
    # prepare: four files, flat; rows for a (path), b (path, sub-folder), c (UID), a stray row
    data = tmp_path / "data"
    write_image(data / "a.dcm", uid="1.2.3.1", patient="P1")
    write_image(data / "sub" / "b.dcm", uid="1.2.3.2", patient="P2")
    write_image(data / "c.dcm", uid="1.2.3.3", patient="P2")
    write_image(data / "d.dcm", uid="1.2.3.4", patient="P3")  # no row
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.dcm,normal\nsub/b.dcm,lesion\n# comment\n1.2.3.3,lesion\n"
                      "gone.dcm,normal\n", encoding="utf-8")
    # act
    report = prepare_site(data, tmp_path / "cache", image_size=8, salt=SALT, progress=False,
                          labels_csv=labels)
    ds = load_cache(tmp_path / "cache")
    # assert: classes = sorted CSV labels; d has no label; gone.dcm matched nothing
    assert ds.class_names == ("lesion", "normal")
    assert report.label_counts == {"lesion": 2, "normal": 1}
    assert report.rejected == {"no-label": 1} and report.csv_rows_unmatched == 1
    assert (report.files_seen, report.files_kept, report.patients) == (4, 3, 2)
    assert ds.labels.tolist() == [1, 0, 0]  # a.dcm, c.dcm, sub/b.dcm (sorted by path)


def test_csv_label_outside_the_classes_is_unknown(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_image(data / "a.dcm", uid="1.2.3.1")
    write_image(data / "b.dcm", uid="1.2.3.2")
    labels = tmp_path / "labels.csv"
    labels.write_text("a.dcm,normal\nb.dcm,other\n", encoding="utf-8")
    report = prepare_site(data, tmp_path / "cache", image_size=8, salt=SALT, progress=False,
                          labels_csv=labels, class_names=["normal", "lesion"])
    assert report.rejected == {"unknown-label": 1}
    assert report.label_counts == {"normal": 1, "lesion": 0}


@pytest.mark.parametrize(("content", "match"), [
    ("a.dcm,normal\na.dcm,lesion\n", "labels.csv:2: 'a.dcm' is listed twice"),
    ("/etc/a.dcm,normal\n", "labels.csv:1: path '/etc/a.dcm' must be relative"),
    ("../a.dcm,normal\n", "must be relative"),
    ("a.dcm\n", "labels.csv:1: expected 'path-or-SOPInstanceUID,label'"),
    ("path,label\n", "has no rows"),
])
def test_bad_labels_csv_is_refused_with_its_line(tmp_path: Path, content: str, match: str) -> None:
    write_image(tmp_path / "data" / "a.dcm", uid="1.2.3.1")
    labels = tmp_path / "labels.csv"
    labels.write_text(content, encoding="utf-8")
    with pytest.raises(PrepareError, match=match):
        prepare_site(tmp_path / "data", tmp_path / "cache", image_size=8, salt=SALT, progress=False,
                     labels_csv=labels)


def test_labels_from_an_attribute_and_refused_attributes(tmp_path: Path) -> None:
    # prepare: Body Part Examined CHEST, HEAD, absent
    data = tmp_path / "data"
    write_image(data / "1.dcm", uid="1.2.3.1", body_part="CHEST")
    write_image(data / "2.dcm", uid="1.2.3.2", body_part="HEAD")
    write_image(data / "3.dcm", uid="1.2.3.3")
    # act
    report = prepare_site(data, tmp_path / "cache", image_size=8, salt=SALT, progress=False,
                          label_attribute="BodyPartExamined")
    # assert
    assert report.label_counts == {"CHEST": 1, "HEAD": 1} and report.rejected == {"no-label": 1}
    for keyword, match in (("PatientID", "identifies"), ("StudyDate", "identifies"),
                           ("NoSuchKeyword", "not a DICOM keyword"),
                           ("ReferencedImageSequence", "sequence")):
        with pytest.raises(PrepareError, match=match):
            prepare_site(data, tmp_path / "cache", image_size=8, salt=SALT, progress=False,
                         label_attribute=keyword)
    with pytest.raises(PrepareError, match="not both"):
        prepare_site(data, tmp_path / "cache", image_size=8, salt=SALT, progress=False,
                     label_attribute="BodyPartExamined", labels_csv=tmp_path / "labels.csv")


def test_selection_by_modality_and_body_part(tmp_path: Path) -> None:
    # prepare: CT chest, CT head, MR chest, CT without body part; labels from folders
    data = tmp_path / "data"
    write_image(data / "x" / "1.dcm", uid="1.2.3.1", modality="CT", body_part="CHEST")
    write_image(data / "x" / "2.dcm", uid="1.2.3.2", modality="CT", body_part="HEAD")
    write_image(data / "x" / "3.dcm", uid="1.2.3.3", modality="MR", body_part="chest")
    write_image(data / "x" / "4.dcm", uid="1.2.3.4", modality="CT")
    # act
    report = prepare_site(data, tmp_path / "cache", image_size=8, salt=SALT, progress=False,
                          modalities=["ct"], body_parts=["Chest"])
    both = prepare_site(data, tmp_path / "cache2", image_size=8, salt=SALT, progress=False,
                        modalities=["CT", "MR"], body_parts=["CHEST"])
    # assert: case-insensitive; an absent Body Part Examined is not selected
    assert (report.files_kept, report.rejected) == (1, {"not-selected": 3})
    assert (both.files_kept, both.rejected) == (2, {"not-selected": 2})


def test_links_and_special_files_are_refused_and_never_followed(tmp_path: Path) -> None:
    # prepare: a real image, a link to an outside image, a linked folder, a FIFO
    outside = tmp_path / "outside"
    write_image(outside / "secret.dcm", uid="1.2.3.9")
    data = tmp_path / "data"
    write_image(data / "x" / "1.dcm", uid="1.2.3.1")
    (data / "x" / "link.dcm").symlink_to(outside / "secret.dcm")
    (data / "x" / "folder").symlink_to(outside, target_is_directory=True)
    os.mkfifo(data / "x" / "pipe")
    # act
    report = prepare_site(data, tmp_path / "cache", image_size=8, salt=SALT, progress=False)
    # assert: the linked folder is one refused entry; its content is never listed
    assert report.files_seen == 4 and report.files_kept == 1
    assert report.rejected == {"not-a-regular-file": 1, "symlink": 2}


def test_parallel_and_in_process_runs_build_identical_caches(tmp_path: Path) -> None:
    # prepare: 12 files of 3 patients, two labels
    data = tmp_path / "data"
    for i in range(12):
        write_image(data / ("ab"[i % 2]) / f"{i:02d}.dcm", uid=f"1.2.3.{i}", patient=f"P{i % 3}",
                    columns=4 + i)
    # act
    prepare_site(data, tmp_path / "c2", image_size=8, salt=SALT, progress=False, workers=2)
    prepare_site(data, tmp_path / "c0", image_size=8, salt=SALT, progress=False, workers=0)
    parallel, serial = load_cache(tmp_path / "c2"), load_cache(tmp_path / "c0")
    # assert
    np.testing.assert_array_equal(parallel.images, serial.images)
    assert parallel.labels.tolist() == serial.labels.tolist()
    # a/00, a/02, ... (P0, P2, P1, ...), then b/01, b/03, ... (P1, P0, P2, ...): first-seen order
    assert parallel.patients.tolist() == serial.patients.tolist() == [0, 1, 2] * 2 + [2, 0, 1] * 2


def test_report_lists_reasons_with_their_meaning_and_no_file_names(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_image(data / "x" / "patient_DOE_1.dcm", uid="1.2.3.1")
    (data / "x" / "patient_DOE_2.dcm").write_bytes(b"not dicom at all")
    report = prepare_site(data, tmp_path / "cache", image_size=8, salt=SALT, progress=False)
    table = report.format()
    assert "rejected not-dicom" in table and "no DICOM Part 10 header" in table
    assert b"DOE" not in (tmp_path / "cache" / "prepare_report.json").read_bytes()


def test_the_192_slice_mr_series_is_one_patient(shared_data_dir: Path, tmp_path: Path) -> None:
    # prepare: the real sagittal brain series (plus its LICENSE and README), labelled by Modality
    series = shared_data_dir / "dicom" / "sag-anon-mr-brain"
    # act
    report = prepare_site(series, tmp_path / "cache", image_size=32, salt=SALT, progress=False,
                          label_attribute="Modality")
    ds = load_cache(tmp_path / "cache")
    # assert
    assert (report.images_kept, report.patients, report.files_kept) == (192, 1, 192)
    assert report.label_counts == {"MR": 192} and report.rejected == {"not-dicom": 2}
    assert ds.images.shape == (192, 1, 32, 32) and ds.num_patients == 1 and ds.patient_identity


def test_cli_prepare_passes_labels_csv_and_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # prepare: a CT and an MR file, labelled by CSV; keep CT only
    from medsynth.cli import main

    data = tmp_path / "data"
    write_image(data / "ct.dcm", uid="1.2.3.1", modality="CT")
    write_image(data / "mr.dcm", uid="1.2.3.2", modality="MR")
    labels = tmp_path / "labels.csv"
    labels.write_text("ct.dcm,normal\nmr.dcm,normal\n", encoding="utf-8")
    # act
    code = main(["node", "prepare", "--data", str(data), "--out", str(tmp_path / "cache"),
                 "--labels-csv", str(labels), "--modality", "CT", "--salt-file", str(tmp_path / "salt")])
    printed = capsys.readouterr().out
    # assert
    assert code == 0 and "rejected not-selected" in printed
    assert load_cache(tmp_path / "cache").images.shape == (1, 1, 32, 32)


def test_cache_is_rebuilt_when_the_labels_csv_or_the_selection_change(tmp_path: Path) -> None:
    # prepare
    data = tmp_path / "data"
    write_image(data / "a.dcm", uid="1.2.3.1", modality="CT")
    write_image(data / "b.dcm", uid="1.2.3.2", modality="CT")
    labels = tmp_path / "labels.csv"
    labels.write_text("a.dcm,x\nb.dcm,y\n", encoding="utf-8")

    def run(**options: object) -> bool:
        return prepare_site(data, tmp_path / "cache", image_size=8, salt=SALT, progress=False,
                            labels_csv=labels, **options).from_cache  # type: ignore[arg-type]

    # act / assert
    assert not run() and run()
    labels.write_text("a.dcm,x\nb.dcm,x\n", encoding="utf-8")
    assert not run() and run()
    assert not run(modalities=["CT"]) and run(modalities=["CT"])


def test_verbose_cli_and_rejected_list_show_every_rejected_file_with_reason_and_fix(tmp_path: Path) -> None:
    # prepare: one good image and three rejections; the CLI runs as a user runs it (a fresh
    # process: opacus is imported and calls logging.basicConfig before the CLI configures logging)
    import csv
    import stat
    import subprocess
    import sys

    data = tmp_path / "data"
    write_image(data / "a" / "good.dcm", uid="1.2.3.1")
    (data / "a" / "notes.txt").write_bytes(b"scanner notes, not DICOM")
    cut = part10(EXPLICIT_LE, image_dataset(4, 6))
    (data / "a" / "cut.dcm").write_bytes(cut[:-10])
    write_image(data / "stray.dcm", uid="1.2.3.2")  # not under a class folder
    listing = tmp_path / "rejected.csv"
    expected = {"a/notes.txt": "not-dicom", "a/cut.dcm": "truncated", "stray.dcm": "no-label"}
    # act
    done = subprocess.run(
        [sys.executable, "-m", "medsynth", "-v", "node", "prepare", "--data", str(data),
         "--out", str(tmp_path / "cache"), "--salt-file", str(tmp_path / "salt"),
         "--list-rejected", str(listing)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    # assert: -v logs each rejected file with its reason and a fix; the CSV holds the same
    assert done.returncode == 0, done.stderr
    for rel, reason in expected.items():
        assert f"rejected {rel}: {reason}: " in done.stderr, (rel, done.stderr)
    assert done.stderr.count("; fix: ") == len(expected)
    with listing.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {row["path"]: row["reason"] for row in rows} == expected
    assert all(row["detail"] and row["fix"] for row in rows)
    assert stat.S_IMODE(listing.stat().st_mode) == 0o600
    report = (tmp_path / "cache" / "prepare_report.json").read_text(encoding="utf-8")
    assert "stray" not in report and "notes" not in report  # the report keeps counts only


def test_rejected_list_inside_the_data_folder_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_image(data / "a" / "good.dcm", uid="1.2.3.1")
    with pytest.raises(PrepareError, match="outside the data folder"):
        prepare_site(data, tmp_path / "cache", image_size=8, salt=SALT, progress=False,
                     rejected_list=data / "rejected.csv")
