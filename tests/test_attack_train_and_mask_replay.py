"""Attack: a dishonest server replays a train-and-mask request. Once a session is set up, a round's
train request names the session and the hospitals mask their new update in the same reply. The
server sends round r's request again, in the same session (two updates under round r's pairwise
masks: y − y′ would be x − x′ once both self-masks were known) or under a session the hospital is
not in. Each hospital refuses before it trains: no second charge, nothing released."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Message, MessageType

from common.protocol.messages import decode_reply, encode_train_request, error_reason
from common.protocol.secagg import SessionRef, secagg_record
from tests.attacker import RUN_ID, Attack, write_sites


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sites(tmp_path_factory.mktemp("fused"), [5, 5, 5, 5])


def _train_and_mask(attack: Attack, session: SessionRef, server_round: int) -> list[Message]:
    """The train request of ``server_round`` naming ``session``, sent to every hospital."""
    content = encode_train_request(attack.arrays, server_round)
    content["secagg"] = secagg_record(session, round=server_round).config_records["secagg"]
    return list(attack.grid.send_and_receive(
        [Message(content, dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(server_round))
         for n in attack.nodes]))


def test_a_replayed_or_foreign_train_and_mask_request_is_refused_before_training(sites: Path, tmp_path: Path) -> None:
    # prepare: two honest rounds; round 1 also sets up round 2's session, in which round 2 trains
    # and masks in one message (round 2 is the last: its session stays the hospitals' current one)
    attack = Attack(sites, tmp_path, 4)
    for server_round in (1, 2):
        new_arrays, record = attack.driver.run_round(attack.nodes, attack.arrays, server_round,
                                                     prepare_next=server_round == 1)
        assert new_arrays is not None and len(record.sites_trained) == 4
    assert all(attack.grid.sent[("train.secagg_mask", pid)] == 1 for pid in range(4))  # round 1's only
    assert record.secure is not None and record.secure.session == attack.driver.setup_id
    charged = {s: len(attack.ledger(s).entries) for s in ("site-0", "site-1", "site-2", "site-3")}

    # act: round 2's request again in its session, then under a session nobody joined
    replayed = _train_and_mask(attack, attack.driver.ref, 2)
    foreign = _train_and_mask(attack, SessionRef(RUN_ID, attack.driver.setup_id + 7), 3)

    # assert: every hospital refused with the fixed text, nothing was charged, nothing left
    for reply in replayed + foreign:
        assert not reply.content.array_records
        privacy = decode_reply(reply.content)
        assert privacy.status == "error" and privacy.reason == error_reason("secagg-abort")
    for site, entries in charged.items():
        assert len(attack.ledger(site).entries) == entries
        assert len(attack.releases(site, 2)) == 1 and attack.releases(site, 3) == []
        refusals = [e for e in attack.audit(site) if e.status == "error"]
        assert len(refusals) == 2 and all("ReplayDetected" in e.detail for e in refusals)
