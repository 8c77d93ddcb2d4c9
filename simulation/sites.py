"""Write and prepare a simulation's virtual hospitals, several at a time.

Each site's share of the population is written as DICOM files and prepared by the hospital
node's own ``prepare`` (``client.prepare.pipeline.prepare_site``). Writing and decoding are
Python work, so sites are prepared in processes, not threads (which would share one core). The
processes are started with ``spawn`` (no fork of a parent that may hold torch's or gRPC's
threads) and import only this module and what it needs, not torch: a process is ready in about
a second and receives the population once.

The files are decoded in the preparing process (``run_jobs`` with no workers), not in the
sandboxed decoding workers that guard a hospital against a hostile file: these are files the
simulation has just written from its own arrays. A sandbox worker's start (a fresh Python
importing pydicom and the decoders, ≈ 0.8 s of CPU) cost more than decoding a site's 100 images.
"""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from client.prepare.pipeline import PrepareReport, load_or_create_salt, prepare_site
from common.config import site_paths
from simulation.partition import SourceData, write_site_dicom


@dataclass(frozen=True)
class SiteBuild:
    """What writing and preparing one virtual hospital needs besides its images."""

    out: Path  # the simulation's folder: sites/<site>/ is the site's state folder
    seed: int  # the run's seed: DICOM UIDs
    image_size: int  # model.image-size
    pairs: bool  # model.pairs: write and prepare each image's mask
    resume: bool  # keep a site's DICOM files written by an earlier start


def prepare_one_site(build: SiteBuild, source: SourceData, site: str, indices: np.ndarray) -> PrepareReport:
    """Write ``source.images[indices]`` as site ``site``'s DICOM files and prepare them as its node would."""
    root = build.out / "sites" / site
    if not build.resume and (root / "dicom").exists():
        shutil.rmtree(root / "dicom")
    if not (root / "dicom").exists():
        write_site_dicom(source, indices, root / "dicom", site_name=site, seed=build.seed, masks=build.pairs)
    paths = site_paths(root)
    return prepare_site(root / "dicom", paths.cache_dir, image_size=build.image_size,
                        salt=load_or_create_salt(paths.salt_path), class_names=source.class_names,
                        progress=False, workers=0, pairs=build.pairs)


_HELD: list[SourceData] = []  # in a preparing process: the population, received once when it starts


def _hold(source: SourceData) -> None:
    _HELD[:] = [source]


def _prepare_held(build: SiteBuild, site: str, indices: np.ndarray) -> PrepareReport:
    return prepare_one_site(build, _HELD[0], site, indices)


def prepare_sites(build: SiteBuild, source: SourceData, shares: dict[str, np.ndarray],
                  parallel: int) -> dict[str, PrepareReport]:
    """Site id → its prepare report, ``parallel`` sites at a time (1: here, one after another)."""
    reports: dict[str, PrepareReport] = {}
    with tqdm(total=len(shares), desc="prepare sites", unit="site") as bar:
        if parallel <= 1:
            for site, indices in shares.items():
                reports[site] = prepare_one_site(build, source, site, indices)
                bar.update(1)
            return reports
        with ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_hold, initargs=(source,)) as pool:
            futures = {pool.submit(_prepare_held, build, site, indices): site for site, indices in shares.items()}
            try:
                for future in as_completed(futures):
                    reports[futures[future]] = future.result()
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()  # sites not started yet; running ones finish
                raise
    return reports
