"""Attack: declined hospitals counted as survivors. With three of four hospitals out of budget,
each used to mask a zero vector and count as a survivor, so the "sum of four" was one hospital's
update. Now only a hospital that trained has anything to mask: the server abandons a round with
fewer contributors than the threshold and says so, and a server that runs the protocol anyway
gets no masked vector from the declined hospitals and too few shares to unmask the one that did."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.ledger import PrivacyLedger
from common.dp.accounting import Charge
from common.protocol.messages import error_reason
from common.protocol.secagg import UNMASK, secagg_record, split_pairs
from common.secagg import TooFewSurvivors
from tests.attacker import RUN_ID, Attack, write_sites

SPENT = ("site-1", "site-2", "site-3")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sites(tmp_path_factory.mktemp("declined"), [5, 5, 5, 5])


def _spend(attack: Attack) -> None:
    """Sites 1–3 have spent their budget in an earlier run (ε ≈ 77 ≫ 10 at δ = 1e-5)."""
    for site in SPENT:
        ledger = PrivacyLedger.open(attack.state(site) / "ledger.json", site=site, accountant="prv", delta=1e-5,
                                    epsilon_budget=10.0, audit_path=attack.state(site) / "audit.jsonl")
        ledger.charge(Charge(0.5, 1.0, 20), run=1, round=1)


def test_the_server_abandons_a_round_with_one_contributor_and_requests_no_update(sites: Path, tmp_path: Path) -> None:
    # prepare
    attack = Attack(sites, tmp_path, 4)
    _spend(attack)
    # act: the honest driver
    new_arrays, record = attack.driver.run_round(attack.nodes, attack.arrays, 1)
    # assert: no update, no masking requested, the record says why
    assert new_arrays is None and record.sites_trained == ()
    assert record.sites_budget_exhausted == tuple(SPENT)
    assert any("only 1 hospital(s) trained (site-0)" in f and "needs at least 3" in f for f in record.failures)
    assert sum(n for (kind, _), n in attack.grid.sent.items() if kind != "train") == 0
    assert attack.releases("site-0", 1) == []


def test_declined_hospitals_send_nothing_to_mask_and_the_one_update_cannot_be_unmasked(
    sites: Path, tmp_path: Path
) -> None:
    # prepare: the dishonest server sets up a session with all four anyway and asks all to mask
    attack = Attack(sites, tmp_path, 4)
    _spend(attack)
    attack.driver.train(attack.nodes, attack.arrays, 1, attack.failures)
    attack.driver.setup({s: attack.node(s) for s in ("site-0", *SPENT)}, attack.failures)
    server = attack.driver.server
    assert server is not None
    with pytest.raises(TooFewSurvivors):
        attack.driver._masked_round(server, 1, attack.failures)  # its own driver stops at 1 < 3 inputs

    # act: it then asks everyone to unmask anyway, claiming all four alive
    masked = server._masked  # what it received: site-0's vector only
    requests = {}
    for responder in ("site-0", *SPENT):
        b_senders, b_cts = split_pairs({u: m.b_share_cts[responder] for u, m in masked.items()})
        requests[attack.node(responder)] = secagg_record(
            attack.driver.ref, round=1, alive=["site-0", *SPENT], dead=[], s_senders=[], s_cts=[],
            b_senders=b_senders, b_cts=b_cts)
    from flwr.app import Message

    replies = attack.grid.send_and_receive(
        [Message(c, dst_node_id=n, message_type=UNMASK, group_id="1") for n, c in requests.items()])

    # assert: the declined sites masked nothing and refuse to unmask; one share of b_0 is all it has
    assert sorted(masked) == ["site-0"]
    mask_refusals = [f for f in attack.failures if f.startswith("mask:")]
    assert len(mask_refusals) == 3 and all(error_reason("nothing-to-mask") in f for f in mask_refusals)
    shares = [m for m in replies if "secagg" in m.content.config_records]
    refused = [m for m in replies if "privacy" in m.content.config_records]
    assert len(shares) == 1 and len(refused) == 3
    assert all(m.content.config_records["privacy"]["reason"] == error_reason("secagg-abort") for m in refused)
    assert len(shares[0].content.config_records["secagg"]["b_shares"]) == 1  # type: ignore[arg-type]
    assert server.threshold == 3  # three shares are needed to rebuild site-0's self-mask seed
    for site in SPENT:
        assert [e.round for e in attack.ledger(site).entries if e.run == RUN_ID] == []  # never charged here
        assert attack.releases(site, 1) == []
