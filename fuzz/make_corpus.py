"""Write a seed corpus for fuzz_dicom.py: pydicom's bundled test files and ../shared/data/dicom.

    python fuzz/make_corpus.py CORPUS_DIR [--max-bytes 1048576]

Only files up to ``--max-bytes`` are copied (small seeds fuzz faster); nothing is downloaded.
The corpus folder is outside the repository: these files must not be committed.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import pydicom.data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"


def sources() -> list[Path]:
    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    if SHARED.is_dir():
        roots.append(SHARED)
    return [p for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix not in (".py", ".pyc", ".md", ".json", ".txt")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="folder to fill (created if missing)")
    parser.add_argument("--max-bytes", type=int, default=2**20, help="skip larger files")
    args = parser.parse_args()
    args.corpus.mkdir(parents=True, exist_ok=True)
    copied = 0
    for path in sources():
        if path.stat().st_size <= args.max_bytes:
            name = hashlib.sha1(path.read_bytes()).hexdigest()  # libFuzzer's own naming
            shutil.copyfile(path, args.corpus / name)
            copied += 1
    print(f"{copied} seed files in {args.corpus}")


if __name__ == "__main__":
    main()
