"""Benchmark: ``prepare`` throughput on the shared DICOM corpus (files/s and MB/s).

Runs the production path (``client.prepare.pipeline.prepare_site``: folder walk, sandboxed workers,
structure checks, decode, display pipeline, resize, cache write) on ``../shared/data/dicom``
with a forced rebuild, once with one worker and once with ``os.cpu_count()`` workers,
interleaved over ``--repeats`` rounds so machine noise hits both alike. Worker start-up is
included: it is part of what a hospital waits for. MB/s counts the bytes of every file seen
(kept or rejected). "CPU s" (this process and its workers) shows the work itself when other
jobs share the cores; the load average is printed for the same reason. Nothing here asserts a
time.

    python -m simulation.bench_prepare [--data ../shared/data/dicom] [--repeats 3] [--image-size 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from client.prepare.pipeline import PrepareReport, prepare_site
from common.dicom.paths import walk_data_folder

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"


def cpu_seconds() -> float:
    """User + system CPU of this process and of its reaped children (the workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_prepare(data: Path, cache: Path, workers: int, image_size: int) -> tuple[float, float, PrepareReport]:
    """Wall and CPU seconds of one forced ``prepare_site`` run, and its report."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    report = prepare_site(data, cache, image_size=image_size, salt=b"\0" * 32, progress=False,
                          force=True, workers=workers)
    return time.perf_counter() - t0, cpu_seconds() - c0, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DICOM folder to prepare")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per worker count")
    parser.add_argument("--image-size", type=int, default=32, help="model image side")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no DICOM corpus at {args.data}: the benchmark needs ../shared/data/dicom "
              "(or --data FOLDER)", file=sys.stderr)
        return 2
    entries = walk_data_folder(args.data.resolve())
    total_bytes = sum(entry.stat.st_size for entry in entries)
    cores = os.cpu_count() or 1
    load = os.getloadavg()
    counts = sorted({1, cores})
    times: dict[int, list[float]] = {n: [] for n in counts}
    cpu: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        for _ in range(args.repeats):
            for n in counts:
                seconds, used, report = time_prepare(args.data, Path(tmp) / f"cache{n}", n, args.image_size)
                times[n].append(seconds)
                cpu[n].append(used)
    print(f"corpus {args.data}: {len(entries)} files, {total_bytes / 1e6:.1f} MB; "
          f"{report.files_kept} files kept -> {report.images_kept} images of {report.patients} "
          f"patients; rejected {report.rejected}")
    print(f"load average before: {load[0]:.1f}, after: {os.getloadavg()[0]:.1f} on {cores} cores")
    print(f"{'workers':>8} {'median s':>9} {'files/s':>9} {'MB/s':>7} {'images/s':>9} {'CPU s':>7}"
          f"   (best of {args.repeats}: files/s)")
    for n in counts:
        median = statistics.median(times[n])
        best = min(times[n])
        print(f"{n:>8} {median:>9.2f} {len(entries) / median:>9.1f} {total_bytes / 1e6 / median:>7.1f} "
              f"{report.images_kept / median:>9.1f} {statistics.median(cpu[n]):>7.2f}"
              f"   ({len(entries) / best:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
