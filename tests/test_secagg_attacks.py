"""Every attack or misuse the protocol guards against is refused with its specific abort."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg import (
    ActiveDeadOverlap,
    InconsistentShares,
    KeyAdvert,
    KeySwapDetected,
    Quantizer,
    ReplayDetected,
    Roster,
    SecAggClient,
    SecAggServer,
    Session,
    Share,
    SiteIdentity,
    StateRejected,
    TooFewSurvivors,
    UnknownParticipant,
    UnmaskReply,
    UnmaskRequest,
    ValueOutOfRange,
)
from tests.test_secagg_harness import SESSION, Federation, identities_for, make_federation, run_round, started


def _setup(n: int = 4):
    """(identities, roster, clients, adverts) after round 0, before share_keys."""
    identities = identities_for(n)
    roster = Roster({s: i.public_key() for s, i in identities.items()})
    clients, adverts = started(identities)
    return identities, roster, clients, adverts


def _masked_round(fed: Federation, round: int, senders: list[str] | None = None) -> dict[str, UnmaskRequest]:
    """Begin ``round``, let ``senders`` (default: all eligible) mask zeros, return the honest requests."""
    fed.server.begin_round(round)
    for s in fed.server.eligible if senders is None else senders:
        fed.server.receive_masked(s, fed.clients[s].mask(round, np.zeros(2, dtype=np.uint64)))
    return fed.server.unmask_requests()


# --- key substitution (server as man in the middle at setup) -----------------------------------


@pytest.mark.parametrize("field", ["c_pk", "s_pk"])
def test_swapped_public_key_is_detected_by_every_site(field):
    # prepare: the server substitutes its own X25519 key in site-1's advert, keeping the signature
    _, roster, clients, adverts = _setup()
    evil = X25519PrivateKey.generate().public_key().public_bytes_raw()
    forged = {**adverts, "site-1": replace(adverts["site-1"], **{field: evil})}

    # act / assert
    for client in clients.values():
        with pytest.raises(KeySwapDetected, match="'site-1' does not verify"):
            client.share_keys(forged, roster, 3)


def test_advert_signed_with_another_sites_key_is_detected(tmp_path):
    # prepare: site-2 (or a server holding its key) signs an advert that claims to be site-1's
    identities, roster, clients, adverts = _setup()
    evil = X25519PrivateKey.generate().public_key().public_bytes_raw()
    identities["site-2"].save(tmp_path / "site-2.pem")
    impostor = SiteIdentity.load(tmp_path / "site-2.pem", "site-1")
    forged = {**adverts, "site-1": KeyAdvert.signed(impostor, SESSION, evil, evil)}

    # act / assert
    with pytest.raises(KeySwapDetected, match="'site-1' does not verify"):
        clients["site-0"].share_keys(forged, roster, 3)


def test_site_copying_another_sites_public_key_is_detected():
    # prepare: site-3 (a roster member) signs an advert that reuses site-0's c key
    identities, roster, clients, adverts = _setup()
    copy = KeyAdvert.signed(identities["site-3"], SESSION, adverts["site-0"].c_pk, adverts["site-3"].s_pk)

    # act / assert
    with pytest.raises(KeySwapDetected, match="same public key"):
        clients["site-1"].share_keys({**adverts, "site-3": copy}, roster, 3)


def test_advert_of_a_site_outside_the_roster_is_detected():
    # prepare
    _, roster, clients, adverts = _setup()
    _, mallory_advert = SecAggClient.start(SiteIdentity.generate("mallory"), SESSION)

    # act / assert
    with pytest.raises(KeySwapDetected, match="'mallory' is not in the roster"):
        clients["site-0"].share_keys({**adverts, "mallory": mallory_advert}, roster, 3)


def test_advert_filed_under_another_name_is_detected():
    _, roster, clients, adverts = _setup()
    shuffled = {**adverts, "site-1": adverts["site-2"], "site-2": adverts["site-1"]}
    with pytest.raises(KeySwapDetected, match="delivered as 'site-1'"):
        clients["site-0"].share_keys(shuffled, roster, 3)


@pytest.mark.parametrize("stale", [Session(run_id=10, setup_id=2), Session(run_id=11, setup_id=1)])
def test_advert_from_another_run_or_setup_is_a_replay(stale):
    # prepare: a genuine, correctly signed advert of site-3, but from another session
    identities, roster, clients, adverts = _setup()
    _, old_advert = SecAggClient.start(identities["site-3"], stale)

    # act / assert
    with pytest.raises(ReplayDetected, match="'site-3' is for Session"):
        clients["site-0"].share_keys({**adverts, "site-3": old_advert}, roster, 3)
    with pytest.raises(ReplayDetected):
        SecAggServer(SESSION, {**adverts, "site-3": old_advert}, 3, 2)


# --- unmasking: overlap, too few, unknown, replay ----------------------------------------------


def test_site_declared_alive_and_dead_is_refused():
    fed = make_federation(4, 2)
    alive, _, _, b_cts = _masked_round(fed, 1)["site-0"]
    with pytest.raises(ActiveDeadOverlap, match=r"\['site-3'\] are declared both alive and dead"):
        fed.clients["site-0"].unmask(1, alive, ["site-3"], {}, b_cts)


def test_s_share_of_an_alive_site_is_refused():
    # prepare: site-3 sent y, but the server asks for its mask-key share as if it were dead
    fed = make_federation(4, 2)
    alive, dead, _, b_cts = _masked_round(fed, 1)["site-0"]
    s_cts = {"site-3": fed.s_share_cts["site-3"]["site-0"]}
    del b_cts["site-3"]

    # act / assert
    with pytest.raises(ActiveDeadOverlap, match="contradicts their alive/dead status"):
        fed.clients["site-0"].unmask(1, alive, dead, s_cts, b_cts)


def test_site_alive_in_an_earlier_round_cannot_be_declared_dead():
    # prepare: site-3 contributed to round 1 (its b-shares released); in round 2 it stays silent
    fed = make_federation(4, 2)
    run_round(fed, 1, {s: np.zeros(2, dtype=np.uint64) for s in fed.sites})
    fed.server.begin_round(2)
    masked = {s: fed.clients[s].mask(2, np.zeros(2, dtype=np.uint64)) for s in ["site-0", "site-1", "site-2"]}
    for s, m in masked.items():
        fed.server.receive_masked(s, m)

    # act / assert: the honest server refuses before asking, and a site refuses a lying server
    with pytest.raises(ActiveDeadOverlap, match="new setup"):
        fed.server.unmask_requests()
    b_cts = {s: m.b_share_cts["site-0"] for s, m in masked.items()}
    s_cts = {"site-3": fed.s_share_cts["site-3"]["site-0"]}
    with pytest.raises(ActiveDeadOverlap, match=r"\['site-3'\] changed between alive and dead"):
        fed.clients["site-0"].unmask(2, sorted(masked), ["site-3"], s_cts, b_cts)


@pytest.mark.parametrize(("n", "survivors"), [(5, 2), (7, 3)])  # below 3; at least 3 but below t = 4
def test_too_few_survivors_abort_server_and_sites(n, survivors):
    # prepare
    fed = make_federation(n, 2)
    senders = fed.sites[:survivors]
    fed.server.begin_round(1)
    masked = {s: fed.clients[s].mask(1, np.zeros(2, dtype=np.uint64)) for s in senders}
    for s, m in masked.items():
        fed.server.receive_masked(s, m)
    b_cts = {s: m.b_share_cts[senders[0]] for s, m in masked.items()}
    dead = fed.sites[survivors:]

    # act / assert
    with pytest.raises(TooFewSurvivors, match=f"{survivors} masked inputs in round 1"):
        fed.server.unmask_requests()
    with pytest.raises(TooFewSurvivors, match=f"only {survivors} sites alive"):
        fed.clients[senders[0]].unmask(1, senders, dead, {}, b_cts)


def test_too_few_unmask_replies_abort_aggregation():
    # prepare: n = 5, t = 3, everyone sent y but only two answer the unmask request
    fed = make_federation(5, 2)
    requests = _masked_round(fed, 1)
    for s in ["site-0", "site-1"]:
        fed.server.receive_unmask(s, fed.clients[s].unmask(1, *requests[s]))

    # act / assert
    with pytest.raises(TooFewSurvivors, match="only 2 b-shares of 'site-0'"):
        fed.server.aggregate()


def test_too_few_adverts_abort_setup():
    _, roster, clients, adverts = _setup(3)
    two = {s: adverts[s] for s in ["site-0", "site-1"]}
    with pytest.raises(TooFewSurvivors, match="2 sites advertised keys, need at least 3"):
        clients["site-0"].share_keys(two, roster, 3)


def test_a_hospitals_own_min_participants_aborts_a_smaller_session_and_a_smaller_sum():
    # prepare: a hospital that takes part only in sums of at least 4; a server content with 3
    _, roster, clients, adverts = _setup(4)
    three = {s: adverts[s] for s in ["site-0", "site-1", "site-2"]}
    fed = make_federation(5, 2)
    _masked_round(fed, 1, senders=["site-0", "site-1", "site-2"])
    requests = fed.server.unmask_requests()
    # act / assert: the setup of three is refused by the hospital, not only by the server
    with pytest.raises(TooFewSurvivors, match="3 sites advertised keys, need at least 4"):
        clients["site-0"].share_keys(three, roster, 3, min_participants=4)
    # and so is releasing shares for a sum of three survivors
    with pytest.raises(TooFewSurvivors, match="only 3 sites alive in round 1, need 4"):
        fed.clients["site-0"].unmask(1, *requests["site-0"], min_participants=4)


def test_previous_rounds_ciphertexts_are_a_replay():
    # prepare: round 1 completes; in round 2 the server presents round-1 b-share ciphertexts
    fed = make_federation(4, 2)
    run_round(fed, 1, {s: np.zeros(2, dtype=np.uint64) for s in fed.sites})
    old_alive, old_dead, _, old_b_cts = fed.requests[1]["site-0"]
    alive, dead, _, _ = _masked_round(fed, 2)["site-0"]

    # act / assert
    with pytest.raises(ReplayDetected, match="does not authenticate"):
        fed.clients["site-0"].unmask(2, alive, dead, {}, old_b_cts)
    with pytest.raises(ReplayDetected, match="current round is 2"):
        fed.clients["site-0"].unmask(1, old_alive, old_dead, {}, old_b_cts)
    with pytest.raises(ReplayDetected, match="not after this site's last masked round 2"):
        fed.clients["site-0"].mask(2, np.zeros(2, dtype=np.uint64))


def test_s_shares_from_another_setup_are_a_replay():
    # prepare: the same four sites ran setup 2 and setup 3; site-3 drops in setup 3, and the server
    # hands out setup-2 s-share ciphertexts of site-3 instead of the setup-3 ones
    fed_new = make_federation(4, 2, session=Session(11, 3))
    alive, dead, s_cts, b_cts = _masked_round(fed_new, 1, ["site-0", "site-1", "site-2"])["site-0"]
    fed_old = make_federation(4, 2)
    stale = {"site-3": fed_old.s_share_cts["site-3"]["site-0"]}

    # act / assert
    assert set(s_cts) == {"site-3"}
    with pytest.raises(ReplayDetected, match="s-share from 'site-3'"):
        fed_new.clients["site-0"].unmask(1, alive, dead, stale, b_cts)


def test_site_that_never_took_part_is_unknown():
    # prepare
    fed = make_federation(4, 2)
    alive, dead, s_cts, b_cts = _masked_round(fed, 1)["site-0"]
    client = fed.clients["site-0"]

    # act / assert: in alive, in dead, as a ciphertext sender, and this site itself left out
    with pytest.raises(UnknownParticipant, match=r"\['mallory'\] took no part"):
        client.unmask(1, [*alive, "mallory"], dead, s_cts, b_cts)
    with pytest.raises(UnknownParticipant, match=r"\['mallory'\] took no part"):
        client.unmask(1, alive, ["mallory"], s_cts, b_cts)
    with pytest.raises(UnknownParticipant, match=r"\['mallory'\] took no part"):
        client.unmask(1, alive, dead, s_cts, {**b_cts, "mallory": b_cts["site-1"]})
    others = [s for s in alive if s != "site-0"]
    with pytest.raises(UnknownParticipant, match="not in the alive set"):
        client.unmask(1, others, dead, s_cts, {s: b_cts[s] for s in others})
    with pytest.raises(UnknownParticipant, match="'mallory' did not take part"):
        fed.server.receive_masked("mallory", fed.clients["site-1"].mask(2, np.zeros(2, dtype=np.uint64)))


# --- data, shares, state --------------------------------------------------------------------------


def test_out_of_range_update_is_refused_not_clipped():
    q = Quantizer(np.full(3, 0.5))
    with pytest.raises(ValueOutOfRange, match=r"element 1 = 1000000\.0 is outside its bound \[-0\.5, 0\.5\]"):
        q.encode(np.array([0.1, 1e6, -0.2]))


def test_corrupted_share_from_a_cheating_site_is_detected():
    # prepare: n = 5, t = 3, all reply; site-4 returns a wrong b-share for site-0
    fed = make_federation(5, 2)
    for s, req in _masked_round(fed, 1).items():
        reply = fed.clients[s].unmask(1, *req)
        if s == "site-4":
            bad = Share(5, reply.b_shares["site-0"].y ^ 1)
            reply = UnmaskReply({**reply.b_shares, "site-0": bad}, reply.s_shares)
        fed.server.receive_unmask(s, reply)

    # act / assert
    with pytest.raises(InconsistentShares, match="self-mask seed of 'site-0'"):
        fed.server.aggregate()


def test_threshold_below_three_or_without_majority_is_a_configuration_error():
    _, roster, clients, adverts = _setup(6)
    with pytest.raises(ValueError, match="threshold must be >= 3"):
        clients["site-0"].share_keys(adverts, roster, 2)
    with pytest.raises(ValueError, match="not a majority of 6 participants"):
        clients["site-0"].share_keys(adverts, roster, 3)


def test_state_of_another_site_or_tampered_state_is_rejected():
    # prepare
    fed = make_federation(3, 2)
    blob = fed.clients["site-0"].to_bytes()
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])

    # act / assert
    with pytest.raises(StateRejected, match="'site-1'"):
        SecAggClient.from_bytes(blob, fed.identities["site-1"])
    with pytest.raises(StateRejected):
        SecAggClient.from_bytes(tampered, fed.identities["site-0"])
