"""``simulation.deployment``: a real SuperLink (Deployment Engine) and real SuperNodes on loopback.

Two levels (how a node's config becomes ``--node-config`` is in ``tests/test_flower.py``):

* a toy Flower App (written into ``tmp_path``): every node replies with the node config it saw,
  messages are found in the SuperNode logs, one node is SIGKILLed, nothing survives the exit;
* medsynth itself: 3 phantom hospitals, 2 rounds, plain and secure aggregation, checked through
  ``server_state.json``, the hospitals' ledgers and the messages each SuperNode received.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.flower import RunConfigValue, find_tagged_pids, run_app
from simulation.bench_secagg import cpu_per_round
from simulation.deployment import LocalDeployment

TOY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "toydeploy"
version = "1.0.0"
description = "Toy app for tests/test_deployment.py"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "medsynth"

[tool.flwr.app.components]
serverapp = "toy.server:app"
clientapp = "toy.client:app"

[tool.flwr.app.config]
num-server-rounds = 2
min-nodes = 3
output-dir = ""
"""

TOY_SERVER = '''\
"""Toy ServerApp: wait for the nodes, send one message per node per round, write what they saw."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    want = int(cfg["min-nodes"])
    deadline = time.monotonic() + 60.0
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < want and time.monotonic() < deadline:
        time.sleep(0.2)
        node_ids = sorted(grid.get_node_ids())
    seen = {}
    for rnd in range(1, int(cfg["num-server-rounds"]) + 1):
        msgs = [
            Message(RecordDict({"cfg": ConfigRecord({"round": rnd})}), dst_node_id=n, message_type="train",
                    group_id=str(rnd))
            for n in node_ids
        ]
        for reply in grid.send_and_receive(msgs, timeout=60.0):
            if reply.has_error():
                raise RuntimeError(f"reply error: {reply.error}")
            seen[str(reply.metadata.src_node_id)] = dict(reply.content["node-config"])
        print(f"round {rnd} done", flush=True)
    out = Path(str(cfg["output-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"node_ids": node_ids, "seen": seen}))
'''

TOY_CLIENT = '''\
"""Toy ClientApp: reply with this SuperNode's node config."""
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"node-config": ConfigRecord(dict(context.node_config))}), reply_to=msg)
'''


@pytest.fixture
def toy_app(tmp_path: Path) -> Path:
    """Write the toy Flower App into ``tmp_path/toydeploy``."""
    app = tmp_path / "toydeploy"
    (app / "toy").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TOY_PYPROJECT)
    (app / "toy" / "__init__.py").write_text("")
    (app / "toy" / "server.py").write_text(TOY_SERVER)
    (app / "toy" / "client.py").write_text(TOY_CLIENT)
    return app


@pytest.mark.slow
def test_toy_app_on_three_supernodes_kill_one_and_clean_exit(tmp_path: Path, toy_app: Path) -> None:
    nodes: dict[str, dict[str, RunConfigValue]] = {
        f"site-{i}": {"site-id": f"site-{i}", "data-dir": str(tmp_path / f"data dir {i}"), "epsilon-budget": 1.5 + i}
        for i in range(3)
    }
    nodes["site-2"]["quotes"] = "both \" and '"  # goes through the TOML-file path
    with LocalDeployment(tmp_path / "flwr", nodes) as dep:
        tags = dep.tags
        assert set(dep.node_ids) == set(nodes)
        assert set(dep.list_nodes()) >= set(dep.node_ids.values())
        result = run_app(
            toy_app,
            dep,
            run_config={"output-dir": str(tmp_path / "out")},
            log_path=tmp_path / "run.log",
            timeout_s=180,
        )
        assert result.status == "finished:completed"
        data = json.loads((tmp_path / "out" / "result.json").read_text())
        by_node = {int(k): v for k, v in data["seen"].items()}
        for site, node_id in dep.node_ids.items():
            assert by_node[node_id] == nodes[site]
            received = dep.received_messages(site, result.run_id)
            assert [(m.group, m.message_type) for m in received] == [("1", "train"), ("2", "train")]

        victim = dep.node_pid("site-1")
        killed = dep.kill_node("site-1")
        assert victim in killed
        assert dep.node_pids("site-1") == set()
        assert dep.node_pids("site-0")  # the others are untouched
        assert dep.pid in dep.owned_pids()
    assert all(find_tagged_pids(tag) == set() for tag in tags)


# ---------------------------------------------------------------------------------------- medsynth


def _secagg_missing() -> str | None:
    """Why medsynth's apps cannot run yet (``client/app.py`` imports ``common.secagg``), or None."""
    spec = importlib.util.find_spec("common.secagg")
    if spec is None or spec.origin is None:
        return "common/secagg is not a package yet (client/app.py and server/secagg.py import it)"
    try:
        importlib.import_module("client.app")
        importlib.import_module("server.app")
    except ImportError as err:
        return f"medsynth's Flower apps do not import yet ({err}); common/secagg is still being written"
    return None


ROUNDS = 2
LOCAL_STEPS = 3


@dataclass(frozen=True)
class Hospitals:
    """Three phantom hospitals (DICOM, prepared cache, keys, roster) on one running deployment."""

    deployment: LocalDeployment
    root: Path
    ledgers: dict[str, Path]
    class_names: tuple[str, ...]


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hospitals]:
    """Build the sites once and keep one deployment for both modes; on exit nothing may survive."""
    reason = _secagg_missing()
    if reason is not None:
        pytest.skip(reason)
    from simulation.runner import SimulateOptions, build_sites, deployed_node_config, load_source

    root = tmp_path_factory.mktemp("deploy")
    opts = SimulateOptions(out=root, sites=3, rounds=ROUNDS, patients_per_site=16, images_per_patient=2)
    source = load_source(opts)
    ledgers = build_sites(opts, source, say=lambda _line: None)
    sites_dir = root / "sites"
    nodes: dict[str, dict[str, RunConfigValue]] = {
        site: deployed_node_config(sites_dir, site, source.class_names, 10.0)  # consents to plain mode too
        for site in ledgers
    }
    with LocalDeployment(root / "flwr", nodes) as dep:
        tags = dep.tags
        yield Hospitals(dep, root, ledgers, source.class_names)
    leftovers = {tag: find_tagged_pids(tag) for tag in tags}
    assert all(not pids for pids in leftovers.values()), f"Flower processes outlived the deployment: {leftovers}"


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_medsynth_three_hospitals_on_the_deployment_engine(hospitals: Hospitals, secure: bool) -> None:
    from simulation.runner import forget_privacy_history, project_dir

    dep = hospitals.deployment
    rounds = ROUNDS if secure else 1  # two show the secure key set-up runs once per run; plain needs one
    for ledger in hospitals.ledgers.values():  # a fresh consortium: each mode starts with the full budget
        forget_privacy_history(ledger)
    out = hospitals.root / ("out-secure" if secure else "out-plain")
    run_config: dict[str, RunConfigValue] = {
        "num-server-rounds": rounds,
        "min-nodes": 3,
        "output-dir": str(out),
        "data.class-names": ",".join(hospitals.class_names),
        "train.local-steps": LOCAL_STEPS,
        "train.batch-size": 4,
        "model.g-width": 16,
        "model.d-width": 16,
        "secure-aggregation": secure,
        "warm-start.budget-share": 0.0,
        "round-timeout": 120.0,
        "wait-nodes-timeout": 30.0,
    }
    result = run_app(project_dir(), dep, run_config=run_config, log_path=out / "run.log", timeout_s=300)

    assert result.status == "finished:completed"
    state = json.loads((out / "server_state.json").read_text())
    assert state["finished"] is True
    assert state["secure_aggregation"] is secure
    assert [r["round"] for r in state["rounds"]] == list(range(1, rounds + 1))
    for record in state["rounds"]:
        assert record["sites_trained"] == sorted(dep.sites), record
        assert record["failures"] == [], record
        assert set(record["costs"]) == set(dep.sites)
        assert all(c["bytes_up"] > 0 for c in record["costs"].values())
        if secure:
            assert record["secure"]["dead"] == []
            assert all(set(c) == {"bytes_up", "received"} for c in record["costs"].values())  # no timings sent
    if secure:  # the hospitals' own audit logs hold their protocol CPU time
        cpu = cpu_per_round(hospitals.ledgers, result.run_id, training=False)
        assert all(cpu[site].get(r, 0.0) > 0 for site in dep.sites for r in range(1, rounds + 1)), cpu

    for site, ledger_path in hospitals.ledgers.items():
        history = json.loads(ledger_path.read_text())["history"]
        assert [(e["run"], e["round"], e["steps"]) for e in history] == [
            (result.run_id, r, LOCAL_STEPS) for r in range(1, rounds + 1)
        ], site

    for site in dep.sites:
        messages = dep.received_messages(site, result.run_id)
        trains = [m.group for m in messages if m.message_type == "train"]
        assert trains == [str(r) for r in range(1, rounds + 1)], (site, messages)
        unmasks = [m.group for m in messages if m.message_type.endswith("unmask")]
        assert unmasks == (trains if secure else []), (site, messages)
        masks = [m.group for m in messages if m.message_type.endswith("mask") and "unmask" not in m.message_type]
        keys = [m.message_type for m in messages if m.message_type.endswith(("secagg_keys", "secagg_share"))]
        # a mask request and a key set-up in round 1 only: each later round's session is set up
        # with the round before, and its train request asks for the masked update at once
        assert masks == (trains[:1] if secure else []), (site, messages)
        assert keys == (["train.secagg_keys", "train.secagg_share"] if secure else []), (site, messages)
        setup = [m for m in messages if m.group.startswith("setup-")]
        assert len(setup) == (2 if secure else 0), (site, messages)  # key adverts, then shares: once per run
