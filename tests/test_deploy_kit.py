"""The deployment kit stays valid and mirrors the commands the tests run.

Docker cannot run here, so the container and compose files are checked for what can be checked
without it: the paths they copy exist, their entry points parse as ``medsynth`` commands, the
compose files publish no port on the hospital side and mount data read-only, the proxy exposes
only the Fleet API with a body cap, the systemd units pass ``systemd-analyze verify`` (when it is
installed) apart from the absent install path, and the example TOML files load.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from client.daemon import NodeDaemon
from client.node_config import NodeDeployConfig
from medsynth.cli import build_parser
from server.daemon import SuperLinkDaemon
from server.server_config import ServerDeployConfig, check_run_overrides

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


#: The command-line package the hospital image copies; it is written in parallel with this kit.
CLI_PACKAGE = "medsynth"


def _copied(text: str) -> list[str]:
    """Every source path of every ``COPY`` line (all but the last word, the destination)."""
    return [src for line in re.findall(r"^COPY (.+)$", text, flags=re.M) for src in line.split()[:-1]]


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.node"])
def test_dockerfiles_copy_existing_paths_run_as_non_root_and_start_medsynth(name: str) -> None:
    text = (DEPLOY / name).read_text()
    assert re.search(r"^USER medsynth$", text, flags=re.M)
    entry = re.search(r'^ENTRYPOINT \[(.*)\]$', text, flags=re.M)
    assert entry is not None
    argv = [a.strip().strip('"') for a in entry.group(1).split(",")]
    assert argv[0] == "medsynth"
    args = build_parser().parse_args(argv[1:])
    assert args.config == Path("/etc/medsynth") / ("server.toml" if "server" in name else "node.toml")
    missing = [src for src in _copied(text) if not (REPO / src).exists()]
    assert missing == [], f"{name} copies paths that do not exist"


def test_the_hospital_image_holds_only_the_node_side() -> None:
    copied = set(_copied((DEPLOY / "Dockerfile.node").read_text()))
    assert copied == {"pyproject.toml", "README.md", "common", "client", CLI_PACKAGE}


def test_compose_files_keep_the_hospital_outbound_only_and_data_read_only() -> None:
    hospital = yaml.safe_load((DEPLOY / "compose.hospital.yml").read_text())
    node = hospital["services"]["node"]
    assert "ports" not in node
    assert any(v.endswith(":/data/dicom:ro") for v in node["volumes"])
    assert any(v.endswith(":/etc/medsynth:ro") for v in node["volumes"])
    server = yaml.safe_load((DEPLOY / "compose.server.yml").read_text())
    assert "ports" not in server["services"]["superlink"]  # only the proxy is published
    assert server["services"]["proxy"]["ports"] == ["443:443"]


def test_proxy_exposes_only_the_fleet_api_and_caps_the_body() -> None:
    conf = (DEPLOY / "proxy" / "nginx.conf").read_text()
    locations = re.findall(r"location\s+(\S+)\s*\{([^}]*)\}", conf)
    proxied = [path for path, body in locations if "proxy_pass" in body]
    assert proxied == ["/v1/fleet/"]
    assert "return 404" in dict(locations)["/"]
    cap = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert cap is not None and 1 <= int(cap.group(1)) <= 64


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["medsynth-node.service", "medsynth-server.service"])
def test_systemd_units_verify(unit: str) -> None:
    done = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "systemd" / unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if line.strip() and "/opt/medsynth/.venv/bin/medsynth is not executable" not in line]
    assert problems == []
    text = (DEPLOY / "systemd" / unit).read_text()
    assert "RestartPreventExitStatus=2" in text and "User=medsynth" in text


def test_example_configs_use_only_known_keys() -> None:
    server = tomllib.loads((DEPLOY / "server.example.toml").read_text())
    check_run_overrides(server["run"], REPO)
    assert set(server) == {"superlink", "tls", "hospitals", "run"}
    node = tomllib.loads((DEPLOY / "node.example.toml").read_text())
    assert set(node) == {"node", "tls", "keys", "consortium", "prepare", "apps"}
    assert set(node["consortium"]) == {"min-participants", "members"}
    assert "insecure" not in node["node"] and "insecure" not in node["tls"]
    from client.node_config import NODE_TOML_KEYS

    assert all(set(body) <= NODE_TOML_KEYS[table] for table, body in node.items())
    assert {"max-epsilon-per-run", "max-noise-multiplier", "runtime-port"} <= set(node["node"])


def test_commands_the_kit_documents_are_the_ones_the_daemons_run(tmp_path: Path) -> None:
    # the README's flags are the daemons' own command lines: TLS, node auth, SQLite, no runtime installs
    server_cfg = ServerDeployConfig(
        host="0.0.0.0", port=9093, state_dir=tmp_path, ca_certificate=Path("/etc/medsynth/ca.pem"),
        certificate=Path("/etc/medsynth/server.pem"), private_key=Path("/etc/medsynth/server.key"),
        hospitals={}, run_overrides={}, app_dir=REPO,
    )
    cmd = SuperLinkDaemon(server_cfg).superlink_command()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--database",
                 "--disable-runtime-dependency-installation"):
        assert flag in cmd
    assert "--insecure" not in cmd
    node_cfg = NodeDeployConfig(
        site_id="site-0", superlink="fl.example:443", data_dir=tmp_path, state_dir=tmp_path,
        epsilon_budget=10.0, ca_certificate=Path("ca.pem"), auth_private_key=Path("a.key"),
        signing_key_path=Path("s.key"), roster_path=Path("roster.json"), allowed_fabs=(),
        class_names="normal,lesion", members=(("site-0", "ab" * 32),), delta=1e-5, accountant="prv",
        min_participants=3, image_size=32, allow_plain_aggregation=False, any_app_may_run=False,
        max_epsilon_per_run=10.0, max_noise_multiplier=10.0, runtime_port=9094,
    )
    node_cmd = NodeDaemon(node_cfg).supernode_command()
    assert "--root-certificates" in node_cmd and "--auth-supernode-private-key" in node_cmd
    assert "--insecure" not in node_cmd and "--allow-runtime-dependency-installation" not in node_cmd
    assert node_cmd[node_cmd.index("--host") + 1] == "127.0.0.1"
    readme = (DEPLOY / "README.md").read_text()
    for flag in ("--enable-supernode-auth", "--root-certificates", "--auth-supernode-private-key"):
        assert flag in readme
