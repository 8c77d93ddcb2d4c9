"""The deployed product on loopback: ``medsynth server start`` (SuperLink with TLS, node
authentication and SQLite state) and ``medsynth node start`` daemons, as real processes, training
for real with secure aggregation; nodes that must be refused; crashes that must lose nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.audit import read_entries
from client.ledger import PrivacyLedger
from common.certs import read_public_keys
from common.flower import find_tagged_pids, free_port
from common.secagg import fingerprint
from tests.consortium import Consortium, Daemon, make_consortium, medsynth

pytestmark = pytest.mark.slow


def _state(c: Consortium) -> dict:  # type: ignore[type-arg]
    return json.loads((c.results / "server_state.json").read_text())


def _no_leftovers(daemons: list[Daemon]) -> None:
    left = {d.name: find_tagged_pids(tag) for d in daemons if (tag := d.tag())}
    assert not any(left.values()), f"processes outlived their daemon: {left}"


def _assert_ledgers_and_audits_agree_with_server(c: Consortium, sites: list[str]) -> None:
    state = _state(c)
    for site in sites:
        ledger = PrivacyLedger.read(c.site_dir(site) / "state" / "ledger.json")
        audit = read_entries(c.site_dir(site) / "state" / "audit.jsonl")
        by_digest = {e.sha256: e for e in audit}
        trained_rounds = [r for r in state["rounds"] if site in r["sites_trained"]]
        for r in trained_rounds:
            # every message the server received from this hospital is in the hospital's audit log
            for got in r["costs"][site]["received"]:
                entry = by_digest.get(got["sha256"])
                assert entry is not None, (site, r["round"], got)
                assert (entry.bytes, entry.action, entry.group) == (got["bytes"], got["type"], got["group"])
                if got["type"] == "train":  # the ε the server reported is the one the hospital logged
                    assert entry.epsilon == pytest.approx(r["privacy"][site]["epsilon"], rel=1e-12)
            assert any(g["type"] == "train" for g in r["costs"][site]["received"])
        # the hospital's ledger, recomputed from its history, is the last ε the server saw
        assert ledger.epsilon() == pytest.approx(trained_rounds[-1]["privacy"][site]["epsilon"], rel=1e-9)
        assert ledger.epsilon() <= ledger.epsilon_budget
        # its answer to the final model is in its audit log under the digest the server recorded
        final = state["final_model"]["received"][site]
        assert (by_digest[final["sha256"]].action, by_digest[final["sha256"]].epsilon) == ("query.final_model", None)


def _assert_hospitals_hold_the_final_model(c: Consortium, sites: list[str]) -> None:
    from common.checkpoint import latest_valid_checkpoint, load_checkpoint

    state = _state(c)
    last = state["rounds"][-1]["round"]
    server_final = load_checkpoint(c.results / "checkpoints" / f"round-{last:04d}.safetensors")
    assert state["final_model"]["round"] == last and state["final_model"]["kept"] == sites
    assert state["final_model"]["content_sha256"] == server_final.content_sha256
    for site in sites:
        kept = latest_valid_checkpoint(c.site_dir(site) / "state" / "global-model")
        assert kept is not None and (kept.round, kept.content_sha256) == (last, server_final.content_sha256), site
        trained = {s for r in state["rounds"] for s in r["sites_trained"]}  # each one's newest report came along
        assert {s: p.epsilon for s, p in kept.site_privacy.items()} == {
            s: [r["privacy"][s]["epsilon"] for r in state["rounds"] if s in r["privacy"]][-1] for s in trained}


def _flwr_as_operator(c: Consortium, *args: str) -> dict:  # type: ignore[type-arg]
    """``flwr ARGS medsynth-server --format json`` as deploy/README.md has the operator run it: with the
    server's Flower home, whose connection ``server start`` wrote."""
    env = {**os.environ, "FLWR_HOME": str(c.server_state / "flwr-home")}
    done = subprocess.run([str(Path(sys.executable).parent / "flwr"), *args, "medsynth-server", "--format", "json"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_three_hospitals_over_tls_with_node_auth_and_refused_nodes(tmp_path: Path) -> None:
    # prepare: an operator, three registered hospitals that allow only the bundle `server fab-hash`
    # names, and three nodes that must be refused
    fab_hash = medsynth("server", "fab-hash").stdout.strip()
    c = make_consortium(tmp_path, 3, allowed_fabs=[fab_hash])
    other_ca = tmp_path / "other-ca"
    medsynth("certs", "ca", "--out", other_ca)
    rogue = c.site_dir("rogue")
    medsynth("certs", "node", "--site", "rogue", "--out", rogue / "keys")
    pins = medsynth("certs", "fingerprint", *(c.site_dir(s) / "keys" / f"{s}.secagg.json" for s in c.sites)).stdout
    medsynth("certs", "roster", "--out", rogue / "roster.json", rogue / "keys" / "rogue.secagg.json")
    rogue_pin = {s: fingerprint(k) for s, k in read_public_keys([rogue / "keys" / "rogue.secagg.json"]).items()}
    c.write_node_toml("rogue", rogue / "node.toml", members=rogue_pin,
                      **{"data-dir": str(c.site_dir("site-0") / "dicom")})
    no_tls = c.write_node_toml("site-0", tmp_path / "no-tls.toml", insecure=True)
    wrong_ca = c.write_node_toml("site-0", tmp_path / "wrong-ca.toml",
                                 **{"ca-certificate": str(other_ca / "ca.pem"), "state-dir": str(tmp_path / "w")})
    raw_log = tmp_path / "raw-insecure-supernode.log"
    raw: subprocess.Popen[bytes] | None = None
    server = c.start_server(c.write_server_toml(rounds=2))
    try:
        server.wait_for("accepting hospitals", 120)
        # the operator registers the rogue's key and unregisters it again (deploy/README.md, section 6)
        rogue_id = _flwr_as_operator(c, "supernode", "register", str(rogue / "keys" / "rogue.auth.pub"))["node-id"]
        _flwr_as_operator(c, "supernode", "unregister", str(rogue_id))
        listed = _flwr_as_operator(c, "supernode", "list")["nodes"]
        nodes = [c.start_node(site) for site in c.sites]
        # act: the refused ones try while the federation runs
        rogue_node = c.start_node("rogue", rogue / "node.toml")
        refused_tls = medsynth("node", "start", "--config", no_tls, check=False)
        refused_ca = medsynth("node", "start", "--config", wrong_ca, check=False)
        with raw_log.open("wb") as fh:
            env = {**os.environ, "FLWR_HOME": str(tmp_path / "raw-home"),
                   "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
            raw = subprocess.Popen(
                [str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink",
                 f"127.0.0.1:{c.port}", "--port", str(free_port())],
                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        rogue_node.proc.wait(timeout=180)
        server.wait_for("round 1/2", 400)
        status = medsynth("server", "status", "--config", c.root / "operator" / "server.toml")
        node_status = medsynth("node", "status", "--config", c.node_toml("site-0"))
        server.proc.wait(timeout=400)
    finally:
        if raw is not None:
            os.killpg(raw.pid, signal.SIGKILL)
            raw.wait(timeout=10)
        c.stop_all()

    # assert: the federation ran both rounds with exactly the three registered hospitals
    assert server.proc.returncode == 0, server.text()[-3000:]
    state = _state(c)
    assert state["finished"] is True and state["secure_aggregation"] is True
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    for r in state["rounds"]:
        assert r["sites_trained"] == c.sites and r["failures"] == [], r
        assert r["secure"]["dead"] == []
    assert "server: running" in status.stdout and "ε" in status.stdout and "last σ = " in status.stdout
    assert "hospitals: 3 registered, 3 connected" in status.stdout and "site-2: connected" in status.stdout
    assert "privacy spent per hospital" in server.text()
    assert "final model (round 2) sent: kept by site-0, site-1, site-2" in server.text()
    # what the run would spend was said before it started, and each round line carries σ
    assert "planned run: each hospital with a fresh budget of ε = 10" in server.text()
    assert "round 1/2: 3 trained" in server.text() and "site-0 ε=" in server.text() and " σ=" in server.text()
    # each node said its budget at start, then one line per round, and the allow-list's verdict
    for node in nodes:
        text = node.text()
        assert "privacy: nothing spent yet: budget ε 10" in text and "σ > 10 is refused" in text
        assert "began: it may take ε from 0.0000 to 10.0000" in text
        assert "round 1: trained at σ = " in text and "round 2: trained at σ = " in text
        assert f"app allow-list: accepted app bundle sha256 {fab_hash}" in text
    assert "node site-0: running" in node_status.stdout and "last round: run" in node_status.stdout
    _assert_ledgers_and_audits_agree_with_server(c, c.sites)
    _assert_hospitals_hold_the_final_model(c, c.sites)
    audit = medsynth("node", "audit", "--config", c.node_toml("site-0"))
    assert all(f'{site} = "{pin}"' in pins for site, pin in c.pinned_members().items())  # what node.toml pins
    # keys, shares, round 1 (train, mask, unmask), round 2 (train with its masked update, unmask), final
    assert "8 message(s) left this hospital" in audit.stdout
    privacy = medsynth("node", "privacy", "--config", c.node_toml("site-0"))
    assert "ε spent" in privacy.stdout and "round   2" in privacy.stdout
    # the server's report.html, and the evaluation of the received model at a hospital (aggregates only)
    page = (c.results / "report.html").read_text()
    assert '<img alt="Per-round losses"' in page and '<img alt="Sample grid round-0002"' in page
    evaluated = medsynth("node", "evaluate", "--config", c.node_toml("site-0"))
    assert "domain FD" in evaluated.stdout and "TSTR" in evaluated.stdout
    assert sorted(p.name for p in (c.site_dir("site-0") / "state" / "evaluation").iterdir()) == ["evaluation.json"]
    judged = json.loads((c.site_dir("site-0") / "state" / "evaluation" / "evaluation.json").read_text())
    assert judged["round"] == 2  # the final model, not the one round 2 trained from
    # each refusal is clear, and touched nothing; an unregistered key is refused like an unknown one
    assert {n["node-id"]: n["status"] for n in listed}[str(rogue_id)] == "unregistered"
    assert rogue_node.proc.returncode == 2
    assert "authentication key: it is not registered" in rogue_node.text()
    assert not (rogue / "state" / "ledger.json").exists()
    assert refused_tls.returncode == 2 and "only over TLS" in refused_tls.stderr
    assert refused_ca.returncode == 2 and "does not vouch for" in refused_ca.stderr
    raw_text = raw_log.read_text(errors="replace")
    assert "SuperNode ID" not in raw_text and "Connection attempt failed" in raw_text
    for node in nodes:
        assert "Traceback" not in node.text(), node.text()[-2000:]
    for site in c.sites:  # every ClientApp went through the hash gate, and the hash matched
        assert (c.site_dir(site) / "state" / "bin" / "flwr-clientapp").exists()
        (log,) = (c.site_dir(site) / "state" / "logs").glob("supernode-*.log")  # one start, one log
        assert "AppNotAllowed" not in log.read_text() and "app allow-list: accepted" in log.read_text()
    _no_leftovers(c.daemons)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_file(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s:.0f} s"
        time.sleep(0.5)


def _wait_ledger_round(path: Path, server_round: int, timeout_s: float, not_run: int | None = None) -> None:
    """Until the ledger at ``path`` charged ``server_round`` (in a run other than ``not_run``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        entries = PrivacyLedger.read(path).entries if path.exists() else []
        if any(e.round == server_round and e.run != not_run for e in entries):
            return
        assert time.monotonic() < deadline, f"{path} has no round {server_round} within {timeout_s:.0f} s"
        time.sleep(0.3)


def test_server_sigkill_resumes_and_a_killed_hospital_keeps_its_steps(tmp_path: Path) -> None:
    # prepare: four hospitals (secure aggregation keeps a 3-of-4 threshold when one dies); two
    # rounds: the SuperLink dies after round 1, a hospital dies in the resumed run's round 2
    c = make_consortium(tmp_path, 4, patients_per_site=10)
    # the killed hospital's round ends at the round timeout: 60 s, not the suite's 90 (a healthy
    # round here takes about 25 s), so the test waits less for a reply that never comes
    config = c.write_server_toml(rounds=2, **{"round-timeout": 60.0})
    ckpts = c.results / "checkpoints"
    victim = "site-3"
    server = c.start_server(config)
    try:
        server.wait_for("accepting hospitals", 120)
        nodes = {site: c.start_node(site) for site in c.sites}
        _wait_file(ckpts / "round-0001.safetensors", 500)
        round1_hash = _sha256(ckpts / "round-0001.safetensors")
        victim_ledger = c.site_dir(victim) / "state" / "ledger.json"
        (first_run,) = {e.run for e in PrivacyLedger.read(victim_ledger).entries if e.round == 1}
        # act 1: SIGKILL the SuperLink mid-run (out of memory, a kill -9); the daemon must notice,
        # stop its ServerApp and exit 1, so that systemd (Restart=on-failure) starts it again
        superlink_pid = json.loads((c.server_state / "daemon.json").read_text())["superlink_pid"]
        first_tag = server.tag()
        os.kill(superlink_pid, signal.SIGKILL)
        server.proc.wait(timeout=120)
        left_by_first = find_tagged_pids(first_tag) if first_tag else set()
        # a half-written checkpoint of round 2 (as if the crash hit mid-write without the atomic rename)
        (ckpts / "round-0002.safetensors").write_bytes((ckpts / "round-0001.safetensors").read_bytes()[:5000])
        restarted = c.start_server(config)
        restarted.wait_for("resuming", 120)
        # act 2: a hospital dies mid-round 2 of the resumed run, after its ledger charged the round
        # and training began (the first run may have charged round 2 too before the server died)
        _wait_ledger_round(victim_ledger, 2, 700, not_run=first_run)
        nodes[victim].kill_tree(signal.SIGKILL)
        restarted.proc.wait(timeout=600)
        # act 3: started again once finished, it says so and starts nothing
        again = medsynth("server", "start", "--config", config, check=False)
    finally:
        c.stop_all()

    # assert: the crash was a restartable exit, in one line, leaving nothing behind
    assert server.proc.returncode == 1, server.text()[-3000:]
    errors = [line for line in server.text().splitlines() if line.startswith("medsynth: error:")]
    assert len(errors) == 1 and "the SuperLink exited unexpectedly" in errors[0]
    assert "Traceback" not in server.text() and left_by_first == set()
    # the restart resumed: no completed round lost, numbering continued, round 1 untouched, the
    # corrupt file replaced
    assert restarted.proc.returncode == 0, restarted.text()[-3000:]
    state = _state(c)
    assert [r["round"] for r in state["rounds"]] == [1, 2] and state["finished"] is True
    assert _sha256(ckpts / "round-0001.safetensors") == round1_hash
    assert "resuming from" in (c.server_state / "run.log").read_text()
    from common.checkpoint import load_checkpoint

    assert load_checkpoint(ckpts / "round-0002.safetensors").round == 2  # verifies its content hash
    # the round with the dead hospital finished with the other three
    last = state["rounds"][-1]
    assert last["sites_trained"] == ["site-0", "site-1", "site-2"], last
    assert victim in last["secure"]["dead"] or victim not in last["secure"]["alive"]
    # the killed hospital's ledger still counts the resumed run's round 2 (charged before training),
    # and its ε includes it
    ledger = PrivacyLedger.read(victim_ledger)
    assert any(e.round == 2 and e.run != first_run for e in ledger.entries)
    reported = state["rounds"][0]["privacy"][victim]["epsilon"]
    assert ledger.epsilon() > reported
    _assert_ledgers_and_audits_agree_with_server(c, ["site-0", "site-1", "site-2"])
    _assert_hospitals_hold_the_final_model(c, ["site-0", "site-1", "site-2"])
    _no_leftovers(c.daemons)
    # the finished run was not started again; each start that ran kept its own logs
    assert again.returncode == 0 and "the run has finished: round 2 of 2" in again.stdout, again.stderr
    logs = sorted(p.name.split("-")[0] for p in (c.server_state / "logs").iterdir())
    assert logs == ["run", "run", "superlink", "superlink"]
    assert "resuming from" in (c.server_state / "run.log").read_text()  # the link names the newest


def test_server_exit_codes_without_hospitals(tmp_path: Path) -> None:
    # prepare: a consortium whose hospitals never start; a short wait for them
    c = make_consortium(tmp_path, 3, patients_per_site=4)
    config = c.write_server_toml(rounds=1, **{"wait-nodes-timeout": 5.0})
    # act 1: the port is taken by another program
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", c.port))
        taken.listen()
        in_use = medsynth("server", "start", "--config", config, check=False)
    # act 2: nobody joins
    alone = medsynth("server", "start", "--config", config, check=False)
    status = medsynth("server", "status", "--config", config)
    # assert: a port in use is the operator's to fix (2); late hospitals are transient (1); each is one line
    assert in_use.returncode == 2, in_use.stderr
    assert in_use.stderr.splitlines() == [
        f"medsynth: error: port {c.port} on 127.0.0.1 is in use by another program; stop it or change "
        f"[superlink] port in server.toml (see {c.server_state / 'superlink.log'})"]
    assert alone.returncode == 1, alone.stderr
    assert alone.stderr.splitlines() == [
        "medsynth: error: only 0 of the 3 hospitals needed joined within 5 s (missing: site-0, site-1, site-2); "
        "check that their nodes run and reach the SuperLink; the next start waits again"]
    assert "waiting for hospitals: 0 of the 3 needed joined; missing: site-0, site-1, site-2" in alone.stdout
    for noise in ("Traceback", "Exit Code", "flower.ai/docs"):
        assert noise not in alone.stdout + alone.stderr
    assert "Traceback" in (c.server_state / "run.log").read_text()  # the run log keeps everything
    assert "hospitals: 3 registered (site-0, site-1, site-2)" in status.stdout
