"""Second benchmark data set: HC18 fetal-head ultrasound as a 28×28, two-class MedMNIST-v2 ``.npz``.

Why: the quality recipe was tuned on PneumoniaMNIST (chest X-ray, ~4,700 training images). Whether
it holds, with settings chosen from the data's size rather than by hand, needs a second, smaller
data set of another modality in the same file format, so that ``python -m simulation.bench_quality
--data FILE`` and ``medsynth simulate --dataset FILE`` run on it unchanged.

Source: the HC18 Grand Challenge training set (van den Heuvel, de Bruijn, de Korte, van Ginneken,
"Automated measurement of fetal head circumference using 2D ultrasound images", PLoS ONE 13(8):
e0200412, 2018; CC BY 4.0): 999 2D ultrasound images of the fetal head from 806 examinations,
each with the sonographer's head circumference (HC) in mm. The folder read here holds the images
padded to a centred square and resized to 256×256, and ``metadata.csv`` with ``exam_id`` and
``head_circumference_mm``.

What is built:

* **Split by examination.** Images of one examination (the file prefix ``NNN``) "have a very
  similar appearance" (challenge page), so an examination never spans two splits. The exams are
  shuffled with ``seed`` and cut where the running image count passes 55 % and 70 % of all
  images: train ≈ 55 %, val ≈ 15 %, test ≈ 30 % (549 / 150 / 300 images for the full set). An
  exam is the finest grouping published (one woman may have had several exams), so this is a
  per-exam, not strictly per-woman, split.
* **Two classes by a public rule**: class 1 ``large-head`` when HC is above the median HC of the
  *training* images, class 0 ``small-head`` otherwise; the threshold is computed on the training
  split alone and applied to all three, so val/test labels never shape it. HC grows with
  gestational age, and in these images the displayed scale and the fetal anatomy change with it
  (the depth setting follows the head: HC and pixel size correlate, Spearman ρ ≈ 0.8), so the
  classes are visible at 28×28: a small head sits as a ring inside the fan, a large one spans
  it. The evaluation's classifier trained on the real 28×28 training split scores TRTR AUC
  ≈ 0.76 on the test split (seed 0). The cut runs through the densest part of the HC
  distribution (second trimester), so the task is learnable but not easy.
* **Pixels**: each 256×256 image is reduced to 28×28 with Pillow's ``BOX`` filter (the mean of
  the source pixels under each target pixel, i.e. area averaging with full antialiasing: no
  aliasing of the ultrasound speckle into the small image), kept as uint8.

The output has MedMNIST v2's keys and types (``{train,val,test}_images`` uint8 N×28×28,
``{train,val,test}_labels`` uint8 N×1). Name it ``hc18-28.npz``: the loaders name the classes
of that file stem ``small-head`` and ``large-head`` (``common.evaluation.reference`` and
``simulation.partition``), other stems get ``class0``/``class1``. Same source and seed, same
bytes. The file is written outside the repository, which never holds patient data::

    python -m simulation.datasets hc18 --out /work/exp/hc18-28.npz
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
HC18_DIR = REPO.parent / "shared" / "data" / "segmentation" / "hc18"
HC18_CLASSES = ("small-head", "large-head")  # class 0: HC ≤ the training median, class 1: above
SPLITS = ("train", "val", "test")
SHARES = (0.55, 0.15, 0.30)  # image shares of train / val / test (cut at whole exams)
SIZE = 28  # MedMNIST's side


class DatasetBuildError(UserError, ValueError):
    """The source folder is missing or malformed, or the output path is not allowed."""


@dataclass(frozen=True, eq=False)
class BuiltDataset:
    """A MedMNIST-v2 data set in memory, with what it was built from.

    ``arrays``: the ``.npz`` keys (``train_images`` uint8 (N, 28, 28), ``train_labels`` uint8
    (N, 1), same for val and test); ``exams``: the exam id of every image, per split (N,);
    ``threshold_mm``: the training median HC that separates the classes.
    """

    arrays: dict[str, np.ndarray]
    exams: dict[str, np.ndarray]
    threshold_mm: float
    class_names: tuple[str, ...]

    def counts(self) -> dict[str, list[int]]:
        """Images per class, per split."""
        return {s: np.bincount(self.arrays[f"{s}_labels"][:, 0], minlength=len(self.class_names)).tolist()
                for s in SPLITS}


def _read_metadata(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(file names, exam ids (N,) str, head circumference (N,) float64 mm) from metadata.csv."""
    path = folder / "metadata.csv"
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise DatasetBuildError(f"cannot read {path}: {exc}; pass --source, the HC18 folder "
                                "(images/, metadata.csv)") from exc
    try:
        files = [r["file"] for r in rows]
        exams = np.array([r["exam_id"] for r in rows], dtype=np.str_)
        hc = np.array([float(r["head_circumference_mm"]) for r in rows], dtype=np.float64)
    except (KeyError, ValueError) as exc:
        raise DatasetBuildError(f"{path} lacks file/exam_id/head_circumference_mm: {exc}") from exc
    if len(set(exams.tolist())) < len(SPLITS):
        raise DatasetBuildError(f"{path} has fewer than {len(SPLITS)} exams; nothing to split")
    return files, exams, hc


def split_exams(exams: np.ndarray, seed: int, shares: Sequence[float] = SHARES) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of every image (N,), whole exams at a time.

    The distinct exams are shuffled with ``seed``; an exam goes to the split in which the image
    count *before* it falls (cuts at the cumulative shares), so each split's image share is
    within one exam of its target and no exam spans two splits. Every split gets at least one
    exam (the first ones of the order, when the shares would leave a split empty).
    """
    ids, inverse, sizes = np.unique(exams, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(ids.size)
    before = np.concatenate([[0], np.cumsum(sizes[order])[:-1]]) / sizes.sum()  # share before each exam
    cuts = np.cumsum(shares)[:-1]
    split_of_exam = np.empty(ids.size, dtype=np.int64)
    split_of_exam[order] = np.searchsorted(cuts, before, side="right")
    for k in range(len(shares)):  # tiny inputs: give an empty split the largest split's last exam
        if not np.any(split_of_exam == k):
            largest = int(np.bincount(split_of_exam, minlength=len(shares)).argmax())
            split_of_exam[order[np.flatnonzero(split_of_exam[order] == largest)[-1]]] = k
    return split_of_exam[inverse]


def _load_small(path: Path, size: int) -> np.ndarray:
    """One greyscale PNG → (size, size) uint8 by area averaging (Pillow BOX)."""
    try:
        with Image.open(path) as img:
            small = img.convert("L").resize((size, size), Image.Resampling.BOX)
    except OSError as exc:
        raise DatasetBuildError(f"cannot read image {path}: {exc}") from exc
    return np.asarray(small, dtype=np.uint8)


def build_hc18(folder: Path = HC18_DIR, *, seed: int = 0, size: int = SIZE) -> BuiltDataset:
    """The HC18 folder → a two-class MedMNIST-v2 data set (see the module docstring)."""
    files, exams, hc = _read_metadata(folder)
    split = split_exams(exams, seed)
    threshold = float(np.median(hc[split == 0]))
    labels = (hc > threshold).astype(np.uint8)
    arrays: dict[str, np.ndarray] = {}
    exam_ids: dict[str, np.ndarray] = {}
    for k, name in enumerate(SPLITS):
        idx = np.flatnonzero(split == k)
        arrays[f"{name}_images"] = np.stack([_load_small(folder / "images" / files[i], size) for i in idx])
        arrays[f"{name}_labels"] = labels[idx].reshape(-1, 1)
        exam_ids[name] = exams[idx]
    return BuiltDataset(arrays, exam_ids, threshold, HC18_CLASSES)


def write_npz(dataset: BuiltDataset, out: Path) -> None:
    """Write the MedMNIST keys to ``out`` (compressed, no pickle); refused inside the repository."""
    target = out.resolve()
    if target.is_relative_to(REPO):
        raise DatasetBuildError(f"{out} is inside the repository ({REPO}); patient-derived data is never "
                                "written there, pass an --out outside it")
    if target.suffix != ".npz":
        raise DatasetBuildError(f"--out must end in .npz, got {out}")
    target.parent.mkdir(parents=True, exist_ok=True)
    a = dataset.arrays
    np.savez_compressed(target, train_images=a["train_images"], train_labels=a["train_labels"],
                        val_images=a["val_images"], val_labels=a["val_labels"],
                        test_images=a["test_images"], test_labels=a["test_labels"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulation.datasets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True)
    hc = sub.add_parser("hc18", help="HC18 fetal-head ultrasound → 28×28 small-head / large-head .npz",
                        description="Build the HC18 .npz (classes by the training median head circumference, "
                                    "split by exam 55/15/30, Pillow BOX resize to 28×28).")
    hc.add_argument("--out", type=Path, required=True,
                    help="the .npz to write, outside the repository; name it hc18-28.npz so the loaders "
                         "name the classes small-head / large-head")
    hc.add_argument("--source", type=Path, default=HC18_DIR,
                    help=f"the HC18 256×256 folder with images/ and metadata.csv (default: {HC18_DIR})")
    hc.add_argument("--seed", type=int, default=0, help="seed of the exam shuffle (default: 0)")
    args = p.parse_args(argv)
    try:
        built = build_hc18(args.source, seed=args.seed)
        write_npz(built, args.out)
    except DatasetBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: classes {list(built.class_names)} split at HC {built.threshold_mm:.2f} mm "
          f"(training median); images per class {built.counts()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
