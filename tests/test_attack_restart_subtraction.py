"""Attack: restart subtraction. A server completes round r with {0,1,2,3}, claims a failure and
runs a new session with {0,1,2} for the same round, hoping they re-mask their round-r update:
sum({0,1,2,3}) − sum({0,1,2}) would be hospital 3's exact update. An update leaves a hospital
masked at most once, so the re-mask is refused; asked to train again, a hospital trains a new
update and is charged for it, and its audit log shows every session."""

from __future__ import annotations

import pytest

from common.protocol.messages import error_reason
from tests.attacker import RUN_ID, Attack, write_sites


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory) -> Attack:
    """Four hospitals after an honest round 1 (one round for the module: training is the cost)."""
    sites = write_sites(tmp_path_factory.mktemp("restart"), [6, 6, 6, 6])
    attack = Attack(sites, tmp_path_factory.mktemp("out"), 4)
    new_arrays, record = attack.driver.run_round(attack.nodes, attack.arrays, 1)
    assert new_arrays is not None and record.sites_trained == ("site-0", "site-1", "site-2", "site-3")
    return attack


def test_a_second_session_for_a_completed_round_gets_no_masked_update(completed: Attack) -> None:
    # prepare: round 1 completed by all four
    attack = completed
    attack.failures.clear()
    first_session = attack.driver.setup_id
    three = {s: attack.node(s) for s in ("site-0", "site-1", "site-2")}

    # act: a new session with three of them, then the request to mask round 1 again
    attack.driver.setup(three, attack.failures)
    assert attack.driver.server is not None
    # (the protocol numbers Flower round r as r + 1: its round 0 is the key setup)
    with pytest.raises(Exception, match="0 masked inputs in round 2, need 3"):
        attack.driver._masked_round(attack.driver.server, 1, attack.failures)

    # assert: each of the three refused with the fixed text, and nothing was unmasked
    refused = [f for f in attack.failures if f.startswith("mask:")]
    assert len(refused) == 3 and all(error_reason("already-released") in f for f in refused)
    assert all(attack.grid.sent[("train.secagg_unmask", pid)] == 1 for pid in range(4))  # the honest round's only
    for site in three:
        assert [r.setup for r in attack.releases(site, 1)][:1] == [first_session]  # released in session 1 only
        assert all(r.setup != attack.driver.setup_id for r in attack.releases(site, 1))
        assert [e.round for e in attack.ledger(site).entries if e.run == RUN_ID] == [1]  # one charge
        sessions = {(e.action, e.session, e.status) for e in attack.audit(site)}
        assert ("train.secagg_mask", str(first_session), "-") in sessions
        assert ("train.secagg_mask", str(attack.driver.setup_id), "error") in sessions  # the refusal, audited
        refusal = next(e for e in attack.audit(site) if e.status == "error")
        assert "AlreadyReleased" in refusal.detail


def test_asked_to_train_the_round_again_a_hospital_sends_a_new_charged_update(completed: Attack) -> None:
    # prepare: round 1 completed by all four
    attack = completed
    attack.failures.clear()
    three = {s: attack.node(s) for s in ("site-0", "site-1", "site-2")}

    # act: the server asks three of them to train round 1 again and masks that in a new session
    privacy, _ = attack.driver.train(list(three.values()), attack.arrays, 1, attack.failures)
    attack.driver.setup(three, attack.failures)
    assert attack.driver.server is not None
    _, alive = attack.driver._masked_round(attack.driver.server, 1, attack.failures)

    # assert: what the second sum holds is three new updates, each charged; no update left twice
    assert alive == sorted(three) and all(p.status == "ok" for p in privacy.values())
    for site in three:
        releases = attack.releases(site, 1)
        assert len(releases) == 2 and releases[0].sha256 != releases[1].sha256
        assert [e.round for e in attack.ledger(site).entries if e.run == RUN_ID] == [1, 1]
    assert [e.round for e in attack.ledger("site-3").entries if e.run == RUN_ID] == [1]
