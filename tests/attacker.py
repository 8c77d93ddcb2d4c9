"""The dishonest server of the attack tests: the real round driver, used out of order.

An attacker who runs the aggregation server controls the SuperLink and the ServerApp, so it can
send the hospitals any message in any order. These tests give it the project's own driver
(``server.secagg.SecureRounds``) and the in-process Grid (``tests.inprocess``) that
delivers every message to the real hospital code (``client.app`` handlers, training, ledger,
release record, audit log), and let it call the driver's steps as an attacker would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from client.audit import AuditEntry, read_entries
from client.ledger import PrivacyLedger
from client.release import Release, ReleaseRecord
from common.config import RunConfig
from common.models import build_models
from common.protocol.messages import SiteReply, decode_reply
from common.weights import UpdateLayout, model_arrays
from server.secagg import SecureRounds
from simulation.partition import split_by_patient, write_site_dicom
from simulation.phantoms import phantom_population
from simulation.runner import make_site_keys
from tests.helpers import default_run_config
from tests.inprocess import InProcessGrid, fresh_state

RUN_ID = 4242

#: A small, fast run through the real code: 3 DP steps, narrow models, fresh (OS) DP noise.
FAST: dict[str, Any] = {
    "warm-start__budget-share": 0.0,  # the attacks target training rounds; test_warm_start covers round 0
    "train__local-steps": 3, "train__batch-size": 4, "model__g-width": 16, "model__d-width": 16,
    "dp__calibrate": False, "dp__noise-multiplier": 1.2, "dp__sample-rate": 0.3, "wait-nodes-timeout": 5.0,
    "secure-aggregation": True, "min-nodes": 3,
}


def write_sites(root: Path, patients: list[int], seed: int = 11) -> Path:
    """Phantom hospitals with the given patient counts (2 images each), their keys and pins."""
    source = phantom_population(sum(patients), 2, image_size=32, seed=seed)
    parts = split_by_patient(source, sum(patients), "iid", seed=seed)  # one patient per part
    start = 0
    for i, count in enumerate(patients):
        idx = np.sort(np.concatenate(parts[start : start + count]))
        write_site_dicom(source, idx, root / f"site-{i}" / "dicom", site_name=f"site-{i}", seed=seed)
        start += count
    make_site_keys(root, [f"site-{i}" for i in range(len(patients))])
    return root


class Attack:
    """A consortium of in-process hospitals and the driver the dishonest server abuses."""

    def __init__(self, sites_dir: Path, out: Path, num_sites: int, **overrides: Any) -> None:
        fresh_state(sites_dir)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1  # the ServerApp's identity
        self.sites_dir = sites_dir
        self.config = default_run_config(**{"sim__sites-dir": str(sites_dir), "output-dir": str(out), **FAST,
                                            **overrides})
        self.run = RunConfig.from_flower(self.config)
        self.grid = InProcessGrid(num_sites, self.config, RUN_ID)
        netG, netD = build_models(self.run.model, seed=0)
        self.arrays = model_arrays(netG, netD)
        self.driver = SecureRounds(self.grid, self.run, RUN_ID, UpdateLayout.of(self.arrays))  # type: ignore[arg-type]
        self.nodes = sorted(self.grid.get_node_ids())
        self.failures: list[str] = []

    def node(self, site: str) -> int:
        return self.nodes[int(site.removeprefix("site-"))]

    def replies(self, kind: str) -> list[Message]:
        return [m for m in self.grid.replies if m.metadata.message_type == kind]

    def decoded(self, kind: str) -> dict[str, SiteReply]:
        """Privacy records of every ``kind`` reply that carried one, by site (last wins)."""
        return {r.site_id: r for r in (decode_reply(m.content) for m in self.replies(kind)
                                       if "privacy" in m.content.config_records)}

    def state(self, site: str) -> Path:
        return self.sites_dir / site

    def ledger(self, site: str) -> PrivacyLedger:
        return PrivacyLedger.read(self.state(site) / "ledger.json")

    def releases(self, site: str, server_round: int) -> list[Release]:
        return ReleaseRecord.read(self.state(site) / "released.json").releases(RUN_ID, server_round)

    def audit(self, site: str) -> list[AuditEntry]:
        return read_entries(self.state(site) / "audit.jsonl")
