"""A real consortium on loopback for the deployment tests: certificates, server.toml, node.toml,
and ``medsynth server start`` / ``medsynth node start`` as real processes.

Every key is made with the ``medsynth certs`` commands a hospital and the operator run; every
process is started here in its own session and stopped by PID (and by the process tag each
daemon writes to its ``daemon.json``), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from common.certs import read_public_keys
from common.flower import find_tagged_pids, free_port, signal_pids
from common.secagg import fingerprint
from simulation.partition import split_by_patient, write_site_dicom
from simulation.phantoms import phantom_population

MEDSYNTH = [sys.executable, "-m", "medsynth"]
REPO = Path(__file__).resolve().parents[1]

#: A small, fast run: 3 DP steps of batch 4 on 32² images, narrow models.
FAST_RUN: dict[str, Any] = {
    "train.local-steps": 3,
    "train.batch-size": 4,
    "model.g-width": 16,
    "model.d-width": 16,
    "round-timeout": 90.0,
    "wait-nodes-timeout": 120.0,
    "secure-aggregation": True,
    "warm-start.budget-share": 0.0,  # round 0 is covered by test_warm_start and the simulation test
}


def medsynth(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one ``medsynth`` CLI command to completion."""
    done = subprocess.run([*MEDSYNTH, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"medsynth {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr}")
    return done


@dataclass
class Daemon:
    """A ``medsynth ... start`` process with its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    state_dir: Path

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def tag(self) -> str | None:
        info = self.state_dir / "daemon.json"
        with contextlib.suppress(OSError, json.JSONDecodeError):
            return str(json.loads(info.read_text())["tag"])
        return None

    def wait_for(self, needle: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while needle not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}) before {needle!r}:\n{self.text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {needle!r} within {timeout_s:.0f} s:\n{self.text()[-3000:]}")
            time.sleep(0.5)

    def kill_tree(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal the daemon and every process carrying its tag (its SuperLink/SuperNode tree)."""
        tag = self.tag()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        if tag:
            signal_pids(find_tagged_pids(tag), sig, tag)

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        self.kill_tree(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def spawn(name: str, args: list[str | Path], log: Path, state_dir: Path) -> Daemon:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as fh:
        proc = subprocess.Popen([*MEDSYNTH, *map(str, args)], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    return Daemon(name, proc, log, state_dir)


@dataclass
class Consortium:
    """Folders, keys and config files of an operator and its hospitals (all on this machine)."""

    root: Path
    sites: list[str]
    class_names: tuple[str, ...]
    port: int
    daemons: list[Daemon] = field(default_factory=list)
    allowed_fabs: list[str] = field(default_factory=list)

    @property
    def server_state(self) -> Path:
        return self.root / "server-state"

    @property
    def results(self) -> Path:
        return self.server_state / "results"

    def site_dir(self, site: str) -> Path:
        return self.root / "hospitals" / site

    def node_toml(self, site: str) -> Path:
        return self.site_dir(site) / "node.toml"

    def write_node_toml(self, site: str, path: Path, **changes: Any) -> Path:
        """node.toml for ``site`` (``changes`` override [node]/[tls]/[keys] entries by key)."""
        d = self.site_dir(site)
        doc: dict[str, Any] = {
            "node": {"site-id": site, "superlink": f"127.0.0.1:{self.port}", "data-dir": str(d / "dicom"),
                     "state-dir": str(d / "state"), "epsilon-budget": 10.0,
                     "runtime-port": free_port()},  # hospitals sharing a host: one port each
            "tls": {"ca-certificate": str(self.root / "operator" / "ca" / "ca.pem")},
            "keys": {"auth-private-key": str(d / "keys" / f"{site}.auth.key"),
                     "signing-key-path": str(d / "keys" / f"{site}.secagg.key"),
                     "roster-path": str(d / "roster.json")},
            "prepare": {"class-names": ",".join(self.class_names)},
            "consortium": {"members": self.pinned_members()},
            # no hash listed: the hospitals say in words that any app may run (the node refuses an empty list)
            "apps": ({"allowed-fab-sha256": list(self.allowed_fabs)} if self.allowed_fabs
                     else {"allowed-fab-sha256": [], "any-app-may-run": True}),
        }
        for key, value in changes.items():
            table = next((t for t in doc.values() if key in t), doc["node"])  # new keys go to [node]
            table[key] = value
        path.write_text(tomli_w.dumps(doc), encoding="utf-8")
        return path

    def pinned_members(self) -> dict[str, str]:
        """What every hospital pins in [consortium.members]: the fingerprints the hospitals read to
        each other out of band (here: computed from their own public entries, not from the roster)."""
        keys = read_public_keys([self.site_dir(s) / "keys" / f"{s}.secagg.json" for s in self.sites])
        return {site: fingerprint(pk) for site, pk in keys.items()}

    def write_server_toml(self, rounds: int, **run: Any) -> Path:
        op = self.root / "operator"
        doc = {
            "superlink": {"host": "127.0.0.1", "port": self.port, "state-dir": str(self.server_state)},
            "tls": {"ca-certificate": str(op / "ca" / "ca.pem"), "certificate": str(op / "tls" / "server.pem"),
                    "private-key": str(op / "tls" / "server.key")},
            "hospitals": {s: str(op / "hospitals" / f"{s}.auth.pub") for s in self.sites},
            "run": {"num-server-rounds": rounds, "min-nodes": len(self.sites),
                    "data.class-names": ",".join(self.class_names), **FAST_RUN, **run},
        }
        path = op / "server.toml"
        path.write_text(tomli_w.dumps(doc), encoding="utf-8")
        return path

    def start_server(self, config: Path) -> Daemon:
        d = spawn("server", ["server", "start", "--config", config], self.root / "logs" / "server.log",
                  self.server_state)
        self.daemons.append(d)
        return d

    def start_node(self, site: str, config: Path | None = None) -> Daemon:
        cfg = config or self.node_toml(site)
        d = spawn(site, ["node", "start", "--config", cfg],
                  self.root / "logs" / f"{site}.log", self.site_dir(site) / "state")
        self.daemons.append(d)
        return d

    def stop_all(self) -> None:
        for d in reversed(self.daemons):
            d.stop()


def make_consortium(root: Path, num_sites: int, patients_per_site: int = 12, seed: int = 3,
                    allowed_fabs: list[str] | None = None) -> Consortium:
    """Phantom DICOM per hospital, the operator's CA and server certificate, each hospital's keys
    (made 'at the hospital'), the public halves copied to the operator, and the roster back.
    ``allowed_fabs``: the app hashes every hospital's node.toml allows (empty: ``any-app-may-run = true``)."""
    source = phantom_population(num_sites * patients_per_site, 2, image_size=32, seed=seed)
    parts = split_by_patient(source, num_sites, "iid", seed=seed)
    sites = [f"site-{i}" for i in range(num_sites)]
    c = Consortium(root, sites, source.class_names, free_port(), allowed_fabs=list(allowed_fabs or []))
    op = root / "operator"
    medsynth("certs", "ca", "--out", op / "ca")
    medsynth("certs", "server", "--ca", op / "ca", "--host", "127.0.0.1", "--out", op / "tls")
    entries = []
    for site, idx in zip(sites, parts, strict=True):
        d = c.site_dir(site)
        write_site_dicom(source, idx, d / "dicom", site_name=site, seed=seed)
        medsynth("certs", "node", "--site", site, "--out", d / "keys")
        (op / "hospitals").mkdir(parents=True, exist_ok=True)
        (op / "hospitals" / f"{site}.auth.pub").write_bytes((d / "keys" / f"{site}.auth.pub").read_bytes())
        entries.append(d / "keys" / f"{site}.secagg.json")
    medsynth("certs", "roster", "--out", op / "roster.json", *entries)
    for site in sites:
        (c.site_dir(site) / "roster.json").write_bytes((op / "roster.json").read_bytes())
        c.write_node_toml(site, c.node_toml(site))
    return c
