"""Which files to use and what their labels are: the user's selection and label source.

Labels come from exactly one source, never guessed:

* ``folder`` (default): the first path component under the data folder (``<data>/<label>/...``);
  a file directly in the data folder has no label.
* ``csv``: a CSV file of ``key,label`` rows. The key is the file's path relative to the data
  folder (POSIX separators) or its SOP Instance UID (0008,0018); the path wins when both match.
  An optional header row ``path,label`` / ``sop_instance_uid,label`` is skipped, as are blank
  lines and lines starting with ``#``. A key listed twice with different labels is an error.
  An empty label means "no label".
* ``attribute``: the value of a DICOM attribute named by keyword (e.g. ``BodyPartExamined``).
  Attributes that identify a person or a study (PN, UI, dates, Patient ID, Accession Number,
  ...) are refused: their values would become class names in the cache.

A label outside the configured classes is ``unknown-label``; a missing one is ``no-label``.
Selection (``Selection``) keeps only files whose Modality (0008,0060) and Body Part Examined
(0018,0015) are in the requested sets (case-insensitive); an empty set selects everything.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from common.dicom.errors import DicomRejected
from common.dicom.header import read_header_text
from common.errors import UserError
from common.pairs import MASKS_FOLDER

LabelMode = Literal["folder", "csv", "attribute"]

_UID = re.compile(r"[0-9]+(\.[0-9]+)+")
_CSV_HEADER_KEYS = frozenset({"path", "file", "sop_instance_uid", "sopinstanceuid", "uid", "key"})
_IDENTIFYING_VRS = frozenset({"PN", "UI", "DA", "DT", "TM"})
_IDENTIFYING_KEYWORDS = frozenset({
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber", "StudyID",
    "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator", "PatientBirthName",
    "InstitutionName", "InstitutionAddress", "StationName", "DeviceSerialNumber",
})


class LabelError(UserError, ValueError):
    """The label options or the labels CSV are unusable (the message names the line)."""


@dataclass(frozen=True)
class Selection:
    """Modalities (0008,0060) and Body Parts Examined (0018,0015) to keep; empty keeps all."""

    modalities: frozenset[str] = frozenset()
    body_parts: frozenset[str] = frozenset()

    @classmethod
    def of(cls, modalities: Iterable[str] = (), body_parts: Iterable[str] = ()) -> Selection:
        def clean(values: Iterable[str]) -> frozenset[str]:
            return frozenset(v.strip().upper() for v in values if v.strip())

        return cls(clean(modalities), clean(body_parts))

    def check(self, ds: Dataset) -> None:
        """Raise ``not-selected`` for a file outside the selection."""
        for wanted, keyword, tag in ((self.modalities, "Modality", "(0008,0060)"),
                                     (self.body_parts, "BodyPartExamined", "(0018,0015)")):
            if wanted:
                value = read_header_text(ds, keyword).upper()
                if value not in wanted:
                    shown = repr(value) if value else "absent"
                    raise DicomRejected("not-selected", f"{keyword} {tag} {shown} is not one of "
                                        f"{','.join(sorted(wanted))}")

    def describe(self) -> dict[str, list[str]]:
        return {"modalities": sorted(self.modalities), "body_parts": sorted(self.body_parts)}


@dataclass(frozen=True)
class LabelRule:
    """Where labels come from; ``classes`` None means: the sorted labels that were found."""

    mode: LabelMode
    classes: tuple[str, ...] | None
    by_path: Mapping[str, str] = field(default_factory=dict)
    by_uid: Mapping[str, str] = field(default_factory=dict)
    attribute: str = ""
    source_digest: str = ""  # SHA-256 of the CSV, for the cache fingerprint

    def label_without_header(self, rel: str) -> tuple[str, str] | None:
        """(label, key) when the path alone decides; None when the header is needed.

        Raises ``no-label`` / ``unknown-label`` when the path alone rules the file out.
        """
        if self.mode == "folder":
            parts = rel.split("/")
            if len(parts) < 2:
                raise DicomRejected("no-label", "directly in the data folder; put it in a "
                                    "<label>/ sub-folder")
            return self._known(parts[0], "folder"), parts[0]
        if self.mode == "csv" and rel in self.by_path:
            return self._known(self.by_path[rel], "CSV row"), rel
        if self.mode == "csv" and not self.by_uid:
            raise DicomRejected("no-label", "no row for this path in the labels CSV")
        return None

    def label_for(self, rel: str, ds: Dataset) -> tuple[str, str]:
        """(label, key) for a parsed file: path first, then SOP Instance UID, or the attribute."""
        known = self.label_without_header(rel)
        if known is not None:
            return known
        if self.mode == "csv":
            uid = read_header_text(ds, "SOPInstanceUID")
            if uid not in self.by_uid:
                raise DicomRejected("no-label", "no row for this path nor its SOP Instance UID "
                                    "(0008,0018) in the labels CSV")
            return self._known(self.by_uid[uid], "CSV row"), uid
        value = read_header_text(ds, self.attribute)
        if not value:
            raise DicomRejected("no-label", f"attribute {self.attribute} is absent or empty")
        return self._known(value, f"attribute {self.attribute}"), self.attribute

    def _known(self, label: str, source: str) -> str:
        if not label:
            raise DicomRejected("no-label", f"empty label in the {source}")
        if self.classes is not None and label not in self.classes:
            raise DicomRejected("unknown-label", f"label {label!r} from the {source} is not one of "
                                f"the classes {','.join(self.classes)}")
        return label

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode, "classes": self.classes, "attribute": self.attribute,
                "source": self.source_digest}


def folder_rule(data_dir: Path, classes: tuple[str, ...] | None) -> LabelRule:
    """Labels from sub-folder names; default classes: the sorted non-hidden real sub-folders but
    ``masks/`` (reserved for image–mask pairs, ``common.pairs``)."""
    if classes is None:
        classes = tuple(sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.is_symlink()
                               and not p.name.startswith(".") and p.name != MASKS_FOLDER))
    return LabelRule("folder", classes)


def attribute_rule(keyword: str, classes: tuple[str, ...] | None) -> LabelRule:
    """Labels from a DICOM attribute; refuses unknown keywords, sequences and identifiers."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise LabelError(f"{keyword!r} is not a DICOM keyword (e.g. BodyPartExamined, "
                         "SeriesDescription, ViewPosition)")
    vr = dictionary_VR(tag)
    if vr == "SQ":
        raise LabelError(f"{keyword} is a sequence; name an attribute with a text value")
    if vr in _IDENTIFYING_VRS or keyword in _IDENTIFYING_KEYWORDS:
        raise LabelError(f"{keyword} identifies a patient, study or site; its values would be "
                         "stored as class names, so it cannot be a label")
    return LabelRule("attribute", classes, attribute=keyword)


def csv_rule(path: Path, classes: tuple[str, ...] | None) -> LabelRule:
    """Labels from a ``key,label`` CSV (see the module doc); default classes: sorted labels."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"cannot read the labels CSV {path}: {exc}") from exc
    by_path: dict[str, str] = {}
    by_uid: dict[str, str] = {}
    first = True
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        key, label = row[0].strip(), (row[1].strip() if len(row) > 1 else "")
        if first and key.lower() in _CSV_HEADER_KEYS and label.lower() == "label":
            first = False
            continue
        first = False
        if len(row) < 2 or not key:
            raise LabelError(f"{path}:{line_no}: expected 'path-or-SOPInstanceUID,label'")
        _add_label(by_path, _normalise_path_key(key, path, line_no), label, path, line_no)
        if _UID.fullmatch(key):
            _add_label(by_uid, key, label, path, line_no)
    if not by_path:
        raise LabelError(f"the labels CSV {path} has no rows")
    if classes is None:
        classes = tuple(sorted({label for label in by_path.values() if label}))
    digest = hashlib.sha256(raw).hexdigest()
    return LabelRule("csv", classes, by_path=by_path, by_uid=by_uid, source_digest=digest)


def _normalise_path_key(key: str, csv_path: Path, line_no: int) -> str:
    posix = PurePosixPath(key.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        raise LabelError(f"{csv_path}:{line_no}: path {key!r} must be relative to the data folder")
    return posix.as_posix()


def _add_label(table: dict[str, str], key: str, label: str, csv_path: Path, line_no: int) -> None:
    if table.get(key, label) != label:
        raise LabelError(f"{csv_path}:{line_no}: {key!r} is listed twice, with labels "
                         f"{table[key]!r} and {label!r}")
    table[key] = label
