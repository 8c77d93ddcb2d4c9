"""server.toml and node.toml: what loads, and each refusal with the key it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w

from client.daemon import RuntimePortInUse
from client.node_config import NodeDeployConfig
from common.certs import (
    build_roster,
    create_ca,
    create_node_auth_keys,
    create_secagg_identity,
    issue_server_certificate,
)
from common.checkpoint import save_checkpoint
from common.checkpoint_model import CheckpointUnusable
from common.config import ConfigError
from common.models import build_models
from common.secagg import SiteIdentity, fingerprint
from common.weights import model_arrays
from medsynth.cli import main
from server.server_config import ServerDeployConfig, check_run_overrides
from tests.helpers import app_model

REPO = Path(__file__).resolve().parents[1]


def _server_doc(tmp: Path) -> dict[str, Any]:
    ca = create_ca(tmp / "ca")
    tls = issue_server_certificate(ca, ["fl.example.org"], tmp / "tls")
    auth = create_node_auth_keys(tmp / "h", "site-0")
    return {
        "superlink": {"host": "0.0.0.0", "port": 9093, "state-dir": str(tmp / "state")},
        "tls": {"ca-certificate": str(ca.public), "certificate": str(tls.public), "private-key": str(tls.private)},
        "hospitals": {"site-0": str(auth.public)},
        "run": {"num-server-rounds": 7, "dp.epsilon-budget": 8},
    }


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(doc))
    return path


def test_server_toml_loads_with_typed_run_overrides(tmp_path: Path) -> None:
    cfg = ServerDeployConfig.load(_write(tmp_path / "server.toml", _server_doc(tmp_path)), REPO)
    assert cfg.run_overrides == {"num-server-rounds": 7, "dp.epsilon-budget": 8.0}  # int accepted for a float
    assert cfg.local_host == "127.0.0.1" and cfg.database == tmp_path / "state" / "state.db"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["run"].update({"num-rounds": 3}), "unknown setting"),
        (lambda d: d["run"].update({"num-server-rounds": "3"}), "expected a int"),
        (lambda d: d["run"].update({"train.batch-size": 0}), "batch"),
        (lambda d: d["tls"].update({"certificate": "/nonexistent.pem"}), "no such file"),
        (lambda d: d.update({"hospitals": {}}), "empty"),
        (lambda d: d["superlink"].update({"port": 70000}), "port"),
    ],
)
def test_server_toml_refusals_name_the_key(tmp_path: Path, change: Any, message: str) -> None:
    doc = _server_doc(tmp_path)
    change(doc)
    with pytest.raises(ConfigError, match=message):
        ServerDeployConfig.load(_write(tmp_path / "server.toml", doc), REPO)


def test_server_listens_on_loopback_unless_host_is_set(tmp_path: Path) -> None:
    # prepare: no [superlink] host
    doc = _server_doc(tmp_path)
    del doc["superlink"]["host"]
    # act
    cfg = ServerDeployConfig.load(_write(tmp_path / "server.toml", doc), REPO)
    # assert: only this machine (the proxy beside it) reaches the SuperLink and its Control API
    assert cfg.host == "127.0.0.1" and cfg.local_host == "127.0.0.1"
    doc["superlink"]["host"] = "10.0.0.5"  # a deployment on a LAN says where, explicitly
    assert ServerDeployConfig.load(_write(tmp_path / "server.toml", doc), REPO).host == "10.0.0.5"


def test_server_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    doc = _server_doc(tmp_path)
    Path(doc["tls"]["private-key"]).chmod(0o640)
    with pytest.raises(ConfigError, match="0600"):
        ServerDeployConfig.load(_write(tmp_path / "server.toml", doc), REPO)


def test_run_overrides_keep_the_defaults_types() -> None:
    with pytest.raises(ConfigError, match="expected a bool"):
        check_run_overrides({"secure-aggregation": 1}, REPO)


def test_init_from_is_resolved_beside_server_toml_and_checked_before_anything_starts(tmp_path: Path) -> None:
    # prepare: a public checkpoint of the run's model beside server.toml, and one of other shapes
    netG, netD = build_models(app_model(), seed=7)
    good = save_checkpoint(tmp_path / "public", 4, model_arrays(netG, netD), ())
    netG, netD = build_models(app_model(latent_dim=32), seed=7)
    other = save_checkpoint(tmp_path / "other", 4, model_arrays(netG, netD), ())
    doc = _server_doc(tmp_path)
    doc["run"]["init-from"] = "public/round-0004.safetensors"
    # act
    cfg = ServerDeployConfig.load(_write(tmp_path / "server.toml", doc), REPO)
    # assert: the ServerApp, which runs in another folder, gets the absolute path
    assert cfg.run_overrides["init-from"] == str(good)
    assert cfg.run_config().federation.init_from == str(good)
    for path, message in ((str(other), "latent 32.*does not match this run's.*latent 64"),
                          ("missing.safetensors", "no such file")):
        doc["run"]["init-from"] = path
        with pytest.raises(CheckpointUnusable, match=r"^\[run\] init-from = .*" + message):
            ServerDeployConfig.load(_write(tmp_path / "server.toml", doc), REPO)


AGREED_APP = "ab" * 32  # stands for the SHA-256 of the app bundle a hospital agreed to run


def _node_doc(tmp: Path, site: str = "site-0") -> dict[str, Any]:
    ca = create_ca(tmp / "ca")
    auth = create_node_auth_keys(tmp / "k", site)
    secagg = create_secagg_identity(tmp / "k", site)
    roster = build_roster([secagg.public], tmp / "roster.json")
    (tmp / "dicom").mkdir()
    return {
        "node": {"site-id": site, "superlink": "fl.example.org:443", "data-dir": str(tmp / "dicom"),
                 "state-dir": str(tmp / "state"), "epsilon-budget": 10.0},
        "tls": {"ca-certificate": str(ca.public)},
        "keys": {"auth-private-key": str(auth.private), "signing-key-path": str(secagg.private),
                 "roster-path": str(tmp / "roster.json")},
        "prepare": {"class-names": "normal,lesion"},
        "consortium": {"members": roster.fingerprints()},
        "apps": {"allowed-fab-sha256": [AGREED_APP]},
    }


def test_node_toml_loads_and_becomes_the_flower_node_config(tmp_path: Path) -> None:
    cfg = NodeDeployConfig.load(_write(tmp_path / "node.toml", _node_doc(tmp_path)))
    node_config = cfg.flower_node_config()
    assert node_config["site-id"] == "site-0" and node_config["epsilon-budget"] == 10.0
    assert node_config["audit-path"] == str(tmp_path / "state" / "audit.jsonl")
    assert node_config["allow-plain-aggregation"] is False
    assert (node_config["delta"], node_config["accountant"], node_config["min-participants"]) == (1e-5, "prv", 3)
    assert node_config["class-names"] == "normal,lesion"
    assert node_config["min-neighbours"] == 0  # by default only the complete secure-aggregation graph
    own = SiteIdentity.load(cfg.signing_key_path, "site-0").public_key()
    assert node_config["members"] == f"site-0={fingerprint(own)}"
    assert (cfg.superlink_host, cfg.superlink_port) == ("fl.example.org", 443)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d, t: d["node"].update({"insecure": True}), "only over TLS"),
        (lambda d, t: d["node"].update({"state-path": str(t / "old")}), r"\[node\] state-path is now state-dir"),
        (lambda d, t: d["keys"].update({"roster": str(t / "roster.json")}), r"\[keys\] roster is now roster-path"),
        (lambda d, t: d["node"].update({"stat-dir": str(t / "typo")}), r"\[node\] stat-dir is not a setting"),
        (lambda d, t: d.update({"run": {}}), r"\[run\] is not a node.toml table"),
        (lambda d, t: d["prepare"].update({"image-size": 48}), r"\[prepare\] image-size = 48"),
        (lambda d, t: d["node"].pop("epsilon-budget"), "epsilon-budget"),
        (lambda d, t: d["node"].update({"epsilon-budget": float("inf")}), "epsilon-budget"),
        (lambda d, t: d["node"].update({"superlink": "fl.example.org"}), "host:port"),
        (lambda d, t: d["node"].update({"data-dir": str(t / "nope")}), "no such folder"),
        (lambda d, t: d["node"].update({"site-id": "site-9"}), "no entry for 'site-9'"),
        (lambda d, t: d["tls"].update({"ca-certificate": d["keys"]["roster-path"]}), "not a readable PEM"),
        (lambda d, t: d.update({"apps": {"allowed-fab-sha256": ["abc"]}}), "64-hex-digit"),
        (lambda d, t: Path(d["keys"]["auth-private-key"]).chmod(0o644), "0600"),
        (lambda d, t: d.pop("consortium"), r"\[consortium.members\] is required"),
        (lambda d, t: d["consortium"].update({"min-participants": 2}), "min-participants"),
        (lambda d, t: d["consortium"].update({"min-neighbours": 2}), r"\[consortium\] min-neighbours = 2"),
        (lambda d, t: d["node"].update({"delta": 1.5}), r"\[node\] delta = 1.5"),
        (lambda d, t: d["node"].update({"accountant": "gdp"}), "accountant"),
        (lambda d, t: d["prepare"].update({"class-names": ""}), "class-names is required"),
        (lambda d, t: d["consortium"]["members"].update({"site-1": "ab" * 32}), "pinned but absent"),
        (lambda d, t: d["consortium"]["members"].update({"site-0": "ab" * 32}), "must pin this hospital"),
        (lambda d, t: d["node"].update({"max-noise-multiplier": 0}), r"\[node\] max-noise-multiplier = 0"),
        (lambda d, t: d["node"].update({"max-epsilon-per-run": "2"}), r"\[node\] max-epsilon-per-run = '2'"),
        (lambda d, t: d["node"].update({"runtime-port": 70000}), r"\[node\] runtime-port = 70000"),
        (lambda d, t: d["node"].update({"site-id": "site-7"}), "roster built from your site-7.secagg.json"),
    ],
)
def test_node_toml_refusals_name_the_problem(tmp_path: Path, change: Any, message: str) -> None:
    doc = _node_doc(tmp_path)
    change(doc, tmp_path)
    with pytest.raises(ConfigError, match=message):
        NodeDeployConfig.load(_write(tmp_path / "node.toml", doc))


@pytest.mark.parametrize(
    "apps",
    [None, {"allowed-fab-sha256": []}, {"allowed-fab-sha256": [], "any-app-may-run": False}],
    ids=["no-apps-table", "empty-list", "empty-list-and-false"],
)
def test_node_without_an_app_allow_list_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], apps: dict[str, Any] | None
) -> None:
    # prepare
    doc = _node_doc(tmp_path)
    doc.pop("apps")
    if apps is not None:
        doc["apps"] = apps
    path = _write(tmp_path / "node.toml", doc)
    # act
    with pytest.raises(ConfigError) as refused:
        NodeDeployConfig.load(path)
    code = main(["node", "start", "--config", str(path)])
    # assert: the message says how to fix it both ways; the CLI exits 2 (systemd does not restart)
    assert "allowed-fab-sha256 is empty" in str(refused.value)
    assert "medsynth server fab-hash" in str(refused.value) and "any-app-may-run = true" in str(refused.value)
    assert code == 2 and "allowed-fab-sha256 is empty" in capsys.readouterr().err


def test_node_runs_any_app_only_when_node_toml_says_so_in_words(tmp_path: Path) -> None:
    # prepare
    listed_doc = _node_doc(tmp_path)
    any_app_doc = {**listed_doc, "apps": {"allowed-fab-sha256": [], "any-app-may-run": True}}
    # act
    listed = NodeDeployConfig.load(_write(tmp_path / "listed.toml", listed_doc))
    any_app = NodeDeployConfig.load(_write(tmp_path / "any-app.toml", any_app_doc))
    # assert
    assert listed.allowed_fabs == (AGREED_APP,) and listed.any_app_may_run is False
    assert any_app.allowed_fabs == () and any_app.any_app_may_run is True


@pytest.mark.parametrize(
    ("apps", "message"),
    [
        ({"allowed-fab-sha256": [AGREED_APP], "any-app-may-run": True}, "contradicts"),
        ({"allowed-fab-sha256": [], "any-app-may-run": "yes"}, "expected true or false"),
    ],
)
def test_node_app_opt_in_must_be_a_bool_and_not_contradict_the_list(
    tmp_path: Path, apps: dict[str, Any], message: str
) -> None:
    doc = _node_doc(tmp_path)
    doc["apps"] = apps
    with pytest.raises(ConfigError, match=message):
        NodeDeployConfig.load(_write(tmp_path / "node.toml", doc))


def test_node_toml_caps_and_port_default_and_reach_the_clientapp(tmp_path: Path) -> None:
    # prepare: no caps and no port written; then written
    doc = _node_doc(tmp_path)
    default = NodeDeployConfig.load(_write(tmp_path / "default.toml", doc))
    doc["node"].update({"max-epsilon-per-run": 2, "max-noise-multiplier": 8.5, "runtime-port": 9194})
    written = NodeDeployConfig.load(_write(tmp_path / "written.toml", doc))
    # assert: by default one run may spend the whole budget, σ above 10 is refused, the port is 9094;
    # the caps travel to the ClientApp (the SiteConfig it builds), the port does not (the daemon's)
    assert (default.max_epsilon_per_run, default.max_noise_multiplier, default.runtime_port) == (10.0, 10.0, 9094)
    assert (written.max_epsilon_per_run, written.max_noise_multiplier, written.runtime_port) == (2.0, 8.5, 9194)
    from common.config import RunConfig, SiteConfig, app_defaults

    site = SiteConfig.from_flower(written.flower_node_config(), RunConfig.from_flower(app_defaults()))
    assert (site.max_epsilon_per_run, site.max_noise_multiplier) == (2.0, 8.5)


def test_node_toml_paths_are_resolved_without_dot_dot(tmp_path: Path) -> None:
    # prepare: node.toml in site-0/etc, state named as site-0/etc/../state
    doc = _node_doc(tmp_path)
    etc = tmp_path / "site-0" / "etc"
    etc.mkdir(parents=True)
    doc["node"]["state-dir"] = "../state"
    # act
    cfg = NodeDeployConfig.load(_write(etc / "node.toml", doc))
    # assert: printed and used as site-0/state
    assert cfg.state_dir == tmp_path / "site-0" / "state" and ".." not in str(cfg.ledger_path)


def test_a_runtime_port_in_use_stops_node_start_at_once_naming_port_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    # prepare: another program listens on the port node.toml names
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        doc = _node_doc(tmp_path)
        doc["node"]["runtime-port"] = port
        path = _write(tmp_path / "node.toml", doc)
        # act
        code = main(["node", "start", "--config", str(path)])
    # assert: exit 2 (systemd does not restart it), one line naming the port and the key; nothing started
    err = capsys.readouterr().err.strip()
    assert code == 2 and RuntimePortInUse.exit_code == 2
    assert len(err.splitlines()) == 1 and f"runtime-port = {port} is already in use" in err
    assert "set [node] runtime-port in node.toml" in err
    assert not (tmp_path / "state" / "daemon.json").exists()
