"""Which Flower node is which hospital: the node ids ``server start`` registered, by site id.

``flwr supernode register`` answers with the node id it gave a hospital's key; ``flwr supernode
list`` and the ServerApp's Grid know nodes only by those ids. ``server start`` keeps the answer in
``STATE/results/hospitals.json`` (one writer: :func:`server.daemon.SuperLinkDaemon.register_hospitals`)
so that the ServerApp's waiting lines, its ``NoHospitals`` message and ``server status`` name
hospitals by the site ids of ``server.toml [hospitals]``. The file holds only public facts (site
ids the consortium chose, node ids the SuperLink chose). A run without it (a simulation, a state
folder from before this file existed) names nodes by id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import write_json_atomic
from common.round_record import RecordError

HOSPITALS_FILE = "hospitals.json"


@dataclass(frozen=True)
class NodeRegistry:
    """Site id → the Flower node id its authentication key was registered under."""

    node_ids: Mapping[str, int] = field(default_factory=dict)

    def site_of(self, node_id: int) -> str:
        """The hospital a node id belongs to, or ``node <id>`` when it is not known."""
        for site, known in self.node_ids.items():
            if known == node_id:
                return site
        return f"node {node_id}"

    def names(self, node_ids: Iterable[int]) -> list[str]:
        """Sorted names of these nodes (site ids where known)."""
        return sorted(self.site_of(n) for n in node_ids)

    def missing(self, node_ids: Iterable[int]) -> list[str]:
        """Sorted site ids of the registered hospitals whose node is not among ``node_ids``."""
        present = set(node_ids)
        return sorted(site for site, n in self.node_ids.items() if n not in present)

    def with_site(self, site: str, node_id: int) -> NodeRegistry:
        return NodeRegistry({**self.node_ids, site: node_id})

    def write(self, path: Path) -> None:
        write_json_atomic(path, {"format": 1, "node_ids": dict(sorted(self.node_ids.items()))})

    @staticmethod
    def read(path: Path) -> NodeRegistry:
        """The registry at ``path``; empty when there is none; ``RecordError`` when it is not one."""
        if not path.is_file():
            return NodeRegistry()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RecordError(f"{path}: not JSON ({exc}); delete it, `server start` writes it again") from exc
        ids = raw.get("node_ids") if isinstance(raw, dict) else None
        if (not isinstance(raw, dict) or raw.get("format") != 1 or not isinstance(ids, dict)
                or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                           for k, v in ids.items())):
            raise RecordError(f"{path} is not a node registry; delete it, `server start` writes it again")
        return NodeRegistry(dict(ids))
