"""Privacy units: which kept files belong to one person.

The privacy guarantee is per patient, so a unit must never split a person. A person is named
by Patient ID (0010,0020); a study by Study Instance UID (0020,000D), and a study belongs to
one patient (PS3.3 C.7.2.1). Files are grouped by union-find over both keys: two files with
the same Patient ID, or with the same Study Instance UID, are in one unit. So a file without a
Patient ID joins the patient whose files share its study, and two Patient IDs seen in one study
(a re-registration, a merge, a typing error) become one unit rather than two people. Grouping
can merge people; it never splits one who is named by either key.

A unit with no Patient ID at all (its files have only a Study Instance UID, or nothing) is a
study, or a single file: one person with several such studies counts several times, so the
privacy unit is then the study or the file, not the patient. ``patient_identity`` is False
when any such unit exists.

The unit's key is hashed with the site's salt by the caller; the unit index is the order of
first appearance in the (path-sorted) file list, so it does not depend on the secret salt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


class FileIdentity(NamedTuple):
    """What a kept file says about its person: path, Patient ID, Study Instance UID."""

    rel: str
    patient_id: str | None
    study_uid: str | None


@dataclass(frozen=True)
class PrivacyUnits:
    """The grouping of kept files into privacy units."""

    unit_of_file: tuple[int, ...]  # unit index per file, in order of first appearance
    keys: tuple[bytes, ...]  # one key per unit, to be hashed with the salt
    units_without_patient_id: int  # units that are a study or a file, not a patient
    files_without_patient_id: int  # files with no Patient ID (linked to a patient or not)
    files_linked_by_study: int  # of those, files that joined a patient through their study
    units_with_several_patient_ids: int  # Patient IDs merged because they share a study

    @property
    def patient_identity(self) -> bool:
        """Whether every unit is a patient named by a Patient ID."""
        return self.units_without_patient_id == 0


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earlier file is the root


def group_privacy_units(files: Sequence[FileIdentity]) -> PrivacyUnits:
    """Union-find over Patient ID and Study Instance UID (see the module doc).

    Keys: the smallest Patient ID of the unit (UTF-8), else NUL + "study:" + the smallest Study
    Instance UID, else NUL + "file:" + the path; NUL cannot occur in a Patient ID (LO) or a UID,
    so the three kinds never collide.
    """
    groups = _UnionFind(len(files))
    first_with: dict[tuple[str, str], int] = {}
    for i, (_, patient_id, study_uid) in enumerate(files):
        for kind, value in (("patient", patient_id), ("study", study_uid)):
            if value:
                groups.union(first_with.setdefault((kind, value), i), i)
    roots = [groups.find(i) for i in range(len(files))]
    index_of_root = {root: n for n, root in enumerate(dict.fromkeys(roots))}
    patient_ids: dict[int, set[str]] = {}
    studies: dict[int, set[str]] = {}
    for root, (_, patient_id, study_uid) in zip(roots, files, strict=True):
        if patient_id:
            patient_ids.setdefault(root, set()).add(patient_id)
        if study_uid:
            studies.setdefault(root, set()).add(study_uid)
    keys: list[bytes] = []
    for root in index_of_root:
        if root in patient_ids:
            keys.append(min(patient_ids[root]).encode("utf-8", "surrogateescape"))
        elif root in studies:
            keys.append(b"\0study:" + min(studies[root]).encode("utf-8", "surrogateescape"))
        else:
            keys.append(b"\0file:" + files[root].rel.encode("utf-8", "surrogateescape"))
    without = [i for i, f in enumerate(files) if not f.patient_id]
    return PrivacyUnits(
        unit_of_file=tuple(index_of_root[root] for root in roots),
        keys=tuple(keys),
        units_without_patient_id=sum(1 for root in index_of_root if root not in patient_ids),
        files_without_patient_id=len(without),
        files_linked_by_study=sum(1 for i in without if roots[i] in patient_ids),
        units_with_several_patient_ids=sum(1 for ids in patient_ids.values() if len(ids) > 1),
    )
