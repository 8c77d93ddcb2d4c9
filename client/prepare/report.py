"""What ``prepare`` found in a hospital's folder: counts only, safe to print, log and keep.

The report never holds a file name, a UID or any header value other than the label names the
user chose: ``rejected`` groups files by reason (see ``common.dicom.errors.REJECTION_REASONS``).
The per-file details (file, reason, detail, fix) go to the log (``medsynth -v node prepare``)
and, only when asked, to a hospital-local CSV (``--list-rejected FILE``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from common.dicom.errors import REJECTION_REASONS


@dataclass(frozen=True)
class PrepareReport:
    """Counts of one ``prepare_site`` run (or of the run that built the cache)."""

    files_seen: int
    images_kept: int
    patients: int
    patient_identity: bool
    label_counts: dict[str, int] = field(default_factory=dict)  # images per class
    rejected: dict[str, int] = field(default_factory=dict)  # files per reason
    from_cache: bool = False
    files_kept: int = 0  # files that gave at least one image (multi-frame files give several)
    files_with_warnings: int = 0  # kept files whose header made pydicom warn (details in the log)
    csv_rows_unmatched: int = 0  # CSV rows matching no listed path nor a kept file's UID
    # privacy units (client.prepare.patients): patients, or studies / files without Patient ID
    files_without_patient_id: int = 0  # kept files with no Patient ID (0010,0020)
    files_linked_by_study: int = 0  # of those, files that joined a patient through their study
    units_without_patient_id: int = 0  # units that are a study or a file, not a patient
    units_with_several_patient_ids: int = 0  # Patient IDs merged because they share a study
    pairs: bool = False  # image–mask pairs (model.pairs): each kept image has its mask (common.pairs)
    masks_without_image: int = 0  # mask files under masks/ that no listed image names
    masks_from_seg: int = 0  # kept images whose mask came from DICOM SEG files (client.prepare.pairs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrepareReport:
        data: dict[str, Any] = json.loads(text)
        return cls(
            files_seen=int(data["files_seen"]),
            images_kept=int(data["images_kept"]),
            patients=int(data["patients"]),
            patient_identity=bool(data["patient_identity"]),
            label_counts={str(k): int(v) for k, v in data["label_counts"].items()},
            rejected={str(k): int(v) for k, v in data["rejected"].items()},
            from_cache=bool(data["from_cache"]),
            files_kept=int(data.get("files_kept", 0)),
            files_with_warnings=int(data.get("files_with_warnings", 0)),
            csv_rows_unmatched=int(data.get("csv_rows_unmatched", 0)),
            files_without_patient_id=int(data.get("files_without_patient_id", 0)),
            files_linked_by_study=int(data.get("files_linked_by_study", 0)),
            units_without_patient_id=int(data.get("units_without_patient_id", 0)),
            units_with_several_patient_ids=int(data.get("units_with_several_patient_ids", 0)),
            pairs=bool(data.get("pairs", False)),
            masks_without_image=int(data.get("masks_without_image", 0)),
            masks_from_seg=int(data.get("masks_from_seg", 0)),
        )

    def format(self) -> str:
        """A short human-readable table, each rejection reason with what it means."""
        lines = [
            f"{'files seen':<34}{self.files_seen:>8}",
            f"{'files kept':<34}{self.files_kept:>8}",
            f"{'images kept':<34}{self.images_kept:>8}",
            f"{'patients':<34}{self.patients:>8}",
        ]
        lines += [f"{'  label ' + name:<34}{n:>8}" for name, n in sorted(self.label_counts.items())]
        lines += [f"{'  rejected ' + why:<34}{n:>8}  {REJECTION_REASONS.get(why, '')}"
                  for why, n in sorted(self.rejected.items())]
        lines.append(f"{'from cache':<34}{'yes' if self.from_cache else 'no':>8}")
        if self.rejected:
            lines.append("note: `medsynth node prepare ... --list-rejected FILE` writes every rejected "
                         "file with its reason and fix to FILE (`-v ... --force` logs them)")
        if self.files_with_warnings:
            lines.append(f"note: {self.files_with_warnings} kept files had header warnings "
                         "(listed with -v)")
        if self.pairs:
            lines.append(f"note: image–mask pairs: every kept image has its mask ({self.masks_from_seg} from "
                         f"DICOM SEG files, the others under masks/); {self.masks_without_image} mask files "
                         "under masks/ name no image")
        if self.csv_rows_unmatched:
            lines.append(f"note: {self.csv_rows_unmatched} rows of the labels CSV matched no file")
        lines += self.identity_notes()
        return "\n".join(lines)

    def identity_notes(self) -> list[str]:
        """What the privacy unit is, in plain words, when it is not simply the patient."""
        notes: list[str] = []
        unlinked = self.files_without_patient_id - self.files_linked_by_study
        if not self.patient_identity:
            notes.append(
                f"note: NO PATIENT IDENTITY: {unlinked or 'some'} kept files have no Patient ID "
                "(0010,0020) and share no study with a file that has one; they form "
                f"{self.units_without_patient_id or 'their own'} privacy units, one per Study "
                "Instance UID (0020,000D), or one per file where that is absent too. For these "
                "images privacy is per study or per file, NOT per patient: a person with several "
                "such studies or files is counted several times")
        if self.files_linked_by_study:
            notes.append(f"note: {self.files_linked_by_study} kept files have no Patient ID but "
                         "share a Study Instance UID with files that have one: counted with that "
                         "patient")
        if self.units_with_several_patient_ids:
            notes.append(f"note: {self.units_with_several_patient_ids} patients hold several "
                         "Patient IDs that share a Study Instance UID: each counted as one person "
                         "(check the IDs in the PACS)")
        return notes
