"""The consistency round on a sparse graph (``common/secagg/consistency.py``): one signed survivor set per round."""

from __future__ import annotations

import numpy as np
import pytest

from common.secagg import (
    COMPLETE,
    ConflictingSurvivors,
    OutOfOrder,
    ReplayDetected,
    Session,
    SiteIdentity,
    TooFewSurvivors,
    UncertifiedSurvivors,
    UnknownParticipant,
    consistency_quorum,
    survivors_payload,
)
from tests.test_secagg_harness import (
    SESSION,
    Federation,
    certify,
    exact_sum,
    make_federation,
    run_round,
    unmask_as_asked,
)

N, K, LENGTH = 30, 10, 8  # quorum ⌊2·30/3⌋ + 1 = 21 signers


def _inputs(fed: Federation, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # test inputs only
    return {s: rng.integers(0, 2**64, LENGTH, dtype=np.uint64) for s in fed.sites}


def _masked_round(fed: Federation, round: int, skip: set[str] | frozenset[str] = frozenset()) -> None:
    fed.server.begin_round(round)
    for s in fed.sites:
        if s not in skip:
            fed.server.receive_masked(s, fed.clients[s].mask(round, np.zeros(LENGTH, dtype=np.uint64)))


def test_two_certified_survivor_sets_share_more_than_a_third_of_the_participants():
    # prepare / act
    quorums = {n: consistency_quorum(n) for n in range(3, 2001)}

    # assert: two quorums overlap in 2q − n sites, each of which would have signed twice
    assert all(2 * q - n > n / 3 and q <= n for n, q in quorums.items())
    assert quorums[30] == 21 and quorums[6] == 5


FORGERIES = ["another setup", "another round", "a key not in the roster", "another set", "garbage"]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_forged_replayed_and_foreign_signatures_are_refused(forgery: str):
    # prepare: round 1 masked by everyone but site-9, the true survivors certified
    fed = make_federation(N, LENGTH, degree=K)
    _masked_round(fed, 1, skip={"site-9"})
    certificate = certify(fed, 1)
    alive = list(fed.server.consistency_request())
    requests = fed.server.unmask_requests()
    site, other = "site-0", "site-3"
    _, dead, s_cts, b_cts = requests[site]
    other_session = Session(SESSION.run_id, SESSION.setup_id + 1)
    forged = {  # a signature of ``other`` as a server could obtain or make it
        "another setup": fed.identities[other].sign(survivors_payload(other_session, 1, alive)),
        "another round": fed.identities[other].sign(survivors_payload(SESSION, 2, alive)),
        "a key not in the roster": SiteIdentity.generate(other).sign(survivors_payload(SESSION, 1, alive)),
        "another set": fed.identities[other].sign(survivors_payload(SESSION, 1, alive[:-1])),
        "garbage": bytes(64),
    }
    quorum = consistency_quorum(N)

    # act / assert: one bad signature among valid ones, a dropped site's genuine one, too few, none
    assert set(forged) == set(FORGERIES)
    with pytest.raises(UncertifiedSurvivors, match=rf"\['{other}'\] .* do not verify"):
        fed.clients[site].unmask(1, alive, dead, s_cts, b_cts, signatures={**certificate, other: forged[forgery]},
                                 roster=fed.roster)
    dropped_signed = fed.identities["site-9"].sign(survivors_payload(SESSION, 1, alive))
    with pytest.raises(UncertifiedSurvivors, match="not among them"):
        fed.clients[site].unmask(1, alive, dead, s_cts, b_cts, signatures={**certificate, "site-9": dropped_signed},
                                 roster=fed.roster)
    too_few = dict(sorted(certificate.items())[: quorum - 1])
    with pytest.raises(UncertifiedSurvivors, match=f"need {quorum}"):
        fed.clients[site].unmask(1, alive, dead, s_cts, b_cts, signatures=too_few, roster=fed.roster)
    with pytest.raises(UncertifiedSurvivors, match="no signed survivor set"):
        fed.clients[site].unmask(1, alive, dead, s_cts, b_cts)
    # and the genuine certificate is still answered: nothing above counted as released
    reply = unmask_as_asked(fed, site, 1, requests[site])
    assert set(reply.b_shares) == set(b_cts) and set(reply.s_shares) == set(s_cts)


def test_the_dead_list_must_be_the_complement_of_the_certified_set():
    # prepare
    fed = make_federation(N, LENGTH, degree=K)
    _masked_round(fed, 1, skip={"site-9"})
    certificate = certify(fed, 1)
    alive, dead, _, b_cts = fed.server.unmask_requests()["site-0"]

    # act / assert: a dead list that leaves out the dropped site tells another story
    assert dead == ["site-9"]
    with pytest.raises(ConflictingSurvivors, match="not the participants outside"):
        fed.clients["site-0"].unmask(1, alive, [], {}, b_cts, signatures=certificate, roster=fed.roster)


def test_a_hospital_never_signs_two_survivor_sets_for_one_round():
    # prepare
    fed = make_federation(N, LENGTH, degree=K)
    _masked_round(fed, 1)
    site, everyone = "site-0", fed.sites
    fewer = [s for s in everyone if s != "site-7"]

    # act
    first = fed.clients[site].sign_survivors(1, everyone)
    again = fed.clients[site].sign_survivors(1, list(reversed(everyone)))
    restored = type(fed.clients[site]).from_bytes(fed.clients[site].to_bytes(), fed.identities[site])

    # assert: the same set again is the same signature; another set is refused, also after a state round trip
    assert again == first
    with pytest.raises(ConflictingSurvivors, match="one set per round"):
        fed.clients[site].sign_survivors(1, fewer)
    with pytest.raises(ConflictingSurvivors, match="one set per round"):
        restored.sign_survivors(1, fewer)
    # nor unmasks for another set, even one the others certified
    others = {s: fed.clients[s].sign_survivors(1, fewer) for s in fewer if s != site}
    with pytest.raises(ConflictingSurvivors, match="another survivor set"):
        fed.clients[site].unmask(1, fewer, ["site-7"], {}, {}, signatures=others, roster=fed.roster)
    # the next round is a new round: a new set may be signed
    fed.clients[site].mask(2, np.zeros(LENGTH, dtype=np.uint64))
    assert fed.clients[site].sign_survivors(2, fewer)


def test_a_hospital_that_unmasked_for_a_certified_set_signs_no_other():
    # prepare: site-0 missed the consistency message but answers the certified unmask request
    fed = make_federation(N, LENGTH, degree=K)
    _masked_round(fed, 1)
    certify(fed, 1, silent={"site-0"})
    unmask_as_asked(fed, "site-0", 1, fed.server.unmask_requests()["site-0"])
    stranger = next(s for s in fed.sites if s not in fed.server.graph.group("site-0"))

    # act / assert: (a stranger, so that the refusal is not the cross-round rule on released b-shares)
    with pytest.raises(ConflictingSurvivors, match="one set per round"):
        fed.clients["site-0"].sign_survivors(1, [s for s in fed.sites if s != stranger])


def test_a_hospital_signs_only_a_set_it_would_unmask():
    # prepare
    fed = make_federation(N, LENGTH, degree=K)
    _masked_round(fed, 1)
    quorum = consistency_quorum(N)

    # act / assert: a set without it, one too small to be certified, a round it did not mask
    with pytest.raises(UnknownParticipant, match="not in the survivor set"):
        fed.clients["site-0"].sign_survivors(1, fed.sites[1:])
    with pytest.raises(TooFewSurvivors, match=f"fewer than {quorum}"):
        fed.clients["site-0"].sign_survivors(1, fed.sites[: quorum - 1])
    with pytest.raises(ReplayDetected, match="current round is 1"):
        fed.clients["site-0"].sign_survivors(2, fed.sites)


def test_dropouts_between_the_consistency_round_and_unmasking_still_give_the_exact_sum():
    # prepare: site-2 never masks, 3 survivors never sign, 3 others sign but never answer the unmask request
    fed = make_federation(N, LENGTH, degree=K)
    xs = _inputs(fed, 1)
    order = fed.server.graph.order
    dropped, silent, gone = {order[0]}, {order[10], order[20], order[25]}, {order[5], order[15], order[28]}

    # act
    total, alive = run_round(fed, 1, xs, drop_before_mask=dropped, drop_at_consistency=silent, drop_at_unmask=gone)

    # assert
    assert alive == sorted(set(fed.sites) - dropped)
    assert len(fed.server.certificate) == consistency_quorum(N) < N - 4  # a quorum is enough, and all it sends
    assert not set(fed.server.certificate) & (dropped | silent)
    np.testing.assert_array_equal(total, exact_sum(xs, alive))


def test_the_server_asks_for_shares_only_with_a_certified_set():
    # prepare
    fed = make_federation(N, LENGTH, degree=K)
    _masked_round(fed, 1)

    # act / assert: not before the consistency round, not with fewer signatures than the quorum
    with pytest.raises(OutOfOrder, match="consistency round"):
        fed.server.unmask_requests()
    alive = fed.server.consistency_request()
    for s in alive[: consistency_quorum(N) - 1]:
        fed.server.receive_signature(s, fed.clients[s].sign_survivors(1, alive))
    with pytest.raises(TooFewSurvivors, match="signed the survivor set"):
        fed.server.unmask_requests()


def test_too_few_survivors_to_certify_abort_before_anyone_signs():
    # prepare: 10 of 30 drop, spread so that every neighbourhood keeps its threshold
    fed = make_federation(N, LENGTH, degree=K)
    _masked_round(fed, 1, skip={fed.server.graph.order[i] for i in range(0, N, 3)})

    # act / assert
    with pytest.raises(TooFewSurvivors, match="two thirds"):
        fed.server.consistency_request()


def test_the_complete_graph_has_no_consistency_round():
    # prepare
    fed = make_federation(6, LENGTH, degree=COMPLETE)
    xs = _inputs(fed, 2)

    # act: the round runs without any signature (run_round skips the stage on the complete graph)
    total, alive = run_round(fed, 1, xs, drop_before_mask={"site-1"})

    # assert
    assert fed.server.quorum == 0 and fed.server.certificate == {}
    np.testing.assert_array_equal(total, exact_sum(xs, alive))
