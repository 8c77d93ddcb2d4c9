"""``medsynth simulate --ray-address``: Flower's Simulation Engine on an existing Ray cluster.

How Flower 1.41 is pointed at a cluster (read in its source, verified on one machine):

* ``flwr-simulation`` (spawned by the SuperLink's SuperExec, inheriting the SuperLink's
  environment) builds ``RayBackend``, which calls ``ray.init(runtime_env=..., include_dashboard=False,
  **init_args)``. Its ``init_args`` come only from the federation config's ``init-args-num-cpus``,
  ``init-args-num-gpus``, ``init-args-logging-level`` and ``init-args-log-to-driver``: there is no
  address key.
* ``ray.init()`` without an address reads ``RAY_ADDRESS``: so the SuperLink is started with
  ``RAY_ADDRESS=HOST:PORT`` (:class:`common.flower.FlowerEnv`'s ``ray_address``) and the driver
  joins that cluster instead of starting its own. ``ray.init`` refuses ``num_cpus``/``num_gpus``
  when joining a cluster; medsynth sends only ``client-resources-num-cpus`` (per virtual hospital),
  never ``init-args-*``, so nothing conflicts.
* The actor pool is sized from ``ray.nodes()``: per node ``floor(CPUs / client-resources-num-cpus)``
  actors, summed over the cluster. ``RayBackend.terminate`` calls ``ray.shutdown()``, which only
  disconnects a driver that joined a cluster: the cluster keeps running.

Before anything starts, :func:`probe_ray_cluster` asks the cluster's GCS (the address
``ray start --head`` prints, port 6379 by default) over gRPC, with a short deadline, for its Ray
and Python versions and its live nodes' CPUs, so that a wrong address, a foreign Ray version or a
cluster too small for one virtual hospital is a :class:`RayClusterError` (exit 2) in a second,
not a failure deep inside ``flwr-simulation``. The gRPC stubs are Ray's generated ones
(``ray.core.generated``, internal to Ray; Ray is pinned by ``flwr[simulation]==1.41.0``).
"""

from __future__ import annotations

import ipaddress
import json
import platform
import re
from dataclasses import dataclass

from common.config import ConfigError
from common.errors import UserError

__all__ = ["RayCluster", "RayClusterError", "parse_ray_address", "probe_ray_cluster"]

#: A DNS host name: dot-separated labels of letters, digits and inner hyphens.
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")

_START_HINT = ("start the cluster's head with `ray start --head --port 6379` (from this medsynth environment's "
               ".venv/bin) and pass the address it prints (HOST:6379); docs/simulation.md, "
               "'Attaching to a Ray cluster'")


class RayClusterError(UserError):
    """The Ray cluster named by ``--ray-address`` cannot run this simulation; the message says why
    and what to run."""


@dataclass(frozen=True)
class RayCluster:
    """What the cluster's GCS reported: Ray and Python versions and its live nodes' CPUs."""

    address: str
    ray_version: str
    python_version: str
    node_cpus: tuple[float, ...]  # one entry per live node

    def describe(self) -> str:
        """One line for the user: where, how many nodes and CPUs, which Ray."""
        return (f"Ray cluster at {self.address}: {len(self.node_cpus)} node(s), "
                f"{sum(self.node_cpus):g} CPUs, Ray {self.ray_version}")


def parse_ray_address(text: str) -> str:
    """``HOST:PORT`` of a Ray cluster's GCS, strictly: a host name or an IPv4 address, a port 1..65535.

    Refused (:class:`common.config.ConfigError`): Ray Client addresses (``ray://``), whose driver
    would run elsewhere than Flower's; ``auto`` and ``local``, which would pick whatever cluster
    the machine has (or start one) instead of the one meant; IPv6 literals (not verified with Ray).
    """
    value = text
    if "://" in value:
        raise ConfigError(f"--ray-address {text!r}: give the head's GCS address HOST:PORT (as `ray start --head` "
                          "prints it), not a URL; Ray Client (ray://) addresses are not supported")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"--ray-address {text!r} is not HOST:PORT (e.g. 10.0.0.5:6379); {_START_HINT}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if (ip is not None and ip.version != 4) or (ip is None and not _HOSTNAME_RE.match(host)):
        raise ConfigError(f"--ray-address {text!r}: the host must be a host name or an IPv4 address")
    return f"{host}:{int(port_text)}"


def probe_ray_cluster(address: str, *, cpus_per_site: int, timeout_s: float = 5.0) -> RayCluster:
    """Ask the GCS at ``address`` (from :func:`parse_ray_address`) whether this simulation can run there.

    Refused with :class:`RayClusterError`: nothing answers (or not a Ray GCS) within ``timeout_s``;
    a Ray or Python (major.minor) version other than this environment's, which ``ray.init`` would
    refuse later; no live node with ``cpus_per_site`` CPUs, where Flower's actor pool would be empty.
    """
    import grpc
    import ray
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            kv = gcs_service_pb2_grpc.InternalKVGcsServiceStub(channel).InternalKVGet(
                gcs_service_pb2.InternalKVGetRequest(key=b"CLUSTER_METADATA", namespace=b"cluster"),
                timeout=timeout_s)
            nodes = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise RayClusterError(
                f"no Ray cluster answers at --ray-address {address} ({exc.code().name}: {exc.details()}); "
                f"{_START_HINT}") from None
    try:
        metadata = json.loads(kv.value.decode("utf-8"))
        ray_version, python_version = str(metadata["ray_version"]), str(metadata["python_version"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise RayClusterError(f"the service at --ray-address {address} answers but reports no Ray cluster "
                              f"metadata; {_START_HINT}") from None
    if ray_version != ray.__version__:
        raise RayClusterError(f"the Ray cluster at {address} runs Ray {ray_version}, this environment Ray "
                              f"{ray.__version__}: start every node from the same medsynth environment "
                              "(`make install`; flwr[simulation]==1.41.0 pins Ray)")
    ours = platform.python_version_tuple()[:2]
    if python_version.split(".")[:2] != list(ours):
        raise RayClusterError(f"the Ray cluster at {address} runs Python {python_version}, this environment "
                              f"Python {'.'.join(ours)}: start every node from the same medsynth environment")
    alive = [node for node in nodes.node_info_list if node.state == 0]  # GcsNodeInfo.ALIVE
    cpus = tuple(float(node.resources_total.get("CPU", 0.0)) for node in alive)
    if not any(c >= cpus_per_site for c in cpus):
        raise RayClusterError(f"the Ray cluster at {address} has no live node with {cpus_per_site} CPU(s) for a "
                              f"virtual hospital (nodes' CPUs: {list(cpus)}): add nodes with `ray start "
                              f"--address {address}`, or lower --cpus-per-site")
    return RayCluster(address=address, ray_version=ray_version, python_version=python_version, node_cpus=cpus)
