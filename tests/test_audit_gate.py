"""The audit log's payload digest matches across Flower's wire format; the FAB gate refuses
bundles outside the allow-list; SuperNode exits are diagnosed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from client.audit import AuditLogCorrupt, append_entry, entry_for, read_entries
from client.daemon import diagnose_exit
from client.fab_gate import AppNotAllowed, fab_sha256, gated_installer
from common.flower.fab import stage_app
from common.protocol.messages import payload_digest
from server.cli import fab_hash_of_app

REPO = Path(__file__).resolve().parents[1]


def _reply_content(eps: float = 3.25) -> RecordDict:
    vec = np.arange(10, dtype=np.float64)
    return RecordDict({
        "masked": ArrayRecord({"y": Array(vec)}),
        "privacy": ConfigRecord({"site": "site-0", "status": "ok", "epsilon": eps, "steps": 40,
                                 "noise-multiplier": 0.75}),
        "secagg": ConfigRecord({"cts": [b"\x00\x01", b"\x02"], "receivers": ["site-1", "site-2"]}),
    })


def test_digest_survives_flower_serialization_and_changes_with_any_field() -> None:
    # prepare
    content = _reply_content()
    # act
    wire = recorddict_from_proto(recorddict_to_proto(content))
    # assert
    assert payload_digest(wire) == payload_digest(content)
    assert payload_digest(_reply_content(eps=3.26)) != payload_digest(content)
    tampered = _reply_content()
    tampered.array_records["masked"] = ArrayRecord({"y": Array(np.arange(10, dtype=np.float64) + 1)})
    assert payload_digest(tampered) != payload_digest(content)


def test_audit_log_appends_0600_entries_with_epsilon(tmp_path: Path) -> None:
    # prepare
    log = tmp_path / "audit.jsonl"
    # act
    for eps in (1.5, 2.5):
        append_entry(log, entry_for(_FakeRequest(), _reply_content(eps), "site-0"))  # type: ignore[arg-type]
    # assert
    entries = read_entries(log)
    assert [e.epsilon for e in entries] == [1.5, 2.5]
    assert [e.noise_multiplier for e in entries] == [0.75, 0.75]  # the σ the reply carried
    assert entries[0].run == "77" and entries[0].group == "3" and entries[0].action == "train"
    assert entries[0].sha256 == payload_digest(_reply_content(1.5))
    assert log.stat().st_mode & 0o777 == 0o600
    log.write_text(log.read_text() + "not json\n")
    with pytest.raises(AuditLogCorrupt, match=":3:"):
        read_entries(log)


class _Meta:
    run_id = 77
    group_id = "3"
    message_type = "train"


class _FakeRequest:
    """The request fields ``entry_for`` reads (a Flower Message needs a running task identity)."""

    metadata = _Meta()
    content = RecordDict()  # no secagg record: no session


def test_fab_gate_installs_only_allow_listed_bundles(tmp_path: Path) -> None:
    # prepare
    installed: list[bytes] = []

    def install(fab: bytes | Path, *args: object, **kwargs: object) -> Path:
        installed.append(fab if isinstance(fab, bytes) else b"")
        return tmp_path

    good, bad = b"agreed app bundle", b"some other app"
    gate = gated_installer(install, frozenset({fab_sha256(good)}))
    # act / assert
    assert gate(good) == tmp_path
    with pytest.raises(AppNotAllowed, match=fab_sha256(bad)):
        gate(bad)
    assert installed == [good]


def test_fab_gate_logs_each_verdict_with_the_bundle_hash(caplog: pytest.LogCaptureFixture) -> None:
    # prepare
    good, bad = b"agreed app bundle", b"some other app"
    gate = gated_installer(lambda fab, *a, **k: Path("."), frozenset({fab_sha256(good)}))
    # act
    with caplog.at_level("INFO", logger="medsynth.node"):
        gate(good)
        with pytest.raises(AppNotAllowed):
            gate(bad)
    # assert: one line per verdict, each naming the hash, in the form the node daemon echoes
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("app allow-list: accepted") and fab_sha256(good) in lines[0]
    assert lines[1].startswith("app allow-list: refused") and fab_sha256(bad) in lines[1]
    assert [r.levelname for r in caplog.records] == ["INFO", "ERROR"]


def test_flower_still_exposes_the_name_the_gate_wraps() -> None:
    from flwr.supernode.runtime import run_clientapp

    assert callable(getattr(run_clientapp, "install_from_fab", None)), "flwr moved it: fix client/fab_gate.py"


def test_fab_hash_is_deterministic_and_the_one_the_gate_computes(tmp_path: Path) -> None:
    # prepare: Flower's own build of the checkout (it lists every file, .venv included)
    from flwr.cli.build import build_fab_from_disk

    flowers = fab_sha256(build_fab_from_disk(REPO))
    # act: what `server fab-hash` publishes, twice, and the FAB `flwr run` builds of the staged copy
    published = fab_hash_of_app(REPO)
    staged = stage_app(REPO, tmp_path)
    # assert: one digest, byte for byte Flower's, from a handful of files
    assert published == fab_hash_of_app(REPO) == flowers
    assert fab_sha256(build_fab_from_disk(staged)) == flowers
    assert sum(1 for p in staged.rglob("*") if p.is_file()) < 400


def test_supernode_exits_are_diagnosed() -> None:
    unregistered = "ERROR : Exit Code: 305\n[code: 2004] Failed to activate SuperNode.\n"
    wrong_ca = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate"
    assert "not registered" in (diagnose_exit(unregistered) or "")
    assert "does not verify" in (diagnose_exit(wrong_ca) or "")
    assert diagnose_exit("WARNING : Connection attempt failed, retrying in 0.6 seconds") is None
    taken = "RuntimeError: SuperNode Runtime HTTP API failed to start."
    assert "runtime-port = 9200" in (diagnose_exit(taken, "site-4", 9200) or "")
    assert "site-4.auth.pub" in (diagnose_exit(unregistered, "site-4", 9200) or "")  # no <site> placeholder
