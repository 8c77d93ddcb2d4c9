"""Correctness of secure aggregation: the server's output is exactly Σ_alive x_u mod 2^64."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.secagg import (
    ActiveDeadOverlap,
    KeyAdvert,
    MaskedInput,
    Roster,
    SecAggClient,
    SecAggServer,
    Share,
    UnmaskReply,
    default_threshold,
)
from tests.test_secagg_harness import SESSION, exact_sum, identities_for, make_federation, run_round, started

U64_MAX = 2**64 - 1


def test_golden_three_sites_four_elements():
    # prepare: explicit values, one element wraps around 2^64
    fed = make_federation(3, 4)
    xs = {
        "site-0": np.array([1, 2, 3, U64_MAX], dtype=np.uint64),
        "site-1": np.array([10, 20, 30, 1], dtype=np.uint64),
        "site-2": np.array([100, 200, 300, 5], dtype=np.uint64),
    }

    # act
    total, alive = run_round(fed, 1, xs)

    # assert: (2^64 - 1) + 1 + 5 = 5 mod 2^64
    assert alive == ["site-0", "site-1", "site-2"]
    assert total.tolist() == [111, 222, 333, 5]


def test_golden_one_dropout_before_masking():
    # prepare: n = 4, t = 3; site-3 never sends y, so its pairwise masks must be removed via s-shares
    fed = make_federation(4, 4)
    xs = {f"site-{i}": np.array([i, 10 * i, 100 * i, 7], dtype=np.uint64) for i in range(4)}

    # act
    total, alive = run_round(fed, 1, xs, drop_before_mask={"site-3"})

    # assert: 0+1+2, 0+10+20, 0+100+200, 3·7
    assert alive == ["site-0", "site-1", "site-2"]
    assert total.tolist() == [3, 30, 300, 21]


@st.composite
def scenarios(draw):
    n = draw(st.integers(3, 7))
    t = draw(st.integers(default_threshold(n), n))
    length = draw(st.integers(1, 300))
    sites = [f"site-{i}" for i in range(n)]
    xs = {s: draw(hnp.arrays(np.uint64, length)) for s in sites}
    dead = draw(st.sets(st.sampled_from(sites), max_size=n - t))
    alive = sorted(set(sites) - dead)
    silent = draw(st.sets(st.sampled_from(alive), max_size=len(alive) - t))
    return n, t, length, xs, dead, silent


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_sum_is_exact_under_random_dropouts(scenario):
    # prepare
    n, t, length, xs, dead, silent = scenario
    fed = make_federation(n, length, threshold=t)

    # act
    total, alive = run_round(fed, 1, xs, drop_before_mask=dead, drop_at_unmask=silent)

    # assert
    assert alive == sorted(set(xs) - dead)
    assert total.dtype == np.uint64
    np.testing.assert_array_equal(total, exact_sum(xs, alive))


def test_rounds_reuse_one_setup_and_a_dropped_site_stays_out():
    # prepare: n = 5, t = 3; site-4 drops before round 1 and is then retired for this setup
    fed = make_federation(5, 6)
    rng = np.random.default_rng(1)  # test inputs only; masks and keys never use numpy randomness
    rounds = [{s: rng.integers(0, 2**64, 6, dtype=np.uint64) for s in fed.sites} for _ in range(3)]

    # act
    first = run_round(fed, 1, rounds[0], drop_before_mask={"site-4"})
    later = [run_round(fed, r, {s: rounds[r - 1][s] for s in fed.server.eligible}) for r in (2, 3)]

    # assert
    live = ["site-0", "site-1", "site-2", "site-3"]
    assert fed.server.eligible == tuple(live)
    for (total, alive), xs in zip([first, *later], rounds, strict=True):
        assert alive == live
        np.testing.assert_array_equal(total, exact_sum(xs, live))


def test_site_dropping_after_an_aggregated_round_needs_a_new_setup():
    # prepare: site-4 contributes in round 1, then is silent in round 2
    fed = make_federation(5, 3)
    xs = {s: np.full(3, 9, dtype=np.uint64) for s in fed.sites}
    run_round(fed, 1, xs)

    # act / assert: revealing its s key would unmask its round-1 update
    with pytest.raises(ActiveDeadOverlap, match="new setup"):
        run_round(fed, 2, xs, drop_before_mask={"site-4"})


def test_state_round_trips_between_every_message():
    # prepare: every client is serialized after every step, as it would be between Flower messages
    identities = identities_for(3)
    roster = Roster({s: i.public_key() for s, i in identities.items()})
    clients, adverts = started(identities)
    xs = {s: np.array([i + 1, 2**63 + i], dtype=np.uint64) for i, s in enumerate(sorted(identities))}

    def reload(site: str) -> None:
        clients[site] = SecAggClient.from_bytes(clients[site].to_bytes(), identities[site])

    # act
    for s in clients:
        reload(s)
    s_cts = {s: c.share_keys(adverts, roster, 3) for s, c in clients.items()}
    server = SecAggServer(SESSION, adverts, 3, 2)
    server.route_s_shares(s_cts)
    server.begin_round(1)
    for s in sorted(clients):
        reload(s)
        server.receive_masked(s, clients[s].mask(1, xs[s]))
        reload(s)
    for s, req in server.unmask_requests().items():
        server.receive_unmask(s, clients[s].unmask(1, *req))
        reload(s)
    total, alive = server.aggregate()

    # assert: state kept (participants, threshold, round) and the sum exact
    c0 = clients["site-0"]
    assert alive == ["site-0", "site-1", "site-2"]
    assert (c0.participants, c0.threshold, c0.round, c0.session) == (("site-0", "site-1", "site-2"), 3, 1, SESSION)
    assert total.tolist() == [6, (3 * 2**63 + 3) % 2**64]


def test_every_message_survives_its_byte_encoding():
    # prepare: adverts, s-shares, masked inputs and replies all travel as bytes
    fed = make_federation(4, 5)
    xs = {s: np.arange(5, dtype=np.uint64) * (i + 1) for i, s in enumerate(fed.sites)}
    server = fed.server

    # act
    adverts = {s: KeyAdvert.from_bytes(a.to_bytes()) for s, a in fed.adverts.items()}
    server.begin_round(1)
    for s in fed.sites:
        server.receive_masked(s, MaskedInput.from_bytes(fed.clients[s].mask(1, xs[s]).to_bytes()))
    for s, req in server.unmask_requests().items():
        server.receive_unmask(s, UnmaskReply.from_bytes(fed.clients[s].unmask(1, *req).to_bytes()))
    total, _ = server.aggregate()

    # assert
    assert adverts == fed.adverts
    assert Share.from_bytes(Share(3, 2**520).to_bytes()) == Share(3, 2**520)
    assert total.tolist() == [0, 10, 20, 30, 40]  # Σ (i+1) = 10 per unit of arange
