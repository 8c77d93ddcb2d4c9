"""``medsynth simulate --ray-address``: the virtual hospitals on an existing Ray cluster.

The slow test starts its own ``ray start --head`` (own temp dir, free ports, a process tag that
only its processes carry), runs a one-round simulation against it, and reads the cluster's GCS:
the run's driver (``flwr-simulation``) must be a job of that cluster and its virtual hospitals
``ClientAppActor`` actors of that job. Had the simulation started a Ray of its own, the cluster
would have no such job or actors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import ConfigError
from common.flower import FlowerEnv, free_port
from common.flower.env import TAG_ENV_VAR
from common.flower.processes import describe_pids, spawn, tail, terminate_then_kill
from medsynth.cli import main
from simulation.ray_cluster import RayCluster, RayClusterError, parse_ray_address, probe_ray_cluster
from simulation.runner import SimulateOptions


@pytest.mark.parametrize("text", ["127.0.0.1:6379", "ray-head.example.org:6379", "localhost:1", "10.0.0.5:65535"])
def test_a_gcs_address_is_accepted_as_given(text: str) -> None:
    assert parse_ray_address(text) == text


@pytest.mark.parametrize("text", ["auto", "local", "ray://10.0.0.5:10001", "10.0.0.5", "10.0.0.5:", ":6379",
                                  "10.0.0.5:0", "10.0.0.5:65536", "10.0.0.5:63x", "[::1]:6379", "::1:6379",
                                  "under_score:6379", " 10.0.0.5:6379", "10.0.0.5:6379 ", "-bad.host:6379"])
def test_anything_but_host_colon_port_is_refused(text: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_ray_address(text)
    assert refused.value.exit_code == 2 and "--ray-address" in str(refused.value)


def test_the_address_reaches_the_simulation_engine_only_when_given(tmp_path: Path) -> None:
    # prepare: a stray RAY_ADDRESS in the caller's environment
    base = {"PATH": "/usr/bin", "RAY_ADDRESS": "10.9.9.9:6379"}
    # act
    private = FlowerEnv(flwr_home=tmp_path, port=9000).environ(base)
    attached = FlowerEnv(flwr_home=tmp_path, port=9000, ray_address="10.0.0.5:6379").environ(base)
    # assert
    assert "RAY_ADDRESS" not in private
    assert attached["RAY_ADDRESS"] == "10.0.0.5:6379"


def test_an_unreachable_cluster_is_exit_2_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: a port nothing listens on
    address = f"127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    # act
    code = main(["simulate", "--out", str(out), "--sites", "2", "--ray-address", address])
    # assert: one line saying what to run; nothing written
    err = capsys.readouterr().err
    assert code == 2
    assert f"no Ray cluster answers at --ray-address {address}" in err and "ray start --head" in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_a_malformed_address_is_refused_by_the_options() -> None:
    with pytest.raises(ValueError, match="not HOST:PORT"):
        SimulateOptions(out=Path("x"), ray_address="6379")


# ---------------------------------------------------------------------------------------------- slow

def _gcs_records(address: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(job id, driver command line) of every job and (class name, job id) of every actor the GCS
    at ``address`` knows, dead ones included (no dashboard needed)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        jobs = gcs_service_pb2_grpc.JobInfoGcsServiceStub(channel).GetAllJobInfo(
            gcs_service_pb2.GetAllJobInfoRequest(), timeout=10)
        actors = gcs_service_pb2_grpc.ActorInfoGcsServiceStub(channel).GetAllActorInfo(
            gcs_service_pb2.GetAllActorInfoRequest(), timeout=10)
    return ([(j.job_id.hex(), j.entrypoint) for j in jobs.job_info_list],
            [(a.class_name, a.job_id.hex()) for a in actors.actor_table_data])


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A separate Ray head on this machine (2 CPUs), stopped by its process tag afterwards; yields its GCS address.

    Every port it opens is a free one (Ray's defaults, e.g. 8265 and 10001, may be another
    instance's); its temp dir is short (AF_UNIX socket paths) and its own. ``ray stop`` is never
    used: it stops every Ray of the user on the machine.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="msray-", dir="/tmp"))
    tag = uuid.uuid4().hex
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", str(temp_dir), "--num-cpus", "2",
           "--include-dashboard", "false", "--dashboard-host", "127.0.0.1"]
    for option in ("--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                   "--node-manager-port", "--object-manager-port"):
        cmd += [option, str(free_port())]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({TAG_ENV_VAR: tag, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"})
    log = temp_dir / "ray-start.log"
    proc = spawn(cmd, env, log, cwd=temp_dir)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                probe_ray_cluster(address, cpus_per_site=1)
                break
            except RayClusterError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start --head did not come up:\n{tail(log)}") from None
                time.sleep(1.0)
        yield address
    finally:
        left = terminate_then_kill([proc], [tag], grace_s=10.0)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"Ray processes of the test's head survived:\n{describe_pids(left)}")


@pytest.mark.slow
def test_the_virtual_hospitals_run_on_the_given_cluster(ray_head: str, tmp_path: Path) -> None:
    # prepare: the cluster as the simulation finds it
    jobs_before, _ = _gcs_records(ray_head)
    out = tmp_path / "out"
    # act: the smallest run (2 sites, 1 round, 1 step, 32 px, plain aggregation, no warm start)
    done = subprocess.run(
        [sys.executable, "-m", "medsynth", "simulate", "--out", str(out), "--sites", "2", "--rounds", "1",
         "--epsilon", "8", "--patients-per-site", "8", "--images-per-patient", "2", "--local-steps", "1",
         "--batch-size", "4", "--image-size", "32", "--plain-aggregation", "--warm-start-share", "0",
         "--no-evaluation", "--ray-address", ray_head],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    # assert: the run completed for both hospitals
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert f"Ray cluster at {ray_head}: 1 node(s), 2 CPUs" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    assert summary["rounds"][-1]["sites_trained"] == ["site-0", "site-1"]
    # assert: its driver was a new job of the cluster, and the virtual hospitals that job's actors
    jobs, actors = _gcs_records(ray_head)
    new_jobs = [(job, entry) for job, entry in jobs if (job, entry) not in jobs_before]
    assert len(new_jobs) == 1 and "flwr-simulation" in new_jobs[0][1]
    hospitals = [cls for cls, job in actors if job == new_jobs[0][0]]
    assert hospitals and set(hospitals) == {"ClientAppActor"}
    # assert: no private Ray was started (its sessions would be in OUT's Ray temp dir), and the cluster still runs
    assert not any((out / ".flwr" / "ray").rglob("session_*"))
    assert isinstance(probe_ray_cluster(ray_head, cpus_per_site=1), RayCluster)
