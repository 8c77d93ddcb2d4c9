"""client.prepare.workers: a file that hangs, crashes or exhausts memory costs one worker, not the run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from client.prepare.labels import LabelRule
from client.prepare.workers import FileJob, FileOutcome, PrepareSettings, SandboxPool
from tests.dicom_bytes import EXPLICIT_LE, image_dataset, part10


def misbehave(job: FileJob, settings: PrepareSettings) -> FileOutcome:
    """A handler that does what its file name says (runs inside the worker process)."""
    if job.rel == "hang":
        time.sleep(3600)
    if job.rel == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if job.rel == "allocate":
        try:
            block = np.ones(2**30, dtype=np.uint8)  # 1 GiB against a 256 MiB allowance
        except MemoryError:
            return FileOutcome(job.rel, reason="out-of-memory", message="MemoryError")
        return FileOutcome(job.rel, message=f"allocated {block.nbytes}")
    return FileOutcome(job.rel, images=np.zeros((1, 2, 2), np.float32), label="a")


def settings_for(root: Path, **overrides: object) -> PrepareSettings:
    base: dict[str, object] = {"root": root, "image_size": 8, "labels": LabelRule("folder", ("a",)),
                               "time_limit_s": 5.0, "memory_limit_bytes": 256 * 2**20}
    return PrepareSettings(**{**base, **overrides})  # type: ignore[arg-type]


def test_hang_crash_and_memory_hog_become_typed_outcomes(tmp_path: Path) -> None:
    # prepare
    names = ["ok1", "hang", "ok2", "crash", "ok3", "allocate", "ok4"]
    jobs = [FileJob(name, tmp_path.stat()) for name in names]
    # act
    with SandboxPool(settings_for(tmp_path, time_limit_s=2.0), workers=2, handler=misbehave) as pool:
        outcomes = {o.rel: o for o in pool.run(jobs)}
    # assert: every job answered once; the bad ones with their reason, the others unharmed
    assert sorted(outcomes) == sorted(names)
    assert {name: o.reason for name, o in outcomes.items() if o.reason} == {
        "hang": "timeout", "crash": "worker-crashed", "allocate": "out-of-memory"}
    assert all(outcomes[n].images is not None for n in ("ok1", "ok2", "ok3", "ok4"))
    assert "exit code -11" in outcomes["crash"].message


def test_pool_decodes_real_files_and_closes_its_workers(tmp_path: Path) -> None:
    # prepare: three small images under the label folder "a"
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.dcm").write_bytes(part10(EXPLICIT_LE, image_dataset(4, 4 + i)))
    jobs = [FileJob(f"a/{i}.dcm", (tmp_path / "a" / f"{i}.dcm").lstat()) for i in range(3)]
    # act
    pool = SandboxPool(settings_for(tmp_path), workers=2)
    with pool:
        outcomes = sorted(pool.run(jobs), key=lambda o: o.rel)
        processes = [w.process for w in pool._workers]
    # assert: (1, 8, 8) images in [-1, 1], label "a", patient key read; workers gone
    assert [o.reason for o in outcomes] == [None, None, None]
    for outcome in outcomes:
        assert outcome.images is not None and outcome.images.shape == (1, 8, 8)
        assert -1.0 <= outcome.images.min() < outcome.images.max() <= 1.0
        assert (outcome.label, outcome.patient_id) == ("a", "FUZZ-1")
    assert processes and all(p.poll() is not None for p in processes)


def test_workers_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers"):
        SandboxPool(settings_for(tmp_path), workers=0)
