"""The deployment kit stays valid and mirrors the commands the tests run.

Docker cannot run here, so the container and compose files are checked for what can be checked
without it: the paths they copy exist, their entry points parse as ``medsynth`` commands, the
build context leaves secrets and state out, the compose files publish no port on the hospital
side, mount data read-only and restart as the exit codes ask (as far as compose can), the proxy
exposes only the Fleet API with a body cap wherever the SuperLink runs, the systemd units pass
``systemd-analyze verify`` (when it is installed) and restart on status 1 only, and the example
TOML files load. ``deploy/README.md`` is the document a person follows: every ``medsynth``
command in it is run by the loopback deployment test or named in its "what was exercised"
section.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
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


def _render_template(text: str, env: dict[str, str]) -> str:
    """What nginx's image (envsubst of the defined variables) and the README's envsubst make of it."""
    for name, value in env.items():
        text = text.replace("${" + name + "}", value).replace("$" + name, value)
    return text


def _compose_proxy_address() -> str:
    server = yaml.safe_load((DEPLOY / "compose.server.yml").read_text())
    return str(server["services"]["proxy"]["environment"]["SUPERLINK_ADDRESS"])


@pytest.mark.parametrize("where", ["compose", "host"])
def test_proxy_exposes_only_the_fleet_api_of_the_superlink_and_caps_the_body(where: str) -> None:
    template = (DEPLOY / "proxy" / "nginx.conf").read_text()
    address = _compose_proxy_address() if where == "compose" else "127.0.0.1:9093"  # the systemd units' SuperLink
    conf = _render_template(template, {"SUPERLINK_ADDRESS": address})
    assert "${" not in conf, "a template variable nobody sets"
    upstreams = dict(re.findall(r"upstream\s+(\S+)\s*\{\s*server\s+(\S+);\s*\}", conf))
    assert upstreams == {"superlink": address}
    locations = re.findall(r"location\s+(\S+)\s*\{([^}]*)\}", conf)
    proxied = {path: re.search(r"proxy_pass\s+(\S+);", body) for path, body in locations if "proxy_pass" in body}
    assert list(proxied) == ["/v1/fleet/"]
    target = proxied["/v1/fleet/"]
    assert target is not None and target.group(1) == "https://superlink"  # TLS to the upstream above
    assert "return 404" in dict(locations)["/"]
    cap = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert cap is not None and 1 <= int(cap.group(1)) <= 64


def test_compose_gives_the_proxy_the_superlinks_service_and_port() -> None:
    server = yaml.safe_load((DEPLOY / "compose.server.yml").read_text())
    host, _, port = _compose_proxy_address().partition(":")
    assert host in server["services"] and port in server["services"][host]["expose"]
    mounts = server["services"]["proxy"]["volumes"]
    assert "./proxy/nginx.conf:/etc/nginx/templates/default.conf.template:ro" in mounts  # rendered at start


UNITS = ["medsynth-node.service", "medsynth-server.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_verify(unit: str) -> None:
    done = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "systemd" / unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if line.strip() and "/opt/medsynth/.venv/bin/medsynth is not executable" not in line]
    assert problems == []


def _unit_settings(unit: str) -> dict[str, list[str]]:
    """``[Service]`` settings of a unit file, each key's values in order (systemd allows repeats)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in (DEPLOY / "systemd" / unit).read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _systemd_restarts(settings: dict[str, list[str]], status: int) -> bool:
    """Whether systemd restarts a service that exited with ``status`` (``Restart=on-failure``: a
    status other than 0 and the SuccessExitStatus= ones, unless RestartPreventExitStatus= names it)."""
    assert settings["Restart"] == ["on-failure"], "this model covers Restart=on-failure only"
    success = {0} | {int(v) for values in settings.get("SuccessExitStatus", []) for v in values.split()}
    prevented = {int(v) for values in settings.get("RestartPreventExitStatus", []) for v in values.split()}
    return status not in success and status not in prevented


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_restarts_follow_the_exit_codes(unit: str) -> None:
    settings = _unit_settings(unit)
    # 1 restartable (crash, hospitals late); 0 finished, 2 fix the configuration, 130 interrupted
    assert {status: _systemd_restarts(settings, status) for status in (0, 1, 2, 130)} == {
        0: False, 1: True, 2: False, 130: False}
    assert settings["User"] == ["medsynth"] and settings["ProtectSystem"] == ["strict"]


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_name_no_site_specific_path(unit: str) -> None:
    # systemd does not expand variables in *Paths=; a path that does not exist stops the unit, so
    # the units name only what they create (state) or need anyway (/etc/medsynth); the README has
    # the drop-in for the rest
    settings = _unit_settings(unit)
    named = {p for key in ("ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths")
             for values in settings.get(key, []) for p in values.split()}
    state = "/var/lib/" + settings["StateDirectory"][0]
    assert named <= {"/etc/medsynth", state}, named


def test_compose_restarts_are_capped_because_status_2_cannot_be_exempted() -> None:
    # compose's on-failure restarts on every non-zero status, 2 included: retries are capped so a
    # configuration error stops, and a crash (1) is still restarted a few times
    services = {**yaml.safe_load((DEPLOY / "compose.server.yml").read_text())["services"],
                **yaml.safe_load((DEPLOY / "compose.hospital.yml").read_text())["services"]}
    for name in ("superlink", "node"):
        policy = re.fullmatch(r"on-failure:(\d+)", services[name]["restart"])
        assert policy is not None and 1 <= int(policy.group(1)) <= 10, services[name]["restart"]
    assert services["proxy"]["restart"] == "unless-stopped"


# ------------------------------------------------------------------------ build context, secrets
def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored_by_docker(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative, /-separated) out of the build context: a pattern
    matches the path or a folder above it; ``**`` any number of folders, ``*`` within one name."""
    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "(?:/.*)?")
    return any(regex(p).fullmatch(path) for p in patterns if not p.startswith("!"))


def test_the_build_context_holds_the_sources_and_no_secret_state_or_environment() -> None:
    patterns = _dockerignore_patterns()
    assert not any(p.startswith("!") for p in patterns)  # no exception re-includes anything
    for secret in (".git/config", ".venv/bin/python", "deploy/secrets/node/site-0.auth.key",
                   "deploy/secrets/server/server.toml", "keys/site-0.secagg.key", "ca/ca.key", "tls/server.pem",
                   "operator/hospitals/site-1.auth.pub", "site-0.secagg.json", "roster.json",
                   "medsynth-output/demo/sites/site-0/ledger.json", "state/ledger.json", "state/audit.jsonl",
                   "state/salt.bin", "server-state/state.db", "rehearsal/dicom/site-0/normal/a.dcm",
                   "common/__pycache__/x.cpython-311.pyc", "medsynth.egg-info/PKG-INFO"):
        assert _ignored_by_docker(secret, patterns), f"{secret} would be sent to the Docker daemon"
    copied = {src for name in ("Dockerfile.server", "Dockerfile.node") for src in _copied((DEPLOY / name).read_text())}
    tracked = subprocess.run(["git", "ls-files", "--", *sorted(copied)], cwd=REPO, capture_output=True, text=True,
                             timeout=60, check=False).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout: cannot list the copied sources")
    left_out = [f for f in tracked if _ignored_by_docker(f, patterns)]
    assert left_out == [], "the images copy these, but .dockerignore leaves them out"


def test_deploy_secrets_is_git_ignored() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("deploy/secrets/node/site-0.auth.key", "deploy/secrets/server/server.toml"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, timeout=60, check=False)
        assert done.returncode == 0, f"{path} is not git-ignored"


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
        max_epsilon_per_run=10.0, max_noise_multiplier=10.0, runtime_port=9094, denoise="none",
    )
    node_cmd = NodeDaemon(node_cfg).supernode_command()
    assert "--root-certificates" in node_cmd and "--auth-supernode-private-key" in node_cmd
    assert "--insecure" not in node_cmd and "--allow-runtime-dependency-installation" not in node_cmd
    assert node_cmd[node_cmd.index("--host") + 1] == "127.0.0.1"
    readme = (DEPLOY / "README.md").read_text()
    for flag in ("--enable-supernode-auth", "--root-certificates", "--auth-supernode-private-key"):
        assert flag in readme


# --------------------------------------------------------------------------- deploy/README.md
README = DEPLOY / "README.md"
EXERCISED_HEADING = "## What was exercised here, and what was not"
#: The loopback deployment test and the consortium it builds: the commands they run are "run on loopback".
LOOPBACK_TESTS = (REPO / "tests" / "test_deploy_tls.py", REPO / "tests" / "consortium.py")

_FENCE = re.compile(r"^\s*```[^\n]*\n(.*?)^\s*```", re.M | re.S)


def _readme_parts() -> tuple[str, str]:
    """(the guide, its "what was exercised" section)."""
    text = README.read_text(encoding="utf-8")
    guide, found, section = text.partition(EXERCISED_HEADING)
    assert found, f"deploy/README.md has no {EXERCISED_HEADING!r} section"
    return guide, section


def _code_blocks(text: str) -> list[str]:
    return [block.replace("\\\n", " ") for block in _FENCE.findall(text)]


def _medsynth_lines(text: str) -> Iterator[list[str]]:
    """The arguments of every ``medsynth …`` in fenced code (comments cut) and in inline code."""
    lines = [line.split(" #", 1)[0].strip() for block in _code_blocks(text) for line in block.splitlines()]
    lines += re.findall(r"`([^`\n]+)`", _FENCE.sub("", text))
    for line in lines:
        if re.match(r"medsynth\s", line):
            yield shlex.split(line)[1:]


def _groups() -> set[str]:
    """Top-level commands that have sub-commands (``node``, ``server``, ``certs``)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {name for name, p in sub.choices.items()  # type: ignore[union-attr]
            if any(a.dest.endswith("command") for a in p._actions)}


def _command(args: list[str], groups: set[str]) -> tuple[str, ...] | None:
    """``("node", "start")``, ``("simulate",)``; None for a bare group (``medsynth certs``) or no command."""
    words = [a for a in args if not a.startswith("-")]
    if not words:
        return None
    if words[0] not in groups:
        return (words[0],)
    return (words[0], args[1]) if len(args) > 1 and args[0] == words[0] and not args[1].startswith("-") else None


def _run_on_loopback() -> set[tuple[str, ...]]:
    """Every ``medsynth`` command the loopback tests run: ``medsynth("node", "audit", …)`` calls and the
    argument lists of the daemons they spawn (``spawn(name, ["server", "start", …], …)``)."""
    groups, found = _groups(), set()
    for path in LOOPBACK_TESTS:
        for call in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)):
            name = call.func.id if isinstance(call.func, ast.Name) else ""
            args: list[ast.expr] = []
            if name == "medsynth":
                args = list(call.args)
            elif name == "spawn" and len(call.args) > 1 and isinstance(call.args[1], ast.List):
                args = list(call.args[1].elts)
            words = []
            for arg in args:
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    break
                words.append(arg.value)
            if (command := _command(words, groups)) is not None:
                found.add(command)
    return found


def test_every_medsynth_command_of_the_readme_is_run_on_loopback_or_said_not_to_be() -> None:
    guide, section = _readme_parts()
    groups = _groups()
    documented = {c for args in _medsynth_lines(guide) if (c := _command(args, groups)) is not None}
    named_elsewhere = {c for args in _medsynth_lines(section) if (c := _command(args, groups)) is not None}
    loopback = _run_on_loopback()
    assert {("server", "start"), ("node", "start"), ("certs", "node")} <= loopback, "the AST walk finds nothing"
    assert len(documented) >= 12, f"only {sorted(documented)}: the extraction no longer reads the README"
    unaccounted = sorted(" ".join(c) for c in documented - loopback - named_elsewhere)
    assert unaccounted == [], (f"deploy/README.md tells a person to run `medsynth {unaccounted}`, which the loopback "
                               f"test does not run: run it there or say so under {EXERCISED_HEADING!r}")


def _bash(text: str) -> str:
    return "\n".join(_code_blocks(text))


def test_the_readme_gives_key_ownership_drop_in_unregistering_and_rehearsal_as_commands() -> None:
    guide, _ = _readme_parts()
    commands = _bash(guide)
    # key ownership for the service users: commands, not only comments
    assert re.search(r"^sudo chown medsynth:medsynth \S+\.key", commands, re.M)
    assert re.search(r"^sudo chmod 0600 \S+\.key", commands, re.M)
    for uid, dockerfile in (("10001", "Dockerfile.server"), ("10002", "Dockerfile.node")):
        assert f"--uid {uid}" in (DEPLOY / dockerfile).read_text()
        assert re.search(rf"^sudo chown {uid}:{uid} deploy/secrets/\S+\.key", commands, re.M)
    # the data path is a drop-in, not a line of the unit; the proxy is rendered for a host
    assert "sudo systemctl edit medsynth-node" in commands
    assert "SUPERLINK_ADDRESS=127.0.0.1:9093 envsubst" in commands
    # removing a hospital and rotating its keys: Flower's unregister, with the server's Flower home
    assert re.search(r"FLWR_HOME=/var/lib/medsynth-server/flwr-home\s+\S*flwr supernode unregister NODE_ID "
                     r"medsynth-server", commands)
    # rehearse first: written sites, state of its own, deleted afterwards
    rehearsal = guide.partition("## Rehearse first")[2].partition("\n## ")[0]
    assert "medsynth simulate --write-sites" in rehearsal and "state-dir" in rehearsal
    assert re.search(r"^\s*rm -r /srv/rehearsal$", _bash(rehearsal), re.M)
    assert "deploy/secrets/" in guide
