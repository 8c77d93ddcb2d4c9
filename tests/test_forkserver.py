"""The ClientApp fork server (client.forkserver): same process, streams and exit status as Flower's
own ``flwr-clientapp``, one fresh process per message, nothing shared between them.

Each test plays the SuperNode with a small script started through ``launcher_command``, as
``medsynth node start`` starts ``flower-supernode``; the script runs our ``flwr-clientapp``
wrapper as Flower's SuperExec would. The real messages of a federation go through it in
tests/test_deployment.py and tests/test_deploy_tls.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client import forkserver
from client.fab_gate import ANY_APP_ENV
from client.forkserver import SOCKET_ENV, ForkServerError, check_nothing_of_ours, launcher_command, reseed_in_child
from client.forkserver import write_wrapper as write_clientapp_wrapper

READY = "medsynth fork server (pid "


def _as_supernode(tmp_path: Path, body: str, timeout_s: float = 120.0) -> tuple[dict[str, Any], str]:
    """Run ``body`` as the SuperNode of a fork server; returns what it printed (JSON) and its stderr.

    ``body`` sees ``wrapper`` (our flwr-clientapp), ``forkserver_pid()`` and ``children(pid)``,
    and fills the dict ``out``.
    """
    wrapper = write_clientapp_wrapper(tmp_path / "bin")
    script = tmp_path / "supernode.py"
    script.write_text(textwrap.dedent("""
        import json, os, signal, subprocess, sys, time
        wrapper = sys.argv[1]
        out = {}

        def children(pid):
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                return [int(p) for p in fh.read().split()]

        def forkserver_pid():
            (pid,) = children(os.getpid())
            return pid

        def wait(condition, what, timeout_s=60.0):
            deadline = time.monotonic() + timeout_s
            while not condition():
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out waiting for {what}")
                time.sleep(0.1)
        """) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n")
    env = {**os.environ, ANY_APP_ENV: "1"}
    done = subprocess.run(launcher_command([sys.executable, str(script), str(wrapper)]), env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_a_message_runs_in_a_child_of_the_fork_server_with_the_wrappers_streams_and_status(tmp_path: Path) -> None:
    # prepare / act: two "messages": one that succeeds (--help) and one Flower's parser refuses
    out, stderr = _as_supernode(tmp_path, """
        ok = subprocess.run([wrapper, "--help"], capture_output=True, text=True)
        bad = subprocess.run([wrapper, "--no-such-flag"], capture_output=True, text=True)
        out.update(ok=[ok.returncode, ok.stdout, ok.stderr], bad=[bad.returncode, bad.stdout, bad.stderr],
                   socket=os.environ.get("MEDSYNTH_CLIENTAPP_FORKSERVER"))
        """)
    # assert: Flower's own ClientApp answered through the fork server, on the wrapper's streams
    ok_code, ok_out, ok_err = out["ok"]
    bad_code, _, bad_err = out["bad"]
    assert ok_code == 0 and "--runtime-api-address" in ok_out and ok_err == ""
    assert bad_code == 2 and "flwr-clientapp: error: one of the arguments --token --token-file is required" in bad_err
    assert READY in stderr and "not reachable" not in ok_err + bad_err
    # the socket's folder is private, and it is gone once the SuperNode is
    socket_file = Path(str(out["socket"]))
    assert not socket_file.parent.exists()


def test_a_killed_wrapper_takes_its_clientapp_along_and_the_fork_server_follows_its_supernode(
        tmp_path: Path) -> None:
    # prepare: a ClientApp that waits for a SuperNode Runtime API that never answers
    out, _ = _as_supernode(tmp_path, """
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        fs = forkserver_pid()
        wait(lambda: os.path.exists(os.environ["MEDSYNTH_CLIENTAPP_FORKSERVER"]), "the socket")
        msg = subprocess.Popen([wrapper, "--runtime-api-address", f"127.0.0.1:{port}", "--token", "t", "--insecure"])
        wait(lambda: len(children(fs)) == 1, "the forked ClientApp", 120.0)
        (clientapp,) = children(fs)
        # act: the SuperExec's process for this message dies (SIGKILL)
        msg.kill()
        msg.wait()
        wait(lambda: children(fs) == [], "the ClientApp to go")
        out.update(forkserver=fs, clientapp=clientapp)
        """)
    # assert: the ClientApp was the fork server's child and went with its wrapper; the fork server
    # left when its SuperNode (the script) exited
    fs = int(str(out["forkserver"]))
    assert out["clientapp"] != fs
    deadline = time.monotonic() + 30
    while Path(f"/proc/{fs}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{fs}").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user (setuid)")
def test_another_local_user_cannot_reach_the_fork_server(tmp_path: Path) -> None:
    # act: a process of user `nobody` tries to hand the fork server a command
    out, _ = _as_supernode(tmp_path, """
        import socket
        path = os.environ["MEDSYNTH_CLIENTAPP_FORKSERVER"]
        wait(lambda: os.path.exists(path), "the socket")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.setgid(65534)
            os.setuid(65534)
            try:
                socket.socket(socket.AF_UNIX).connect(path)
                os.write(w, b"connected")
            except OSError as exc:
                os.write(w, type(exc).__name__.encode())
            os._exit(0)
        os.waitpid(pid, 0)
        out["nobody"] = os.read(r, 100).decode()
        """)
    # assert: refused by the folder's permissions (0700) before any request
    assert out["nobody"] == "PermissionError"


def test_without_a_fork_server_the_wrapper_runs_the_clientapp_itself_and_says_so(tmp_path: Path) -> None:
    # prepare: a wrapper whose fork server is gone
    wrapper = write_clientapp_wrapper(tmp_path / "bin")
    env = {**os.environ, ANY_APP_ENV: "1", SOCKET_ENV: str(tmp_path / "gone.sock")}
    # act
    done = subprocess.run([str(wrapper), "--help"], env=env, capture_output=True, text=True, timeout=120)
    # assert: the message still ran, and the log says why it was slow
    assert done.returncode == 0 and "--runtime-api-address" in done.stdout
    assert "fork server at" in done.stderr and "not reachable" in done.stderr


def test_without_the_allow_list_or_the_opt_in_nothing_runs(tmp_path: Path) -> None:
    wrapper = write_clientapp_wrapper(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if k not in (ANY_APP_ENV, "MEDSYNTH_ALLOWED_FABS", SOCKET_ENV)}
    done = subprocess.run([str(wrapper), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "would refuse every app" in done.stderr
    assert "--runtime-api-address" not in done.stdout


def _draw_in_children(reseed: bool) -> list[tuple[float, int]]:
    """One draw from torch's and NumPy's global generators in each of two forked children."""
    draws = []
    for _ in range(2):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            if reseed:
                reseed_in_child()
            os.write(w, json.dumps([torch.rand(1).item(), int(np.random.randint(0, 2**62))]).encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r) as fh:
            torch_draw, numpy_draw = json.loads(fh.read())
            draws.append((torch_draw, numpy_draw))
    return draws


def test_forked_clientapps_do_not_share_a_random_stream() -> None:
    # the attack: two messages' processes forked from one parent continue one "random" stream
    plain = _draw_in_children(reseed=False)
    assert plain[0][0] == plain[1][0]  # what a plain fork gives: torch's stream is shared
    # what the fork server's children do
    own = _draw_in_children(reseed=True)
    assert own[0][0] != own[1][0] and own[0][1] != own[1][1]


def test_a_forked_clientapp_imports_nothing_to_reach_its_supernode_or_to_train() -> None:
    # prepare: a fresh interpreter becomes a fork server as launch_supernode makes one (this test
    # process imported `client`, so the fork server's own check would refuse to run here)
    script = textwrap.dedent("""
        import gc, importlib.util, json, os, sys
        spec = importlib.util.spec_from_file_location("forkserver", sys.argv[1])
        fs = sys.modules["forkserver"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fs)
        fs.preimport()
        r, w = os.pipe()
        if os.fork() == 0:  # act: what every message's ClientApp does first, and what training does
            before = set(sys.modules)
            import httpx, torch
            httpx.Client()  # Flower's ClientApp: its HTTP client for the SuperNode's runtime API
            torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # training's first optimizer
            os.write(w, json.dumps({"new": sorted(set(sys.modules) - before),
                                    "frozen": gc.get_freeze_count(), "enabled": gc.isenabled()}).encode())
            os._exit(0)
        os.close(w)
        print(os.read(r, 1 << 16).decode())
        """)
    done = subprocess.run([sys.executable, "-c", script, str(Path(forkserver.__file__))], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    child = json.loads(done.stdout)
    # assert: no library is imported in the child (each late import cost it 0.3 s of CPU), the
    # preimported objects are out of the collector's reach, and the child still collects its own
    assert child["new"] == []
    assert child["frozen"] > 100_000 and child["enabled"] is True


def test_the_fork_server_refuses_to_hold_this_repositorys_code() -> None:
    # this test process imported `client`: a fork server here would run our copy, not the bundle's
    with pytest.raises(ForkServerError, match="the app bundle must bring that code itself"):
        check_nothing_of_ours()


def test_without_a_place_for_the_socket_the_supernode_starts_alone(tmp_path: Path) -> None:
    # prepare: a launcher whose socket folder cannot be made (as in a read-only container)
    forkserver = Path(launcher_command(["x"])[1])
    script = textwrap.dedent(f"""
        import importlib.util, pathlib, sys
        spec = importlib.util.spec_from_file_location("fs", {str(forkserver)!r})
        fs = sys.modules["fs"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fs)
        fs.socket_path = lambda: pathlib.Path({str(tmp_path / "missing" / "forkserver.sock")!r})
        fs.launch_supernode([sys.executable, "-c", "import os; print(os.environ.get({SOCKET_ENV!r}))"])
        """)
    # act
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    # assert: the "SuperNode" ran, without a fork server, and the log says why
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert "no ClientApp fork server" in done.stderr and "each ClientApp starts on its own" in done.stderr


def test_a_malformed_request_is_refused_and_the_fork_server_keeps_serving(tmp_path: Path) -> None:
    # act: a request whose argv is not a list of strings, then a proper message
    out, stderr = _as_supernode(tmp_path, """
        import json, socket, struct
        path = os.environ["MEDSYNTH_CLIENTAPP_FORKSERVER"]
        wait(lambda: os.path.exists(path), "the socket")
        payload = json.dumps({"argv": "--help", "env": {}, "cwd": "/"}).encode()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            socket.send_fds(conn, [struct.pack("!I", len(payload)) + payload], [0, 1, 2])
            out["answer"] = conn.recv(100).decode()
        ok = subprocess.run([wrapper, "--help"], capture_output=True, text=True)
        out["ok"] = [ok.returncode, ok.stderr]
        """)
    # assert: no ClientApp for the malformed one, the socket still there for the next
    assert out["answer"] == ""
    assert "refused a request: malformed request" in stderr
    assert out["ok"] == [0, ""]


def test_the_supernode_polls_briskly_after_a_message_and_backs_off_to_flowers_pace_when_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: Flower's SuperNode loop must still take its sleeps from a module-level ``time``
    # (become_supernode replaces exactly that); record what the clock is asked to sleep
    from flwr.supernode import start_client_internal as loop

    from client.forkserver import HANDLING_POLL_S, SUPERNODE_FIRST_POLL_S, BriskClock

    assert getattr(loop, "time", None) is time, "flwr's SuperNode loop changed: it would poll at Flower's 3 s"
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = BriskClock()
    # act: six empty pulls (the loop sleeps 3 s after each), a message whose reply it waits for
    # (0.5 s), then two empty pulls
    for _ in range(6):
        clock.sleep(3)
    clock.sleep(0.5)
    clock.sleep(3)
    clock.sleep(3)
    # assert: the pause doubles from the first poll up to Flower's 3 s, and starts again after a
    # message; the wait for the reply is cut short
    first = SUPERNODE_FIRST_POLL_S
    assert slept == [first, 2 * first, 4 * first, 8 * first, 3, 3, HANDLING_POLL_S, first, 2 * first]
    assert HANDLING_POLL_S < 0.5
    assert clock.monotonic is time.monotonic and clock.time is time.time
