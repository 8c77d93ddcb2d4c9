"""ε cannot be rolled back: the attacks a person at the hospital could try on its own state folder.

Each test sends real train requests to the hospital's ClientApp (``client.app.train``: prepare,
ledger, DP training, audit log) with a deployed hospital's node config, then does to the files
what a person would do — delete the ledger, put back an older copy, edit a charge out — and sends
the next round's request. Nothing of the code under test is replaced; a refusal comes back to the
server as an ``error`` reply whose reason tells the privacy officer what to do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from client import app as client_app
from client.audit import AuditEntry, LedgerStateEntry, read_entries, read_records
from client.ledger import AuditLogBehind, LedgerMissing, LedgerRolledBack, PrivacyLedger, chain_of
from common.config import RunConfig, SiteConfig
from common.dp.accounting import Charge
from common.models import build_models
from common.protocol.messages import SiteReply, decode_reply, encode_train_request, error_reason
from common.weights import model_arrays
from medsynth.cli import main
from tests.helpers import RUN_ID, default_run_config

pytestmark = pytest.mark.usefixtures("task_identity")

NODE_ID = 101
RUN_CONFIG = default_run_config(**{
    "warm-start__budget-share": 0.0,
    "train__local-steps": 3, "train__batch-size": 4, "model__g-width": 16, "model__d-width": 16,
    "dp__calibrate": False, "dp__noise-multiplier": 1.2, "secure-aggregation": False,
})


@pytest.fixture(scope="module")
def global_arrays() -> dict[str, np.ndarray]:
    netG, netD = build_models(RunConfig.from_flower(RUN_CONFIG).model, seed=0)  # type: ignore[arg-type]
    return model_arrays(netG, netD)


@pytest.fixture
def site(node_config: dict[str, bool | float | str]) -> SiteConfig:
    """The paths the ClientApp derives from ``node_config``."""
    return SiteConfig.from_flower(node_config, RunConfig.from_flower(RUN_CONFIG))  # type: ignore[arg-type]


def _send(node_config: dict[str, bool | float | str], arrays: dict[str, np.ndarray], server_round: int) -> SiteReply:
    """One train request through the hospital's ClientApp, as the SuperNode delivers it."""
    msg = Message(encode_train_request(arrays, server_round), dst_node_id=NODE_ID,
                  message_type=MessageType.TRAIN, group_id=str(server_round))
    ctx = Context(run_id=RUN_ID, node_id=NODE_ID, node_config=node_config,
                  state=RecordDict(), run_config=RUN_CONFIG)  # type: ignore[arg-type]
    return decode_reply(client_app.train(msg, ctx).content)


def _train(node_config: dict[str, bool | float | str], arrays: dict[str, np.ndarray], server_round: int) -> float:
    reply = _send(node_config, arrays, server_round)
    assert reply.status == "ok", reply.reason
    return reply.epsilon


def _audit(site: SiteConfig) -> Path:
    assert site.audit_path is not None
    return site.audit_path


def _states(site: SiteConfig) -> list[LedgerStateEntry]:
    return [r for r in read_records(_audit(site)) if isinstance(r, LedgerStateEntry)]


def _refused(node_config: dict[str, bool | float | str], site: SiteConfig, arrays: dict[str, np.ndarray],
             server_round: int) -> str:
    """Send a round that must be refused: the cause the hospital's audit log records (the reply
    itself carries only the fixed "ledger" text), after checking that the only line the audit log
    gained is the error reply itself (no ledger write, no charge, no training)."""
    before = read_records(_audit(site))
    reply = _send(node_config, arrays, server_round)
    after = read_records(_audit(site))
    assert reply.status == "error" and reply.update is None
    assert after[:-1] == before and isinstance(after[-1], AuditEntry) and after[-1].status == "error"
    assert reply.reason == error_reason("ledger")
    return after[-1].detail


def test_a_deleted_ledger_is_refused_and_no_fresh_one_is_started(
    node_config: dict[str, bool | float | str], site: SiteConfig, global_arrays: dict[str, np.ndarray]
) -> None:
    # prepare: one round trained and recorded, then the ledger deleted
    _train(node_config, global_arrays, 1)
    site.ledger_path.unlink()
    # act
    reason = _refused(node_config, site, global_arrays, 2)
    # assert: no fresh ledger (ε would restart at 0); the officer is told what to do
    assert not site.ledger_path.exists()
    assert reason.startswith("LedgerMissing: ")
    assert "restore ledger.json from backup" in reason and "Never delete the ledger" in reason
    assert str(_audit(site)) in reason and "3 DP steps charged" in reason
    audit_before = _audit(site).read_bytes()
    with pytest.raises(LedgerMissing):  # what `medsynth node privacy --config` reads, without writing
        PrivacyLedger.read(site.ledger_path, audit_path=_audit(site))
    assert _audit(site).read_bytes() == audit_before and not site.ledger_path.exists()


def test_an_older_ledger_put_back_is_refused_and_the_restored_newest_one_carries_on(
    node_config: dict[str, bool | float | str], site: SiteConfig, global_arrays: dict[str, np.ndarray],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # prepare: a copy after round 1, two more rounds, then the copy put back
    _train(node_config, global_arrays, 1)
    old_copy, newest = tmp_path / "ledger-after-round-1.json", tmp_path / "ledger-newest.json"
    shutil.copy2(site.ledger_path, old_copy)
    _train(node_config, global_arrays, 2)
    eps_spent = _train(node_config, global_arrays, 3)
    shutil.copy2(site.ledger_path, newest)
    old_seq, new_seq = (PrivacyLedger.read(p).sequence for p in (old_copy, newest))
    shutil.copy2(old_copy, site.ledger_path)
    # act
    reason = _refused(node_config, site, global_arrays, 4)
    # assert: refused before any charge; both sequences and the ε last reported are named
    assert old_seq < new_seq
    assert site.ledger_path.read_bytes() == old_copy.read_bytes()
    assert reason.startswith("LedgerRolledBack: ")
    assert f"is at sequence {old_seq}" in reason and f"recorded sequence {new_seq}" in reason
    assert f"restore the ledger copy at sequence {new_seq} from backup" in reason
    assert f"last ε this hospital reported, per the audit log, was {eps_spent:.4f}" in reason
    privacy_cli = ["node", "privacy", "--ledger", str(site.ledger_path), "--audit-log", str(_audit(site))]
    capsys.readouterr()
    assert main(privacy_cli) == 2  # the officer's report refuses to show the rolled-back ε
    assert f"recorded sequence {new_seq}" in capsys.readouterr().err
    # the officer's fix: the newest copy back, and training continues from what was spent
    shutil.copy2(newest, site.ledger_path)
    assert main(privacy_cli) == 0 and "agrees: not deleted, not rolled back" in capsys.readouterr().out
    eps_next = _train(node_config, global_arrays, 4)
    assert eps_next > eps_spent
    assert [e.round for e in PrivacyLedger.read(site.ledger_path).entries] == [1, 2, 3, 4]


def test_a_charge_edited_out_is_refused_with_or_without_a_recomputed_chain(
    node_config: dict[str, bool | float | str], site: SiteConfig, global_arrays: dict[str, np.ndarray]
) -> None:
    # prepare: two rounds; then three edits of the ledger, each removing round 2's charge
    _train(node_config, global_arrays, 1)
    _train(node_config, global_arrays, 2)
    state = json.loads(site.ledger_path.read_text())
    recorded = _states(site)[-1]
    naive = {**state, "history": state["history"][:1]}  # sequence and chain kept as they were
    rechained = {**naive, "chain": chain_of(naive["previous_chain"], naive)}  # chain recomputed
    successor = {**naive, "sequence": state["sequence"] + 1, "previous_chain": state["chain"]}
    successor["chain"] = chain_of(successor["previous_chain"], successor)  # a forged "next write"
    reasons = []
    for edited in (naive, rechained, successor):
        site.ledger_path.write_text(json.dumps(edited))
        # act
        reasons.append(_refused(node_config, site, global_arrays, 3))
    # assert: each edit refused, each message says to restore from backup
    assert reasons[0].startswith("LedgerCorrupt: ") and "does not match its own hash chain" in reasons[0]
    assert reasons[1].startswith("LedgerRolledBack: ") and f"recorded sequence {recorded.sequence}" in reasons[1]
    assert reasons[2].startswith("LedgerRolledBack: ") and "charges recorded there are missing" in reasons[2]
    assert all("from backup" in r for r in reasons)
    assert _states(site)[-1] == recorded


def test_a_crash_between_the_ledger_write_and_its_audit_line_is_accepted_and_completed(
    node_config: dict[str, bool | float | str], site: SiteConfig, global_arrays: dict[str, np.ndarray]
) -> None:
    # prepare: round 1, then a charge written to the ledger whose audit line never made it
    _train(node_config, global_arrays, 1)
    with PrivacyLedger.locked(site.ledger_path):
        ledger = PrivacyLedger.open(site.ledger_path, site="site-0", accountant="prv", delta=1e-5,
                                    epsilon_budget=10.0)  # no audit_path: the write records nothing
        ledger.charge(Charge(1.2, 0.25, 3), run=RUN_ID, round=2)  # as if the process died right after
    recorded_before = [r.sequence for r in _states(site)]
    # act
    _train(node_config, global_arrays, 3)
    # assert: accepted; the missing state recorded first, then round 3's write; every charge counts
    states = _states(site)
    assert [r.sequence for r in states] == [*recorded_before, ledger.sequence, ledger.sequence + 1]
    final = PrivacyLedger.read(site.ledger_path, audit_path=_audit(site))
    assert [e.round for e in final.entries] == [1, 2, 3]
    assert (states[-1].sequence, states[-1].chain, states[-1].total_steps) == (final.sequence, final.chain, 9)


def test_a_ledger_two_writes_ahead_means_the_audit_log_lost_lines(
    node_config: dict[str, bool | float | str], site: SiteConfig, global_arrays: dict[str, np.ndarray]
) -> None:
    # prepare: round 1 (ledger created, then charged), then the audit log emptied
    _train(node_config, global_arrays, 1)
    sequence = PrivacyLedger.read(site.ledger_path).sequence
    _audit(site).write_bytes(b"")
    # act
    reply = _send(node_config, global_arrays, 2)
    assert reply.reason == error_reason("ledger")
    reason = [r for r in read_records(_audit(site)) if isinstance(r, AuditEntry)][-1].detail
    # assert
    assert sequence >= 2
    assert reason.startswith("AuditLogBehind: ") and f"is at sequence {sequence}" in reason
    assert "until the audit log is restored from backup" in reason
    with pytest.raises(AuditLogBehind):
        PrivacyLedger.read(site.ledger_path, audit_path=_audit(site))


def test_a_ledger_from_before_sequences_is_migrated_once(tmp_path: Path) -> None:
    # prepare: a format-1 ledger (no sequence, no chain) and an audit log of messages only
    ledger_path, audit = tmp_path / "ledger.json", tmp_path / "audit.jsonl"
    ledger_path.write_text(json.dumps({
        "format": 1, "site": "site-0", "accountant": "prv", "delta": 1e-5, "epsilon_budget": 10.0,
        "history": [{"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 20, "run": 7, "round": 1,
                     "charged_at": "2026-01-01T00:00:00+00:00"}],
        "plans": {},
    }))
    audit.write_text(json.dumps({"time": 1.0, "run": "7", "group": "1", "action": "train", "site": "site-0",
                                 "status": "ok", "bytes": 10, "sha256": "0" * 64, "epsilon": 0.5}) + "\n")
    # act
    ledger = PrivacyLedger.open(ledger_path, site="site-0", accountant="prv", delta=1e-5, epsilon_budget=10.0,
                                audit_path=audit)
    # assert: history kept, first sequence recorded, the old message line still read
    assert ledger.sequence == 1 and [e.round for e in ledger.entries] == [1]
    states = [r for r in read_records(audit) if isinstance(r, LedgerStateEntry)]
    assert [(st.sequence, st.chain, st.total_steps) for st in states] == [(1, ledger.chain, 20)]
    assert [e.epsilon for e in read_entries(audit)] == [0.5]
    # and the unsequenced copy put back afterwards is refused
    unsequenced = {k: v for k, v in json.loads(ledger_path.read_text()).items()
                   if k not in ("sequence", "chain", "previous_chain")}
    ledger_path.write_text(json.dumps(unsequenced))
    with pytest.raises(LedgerRolledBack, match="no sequence"):
        PrivacyLedger.open(ledger_path, site="site-0", accountant="prv", delta=1e-5, epsilon_budget=10.0,
                           audit_path=audit)


def test_a_new_hospital_with_only_setup_messages_in_its_log_starts_its_ledger(tmp_path: Path) -> None:
    # prepare: secure-aggregation setup replies are logged before the first training round
    audit = tmp_path / "audit.jsonl"
    audit.write_text(json.dumps({"time": 1.0, "run": "7", "group": "setup-1", "action": "train.secagg_keys",
                                 "site": "site-0", "status": "-", "bytes": 10, "sha256": "0" * 64,
                                 "epsilon": None}) + "\n")
    # act
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", site="site-0", accountant="prv", delta=1e-5,
                                epsilon_budget=10.0, audit_path=audit)
    # assert
    assert ledger.sequence == 1 and ledger.entries == []
    assert [st.sequence for st in read_records(audit) if isinstance(st, LedgerStateEntry)] == [1]
