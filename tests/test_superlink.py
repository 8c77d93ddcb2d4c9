"""End-to-end check of ``simulation.superlink``: a private SuperLink runs a toy Flower App.

The toy app (written below into ``tmp_path``) does 2 rounds of ``send_and_receive`` to
every virtual node; each ClientApp replies with the ``node_config`` it saw; the ServerApp
writes them to ``<output-dir>/result.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.flower import RunFailedError, find_tagged_pids, run_app
from simulation.superlink import LocalSuperLink

TOY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "toyapp"
version = "1.0.0"
description = "Toy app for tests/test_superlink.py"
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
fail = false
"""

TOY_SERVER = '''\
"""Toy ServerApp: wait for the nodes, 2 rounds, write what the nodes saw."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if bool(cfg["fail"]):
        raise RuntimeError("toy failure requested")
    # The simulation starts this thread before the virtual nodes are registered.
    want = int(cfg["min-nodes"])
    deadline = time.monotonic() + 60.0
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < want and time.monotonic() < deadline:
        time.sleep(0.2)
        node_ids = sorted(grid.get_node_ids())
    seen = {}
    for rnd in range(1, int(cfg["num-server-rounds"]) + 1):
        msgs = [
            Message(RecordDict({"cfg": ConfigRecord({"round": rnd})}), dst_node_id=n, message_type="train")
            for n in node_ids
        ]
        for reply in grid.send_and_receive(msgs):
            if reply.has_error():
                raise RuntimeError(f"reply error: {reply.error}")
            seen[str(reply.metadata.src_node_id)] = dict(reply.content["info"])
        print(f"round {rnd} done", flush=True)
    out = Path(str(cfg["output-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"node_ids": node_ids, "seen": seen}))
'''

TOY_CLIENT = '''\
"""Toy ClientApp: reply with the node_config this virtual node sees."""
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    info = ConfigRecord(
        {
            "partition-id": int(context.node_config["partition-id"]),
            "num-partitions": int(context.node_config["num-partitions"]),
            "round": int(msg.content["cfg"]["round"]),
        }
    )
    return Message(RecordDict({"info": info}), reply_to=msg)
'''


@pytest.fixture
def toy_app(tmp_path: Path) -> Path:
    """Write the toy Flower App into ``tmp_path/toyapp``."""
    app = tmp_path / "toyapp"
    (app / "toy").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TOY_PYPROJECT)
    (app / "toy" / "__init__.py").write_text("")
    (app / "toy" / "server.py").write_text(TOY_SERVER)
    (app / "toy" / "client.py").write_text(TOY_CLIENT)
    return app


def _cmdline(pid: int) -> str | None:
    """Command line of a live, non-zombie process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}:
            return None
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        return None


@pytest.mark.slow
def test_simulation_three_nodes_and_clean_shutdown(tmp_path: Path, toy_app: Path) -> None:
    out_dir = tmp_path / "out dir with 'quotes' and \"more\""
    seen_pids: set[int] = set()
    lines: list[str] = []

    with LocalSuperLink(tmp_path / "flwr") as link:
        superlink_pid, tag = link.pid, link.env.tag

        def on_line(line: str) -> None:
            lines.append(line)
            if "round 1 done" in line:  # mid-run: the Ray cluster is up
                seen_pids.update(link.owned_pids())

        result = run_app(
            toy_app,
            link,
            run_config={"output-dir": str(out_dir), "num-server-rounds": 2},
            num_supernodes=3,
            num_cpus_per_node=1,
            log_path=tmp_path / "run.log",
            timeout_s=240,
            on_line=on_line,
        )
        seen_pids.update(link.owned_pids())
        seen_cmdlines = {pid: _cmdline(pid) for pid in seen_pids}

        with pytest.raises(RunFailedError) as failed:
            run_app(
                toy_app,
                link,
                run_config={"fail": True, "output-dir": str(tmp_path / "unused")},
                num_supernodes=1,
                log_path=tmp_path / "fail.log",
                timeout_s=120,
            )
        assert failed.value.status == "finished:failed"
        assert "toy failure requested" in failed.value.log_tail

    assert result.status == "finished:completed"
    assert any("round 2 done" in line for line in lines)
    data = json.loads((out_dir / "result.json").read_text())
    assert len(set(data["node_ids"])) == 3
    assert {int(k) for k in data["seen"]} == set(data["node_ids"])
    assert {v["partition-id"] for v in data["seen"].values()} == {0, 1, 2}
    assert {v["num-partitions"] for v in data["seen"].values()} == {3}

    # The Ray cluster, flwr-simulation and SuperExec were seen, and none survived.
    assert superlink_pid in seen_pids
    assert len(seen_pids) >= 5, seen_cmdlines
    assert find_tagged_pids(tag) == set()
    survivors = {pid: cmd for pid, cmd in seen_cmdlines.items() if cmd is not None and _cmdline(pid) == cmd}
    assert survivors == {}
