"""``common.flower``: command lines, config strings, environment, health wait and stop.

No Flower process is started here (``tests/test_superlink.py`` and ``tests/test_deployment.py``
run real ones); the lifecycle is exercised on small stand-in processes instead: a daemon that
exits, one that never answers, one that serves ``/health``, and process trees that leave
their session or ignore SIGTERM.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import ConfigError
from common.flower import (
    DaemonExited,
    FlowerEnv,
    HealthTimeout,
    ServerTls,
    app_dir,
    check_app_folder,
    find_tagged_pids,
    format_run_config,
    free_port,
    kill_now,
    node_config_argument,
    spawn,
    superlink_command,
    supernode_command,
    terminate_then_kill,
    wait_healthy,
)
from common.flower.fab import app_files, build_fab, stage_app

REPO = Path(__file__).resolve().parents[1]

#: A daemon that starts a grandchild in a session of its own (as the SuperLink does with its
#: SuperExec), prints its PID, then sleeps; with argv[1] == "stubborn" both ignore SIGTERM.
TREE = """
import signal, subprocess, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\\n"
                          "if sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                          "time.sleep(600)", sys.argv[1]], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_format_run_config_quotes_strings() -> None:
    rendered = format_run_config({"a": 1, "b": 0.5, "c": True, "d": "x y", "e": 'say "hi"'})
    assert rendered == 'a=1 b=0.5 c=true d="x y" e=\'say "hi"\''
    with pytest.raises(ValueError, match="both quote kinds"):
        format_run_config({"s": 'it\'s "x"'})
    with pytest.raises(TypeError):
        format_run_config({"l": [1, 2]})  # type: ignore[dict-item]


def test_flower_env_isolates_subprocesses(tmp_path: Path) -> None:
    env = FlowerEnv(flwr_home=tmp_path, port=12345, ray_tmpdir=Path("/tmp/x"), tag="t")
    environ = env.environ({"RAY_ADDRESS": "10.0.0.1:6379", "PATH": "/usr/bin"})
    assert "RAY_ADDRESS" not in environ
    assert environ["FLWR_HOME"] == str(tmp_path)
    assert environ["FLWR_TELEMETRY_ENABLED"] == "0"
    assert environ["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert environ["RAY_TMPDIR"] == "/tmp/x"
    with pytest.raises(ValueError, match="AF_UNIX"):
        FlowerEnv(flwr_home=tmp_path, port=1, ray_tmpdir=tmp_path / ("x" * 40))


def test_flower_env_sets_ray_variables_only_for_the_simulation_engine(tmp_path: Path) -> None:
    environ = FlowerEnv(flwr_home=tmp_path, port=12345, tag="t").environ({"PATH": "/usr/bin"})
    assert not {k for k in environ if k.startswith("RAY_")}
    assert environ["MEDSYNTH_SUPERLINK_TAG"] == "t"
    assert environ["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_node_config_argument_inline_and_toml_fallback(tmp_path: Path) -> None:
    assert node_config_argument({}, tmp_path / "n.toml") is None
    inline = node_config_argument({"site-id": "a b", "epsilon-budget": 2.5, "n": 3, "on": True}, tmp_path / "n.toml")
    assert inline == 'site-id="a b" epsilon-budget=2.5 n=3 on=true'
    assert not (tmp_path / "n.toml").exists()
    # flwr's inline parser cannot take both quote kinds: the config goes to a TOML file instead.
    path = node_config_argument({"odd": "say \"hi\" it's", "n": 1}, tmp_path / "n.toml")
    assert path == str(tmp_path / "n.toml")
    assert 'n = 1' in (tmp_path / "n.toml").read_text()
    with pytest.raises(ValueError, match="invalid"):
        node_config_argument({"bad key": 1}, tmp_path / "m.toml")
    with pytest.raises(TypeError):
        node_config_argument({"k": [1]}, tmp_path / "m.toml")  # type: ignore[dict-item]


def test_superlink_command_plain_simulation_and_tls_with_node_auth(tmp_path: Path) -> None:
    plain = superlink_command(host="127.0.0.1", port=9000, simulation=True)
    assert plain[0].endswith("flower-superlink")
    assert plain[1:] == ["--simulation", "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
                         "--port", "9000", "--disable-runtime-dependency-installation"]
    tls = ServerTls(Path("ca.pem"), Path("server.pem"), Path("server.key"))
    secured = superlink_command(host="0.0.0.0", port=9093, tls=tls, node_auth=True, database=tmp_path / "s.db")
    assert "--insecure" not in secured and "--simulation" not in secured
    for flag, value in (("--ssl-ca-certfile", "ca.pem"), ("--ssl-certfile", "server.pem"),
                        ("--ssl-keyfile", "server.key"), ("--database", str(tmp_path / "s.db"))):
        assert secured[secured.index(flag) + 1] == value
    assert "--enable-supernode-auth" in secured
    with pytest.raises(ValueError, match="needs TLS"):
        superlink_command(host="127.0.0.1", port=9000, node_auth=True)


def test_supernode_command_listens_on_loopback_and_needs_tls_for_auth(tmp_path: Path) -> None:
    plain = supernode_command(superlink="127.0.0.1:9000", runtime_port=9100, node_config={},
                              node_config_file=tmp_path / "n.toml")
    assert plain[1:] == ["--superlink", "127.0.0.1:9000", "--insecure", "--isolation", "subprocess",
                         "--host", "127.0.0.1", "--port", "9100"]
    secured = supernode_command(superlink="fl.example:443", runtime_port=9094, node_config={"site-id": "a"},
                                node_config_file=tmp_path / "n.toml", root_certificates=Path("ca.pem"),
                                auth_private_key=Path("a.key"))
    assert "--insecure" not in secured
    assert secured[secured.index("--root-certificates") + 1] == "ca.pem"
    assert secured[secured.index("--auth-supernode-private-key") + 1] == "a.key"
    assert secured[secured.index("--node-config") + 1] == 'site-id="a"'
    with pytest.raises(ValueError, match="needs TLS"):
        supernode_command(superlink="x:1", runtime_port=1, node_config={}, node_config_file=tmp_path / "n.toml",
                          auth_private_key=Path("a.key"))


def test_app_dir_is_this_checkout() -> None:
    assert app_dir() == REPO
    assert (app_dir() / "pyproject.toml").is_file()


@pytest.mark.parametrize("name", ["tmp.O8fdBcGmah", "medsynth_v2", "2medsynth", "m" * 33])
def test_a_checkout_flower_would_refuse_by_name_is_staged_under_one_it_accepts(tmp_path: Path, name: str) -> None:
    # prepare: a checkout whose folder name `flwr build` refuses (e.g. `git clone . $(mktemp -d)`)
    from flwr.cli.build import build_fab_from_disk
    from flwr.supercore.utils import is_valid_name

    root = tmp_path / name
    for rel, path in app_files(REPO).items():  # the files the bundle takes, enough for `flwr build`
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / rel)
    assert not is_valid_name(root.name)[0]
    # act
    assert check_app_folder(root) == root
    staged = stage_app(root, tmp_path / "staged")
    # assert: Flower accepts the staged folder's name and builds the checkout's FAB of it
    assert is_valid_name(staged.name)[0]
    fabs = (build_fab_from_disk(staged), build_fab(root), build_fab(REPO))
    digests = {hashlib.sha256(fab).hexdigest() for fab in fabs}
    assert len(digests) == 1


def test_a_folder_without_the_project_is_a_config_error_that_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="make install"):
        check_app_folder(tmp_path)


def _env(tmp_path: Path, port: int = 1) -> FlowerEnv:
    return FlowerEnv(flwr_home=tmp_path, port=port)


def test_wait_healthy_reports_an_exit_with_the_log_tail(tmp_path: Path) -> None:
    env = _env(tmp_path)
    proc = spawn([sys.executable, "-c", "print('address already in use'); raise SystemExit(3)"], env.environ(),
                 tmp_path / "d.log", cwd=tmp_path)
    with pytest.raises(DaemonExited) as exited:
        wait_healthy(proc, env, log_path=tmp_path / "d.log", timeout_s=30.0)
    assert exited.value.returncode == 3
    assert "address already in use" in exited.value.log_tail
    assert find_tagged_pids(env.tag) == set()


def test_wait_healthy_times_out_then_stops_cleanly(tmp_path: Path) -> None:
    env = _env(tmp_path, free_port())  # nothing listens there
    proc = spawn([sys.executable, "-c", "import time; time.sleep(600)"], env.environ(), tmp_path / "d.log",
                 cwd=tmp_path)
    try:
        with pytest.raises(HealthTimeout, match="did not answer"):
            wait_healthy(proc, env, log_path=tmp_path / "d.log", timeout_s=1.0)
    finally:
        assert terminate_then_kill([proc], [env.tag], grace_s=5.0) == set()
    assert proc.returncode is not None


def test_wait_healthy_returns_once_health_answers(tmp_path: Path) -> None:
    env = _env(tmp_path, free_port())
    (tmp_path / "health").write_text("ok")  # http.server serves it as GET /health -> 200
    proc = spawn([sys.executable, "-m", "http.server", str(env.port), "--bind", env.host], env.environ(),
                 tmp_path / "d.log", cwd=tmp_path)
    try:
        wait_healthy(proc, env, log_path=tmp_path / "d.log", timeout_s=30.0)
        assert proc.poll() is None
    finally:
        assert terminate_then_kill([proc], [env.tag], grace_s=5.0) == set()


def _start_tree(tmp_path: Path, mode: str) -> tuple[FlowerEnv, subprocess.Popen[bytes], int]:
    env = _env(tmp_path)
    log = tmp_path / f"{mode}.log"
    proc = spawn([sys.executable, "-c", TREE, mode], env.environ(), log, cwd=tmp_path)
    deadline = time.monotonic() + 30.0
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(log.read_text().split()[0])
    assert find_tagged_pids(env.tag) == {proc.pid, grandchild}
    return env, proc, grandchild


@pytest.mark.parametrize("mode", ["polite", "stubborn"])
def test_terminate_then_kill_reaches_other_sessions_and_ignorers_of_sigterm(tmp_path: Path, mode: str) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # not tagged
    try:
        env, proc, _ = _start_tree(tmp_path, mode)
        grace_s = 30.0 if mode == "polite" else 1.0
        started = time.monotonic()
        assert terminate_then_kill([proc], [env.tag], grace_s=grace_s) == set()
        assert find_tagged_pids(env.tag) == set()
        assert proc.returncode is not None
        if mode == "polite":  # SIGTERM was enough: the grace period was not waited out
            assert time.monotonic() - started < grace_s / 3
        assert bystander.poll() is None  # only what we started, by tag
    finally:
        bystander.kill()
        bystander.wait()


def test_kill_now_is_immediate(tmp_path: Path) -> None:
    env, proc, _ = _start_tree(tmp_path, "stubborn")
    assert kill_now([proc, None], [env.tag]) == set()
    assert proc.returncode is not None and proc.returncode < 0
