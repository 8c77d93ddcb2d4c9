"""SecAgg+ on a sparse graph (Bell et al., CCS 2020): exact sums, neighbour-only work, refusals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import common.secagg.client as client_module
import common.secagg.server as server_module
from common.secagg import (
    COMPLETE,
    CommGraph,
    ConflictingSurvivors,
    GraphDisconnected,
    GraphMismatch,
    IncompleteSetup,
    InconsistentSurvivors,
    NeighbourhoodBelowThreshold,
    Roster,
    SecAggClient,
    SecAggServer,
    Session,
    SparseGraphRefused,
    UncertifiedSurvivors,
    consistency_quorum,
    default_threshold,
    effective_degree,
)
from common.secagg.graph import graph_seed
from common.secagg.shamir import Share
from tests.test_secagg_harness import (
    SESSION,
    Federation,
    certify,
    exact_sum,
    identities_for,
    make_federation,
    run_round,
    started,
    unmask_as_asked,
)

N, K, LENGTH = 30, 10, 16  # K + 1 = 11 holders per secret, majority threshold 6


def _inputs(fed: Federation, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # test inputs only; masks and keys never use numpy randomness
    return {s: rng.integers(0, 2**64, LENGTH, dtype=np.uint64) for s in fed.sites}


def _spread(graph: CommGraph, count: int, offset: int) -> set[str]:
    """``count`` sites spread evenly around the ring (no neighbourhood loses more than 2)."""
    step = len(graph.order) // count
    return {graph.order[(offset + i * step) % len(graph.order)] for i in range(count)}


@pytest.fixture(scope="module")
def sparse() -> Federation:
    return make_federation(N, LENGTH, degree=K)


def test_sparse_graph_is_k_regular_and_every_party_derives_the_same_one(sparse: Federation):
    # prepare / act: the graph each site derived in share_keys, the server's, and a fresh derivation
    again = CommGraph.of_session(SESSION, dict(reversed(list(sparse.adverts.items()))), K)

    # assert
    graph = sparse.server.graph
    assert not graph.complete and graph.degree == K and graph.group_size == K + 1
    assert {len(graph.neighbours(s)) for s in sparse.sites} == {K}
    assert all(u in graph.neighbours(v) for u in sparse.sites for v in graph.neighbours(u))  # undirected
    assert all(c.graph is not None and c.graph.edges() == graph.edges() for c in sparse.clients.values())
    assert again.edges() == graph.edges() and again.order == graph.order
    assert sparse.threshold == 6


def test_graph_depends_on_the_session_and_on_every_advert():
    # prepare: two setups of the same sites, and the same setup with one site's fresh advert
    identities = identities_for(N)
    _, adverts = started(identities)
    _, other_setup = started(identities, Session(SESSION.run_id, SESSION.setup_id + 1))
    _, readvertised = started({"site-7": identities["site-7"]})

    # act
    base = CommGraph.of_session(SESSION, adverts, K)
    moved = CommGraph.of_session(other_setup[next(iter(other_setup))].session, other_setup, K)
    one_changed = CommGraph.of_session(SESSION, {**adverts, **readvertised}, K)

    # assert: a new seed gives a new ring order (the server cannot keep a graph it likes)
    assert graph_seed(SESSION, adverts) != graph_seed(SESSION, {**adverts, **readvertised})
    assert len({base.order, moved.order, one_changed.order}) == 3


def test_sparse_sum_is_exact_without_dropouts(sparse: Federation):
    # prepare
    xs = _inputs(sparse, 1)

    # act
    total, alive = run_round(sparse, 1, xs)

    # assert
    assert alive == sparse.sites
    np.testing.assert_array_equal(total, exact_sum(xs, alive))


def test_sparse_sum_is_exact_with_dropouts_before_and_after_masking():
    # prepare: 3 sites never send y (their pairwise masks go via s-shares of their neighbours),
    # 3 others send y but never answer the unmask request
    fed = make_federation(N, LENGTH, degree=K)
    xs = _inputs(fed, 2)
    dropped = _spread(fed.server.graph, 3, 0)
    silent = _spread(fed.server.graph, 3, 5) - dropped

    # act
    total, alive = run_round(fed, 1, xs, drop_before_mask=dropped, drop_at_unmask=silent)

    # assert
    assert alive == sorted(set(fed.sites) - dropped) and len(silent) == 3
    np.testing.assert_array_equal(total, exact_sum(xs, alive))


def _counting(monkeypatch: pytest.MonkeyPatch, name: str, module: Any = client_module) -> list[Any]:
    """Calls of ``<module>.<name>`` (default: the client's) from now on (the function still runs)."""
    calls: list[Any] = []
    real: Callable[..., Any] = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("peer", args[0] if args else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("degree", [K, COMPLETE])
def test_a_site_masks_and_shares_with_its_neighbours_only(degree: int, monkeypatch: pytest.MonkeyPatch):
    # prepare
    fed = make_federation(N, LENGTH, degree=degree)
    site = "site-3"
    neighbours = fed.server.graph.neighbours(site)
    agreements, streams = _counting(monkeypatch, "x25519"), _counting(monkeypatch, "prg_words")

    # act
    fed.server.begin_round(1)
    masked = fed.clients[site].mask(1, np.zeros(LENGTH, dtype=np.uint64))

    # assert: k key agreements, k pairwise streams + 1 self-mask stream, k + 1 b-shares
    k = effective_degree(N, degree)
    assert len(neighbours) == k
    assert sorted(agreements) == sorted(neighbours)
    assert len(streams) == k + 1
    assert set(masked.b_share_cts) == neighbours | {site}
    assert set(fed.s_share_cts[site]) == neighbours | {site}


def test_the_server_removes_a_dropped_sites_masks_from_its_neighbours_only(monkeypatch: pytest.MonkeyPatch):
    # prepare: one site drops before masking
    fed = make_federation(N, LENGTH, degree=K)
    xs = _inputs(fed, 3)
    streams = _counting(monkeypatch, "prg_words", server_module)

    # act
    total, alive = run_round(fed, 1, xs, drop_before_mask={"site-9"})

    # assert: one self-mask stream per survivor, one pairwise stream per neighbour of the dropped site (not n − 1)
    assert len(streams) == (N - 1) + K
    np.testing.assert_array_equal(total, exact_sum(xs, alive))


def test_unmask_request_for_a_non_neighbour_is_refused(sparse: Federation):
    # prepare: an honest round-2 request to site-0, plus a share of a site outside its neighbourhood
    fed = sparse
    fed.server.begin_round(2)
    for s in fed.sites:
        fed.server.receive_masked(s, fed.clients[s].mask(2, np.zeros(LENGTH, dtype=np.uint64)))
    certify(fed, 2)
    requests = fed.server.unmask_requests()
    site = "site-0"
    stranger = next(s for s in fed.sites if s != site and s not in fed.server.graph.neighbours(site))
    alive, dead, s_cts, b_cts = requests[site]
    forged_b = {**b_cts, stranger: next(iter(b_cts.values()))}
    forged_s = {stranger: next(iter(b_cts.values()))}

    # act / assert: refused before anything is decrypted, and nothing counts as released
    with pytest.raises(GraphMismatch, match=stranger):
        fed.clients[site].unmask(2, alive, dead, s_cts, forged_b)
    with pytest.raises(GraphMismatch, match=stranger):
        fed.clients[site].unmask(2, [a for a in alive if a != stranger], [stranger], forged_s, {})
    reply = unmask_as_asked(fed, site, 2, (alive, dead, s_cts, b_cts))
    assert set(reply.b_shares) == fed.server.graph.neighbours(site) | {site}


def test_a_server_using_another_graph_is_refused():
    # prepare: the server routes by a graph of its own choosing (another seed) instead of the derived one
    fed = make_federation(N, LENGTH, degree=K)
    real = fed.server.graph
    chosen = CommGraph.derive(fed.sites, bytes(32), K)
    site = "site-0"
    extra = sorted(chosen.neighbours(site) - real.neighbours(site))
    fed.server.begin_round(1)
    masked = {s: fed.clients[s].mask(1, np.zeros(LENGTH, dtype=np.uint64)) for s in fed.sites}
    b_cts = {u: masked[u].b_share_cts.get(site, b"\0" * 98) for u in chosen.neighbours(site) | {site}}

    # act / assert
    assert extra
    with pytest.raises(GraphMismatch, match="another graph"):
        fed.clients[site].unmask(1, fed.sites, [], {}, b_cts)


def test_server_refuses_key_shares_routed_off_the_graph():
    # prepare: site-1 shares its key with everyone instead of its neighbourhood
    fed = make_federation(N, LENGTH, degree=K)
    everyone = {**fed.s_share_cts["site-1"], **{s: b"x" for s in fed.sites}}

    # act / assert
    server = SecAggServer(SESSION, fed.adverts, fed.threshold, LENGTH, degree=K)
    with pytest.raises(IncompleteSetup, match="neighbourhood"):
        server.route_s_shares({**fed.s_share_cts, "site-1": everyone})


def test_a_neighbourhood_below_threshold_aborts_at_server_and_site():
    # prepare: 6 of site-0's 10 neighbours drop, leaving 5 holders of its 11 shares (t = 6)
    fed = make_federation(N, LENGTH, degree=K)
    graph = fed.server.graph
    dropped = set(sorted(graph.neighbours("site-0"))[:6])
    xs = {s: np.zeros(LENGTH, dtype=np.uint64) for s in fed.sites}

    # act / assert: the server does not ask anyone for anything
    with pytest.raises(NeighbourhoodBelowThreshold, match="site-0"):
        run_round(fed, 1, xs, drop_before_mask=dropped)
    # and a site told the same survivors refuses too (a server that skips its own check)
    alive = sorted(set(fed.sites) - dropped)
    with pytest.raises(NeighbourhoodBelowThreshold):
        fed.clients["site-0"].unmask(1, alive, sorted(dropped), {}, {})


def test_survivors_split_in_two_parts_abort():
    # prepare: on the ring lattice H(10, 30), removing k/2 = 5 consecutive sites at two places cuts it
    graph = CommGraph.derive([f"site-{i}" for i in range(N)], bytes(range(32)), K)
    dropped = {graph.order[i] for i in (*range(0, 5), *range(15, 20))}
    alive = set(graph.participants) - dropped

    # act / assert: every neighbourhood could still be unmasked, but each half's sum would be revealed
    with pytest.raises(GraphDisconnected):
        graph.check_survivors(alive, default_threshold(K + 1))
    graph.check_survivors(alive - {graph.order[5]} | {graph.order[4]}, default_threshold(K + 1))  # one bridge left


def test_a_hospital_refuses_a_sparser_graph_than_it_accepts():
    # prepare
    identities = identities_for(N)
    roster = Roster({s: i.public_key() for s, i in identities.items()})
    clients, adverts = started(identities)
    t = default_threshold(K + 1)

    # act / assert: by default only the complete graph; an opted-in hospital down to its floor
    with pytest.raises(SparseGraphRefused, match="only the complete graph"):
        clients["site-0"].share_keys(adverts, roster, t, degree=K)
    with pytest.raises(SparseGraphRefused, match="at least 12"):
        clients["site-1"].share_keys(adverts, roster, t, degree=K, min_degree=12)
    assert clients["site-0"].participants == ()  # nothing was shared
    assert len(clients["site-2"].share_keys(adverts, roster, t, degree=K, min_degree=K)) == K + 1


def test_threshold_must_be_a_majority_of_the_neighbourhood():
    # prepare
    identities = identities_for(N)
    roster = Roster({s: i.public_key() for s, i in identities.items()})
    clients, adverts = started(identities)

    # act / assert: t = 5 of 11 holders: two disjoint groups of 5 could open both kinds of shares
    with pytest.raises(ValueError, match="not a majority of 11"):
        clients["site-0"].share_keys(adverts, roster, 5, degree=K, min_degree=K)


@pytest.mark.parametrize(("n", "degree"), [(5, 4), (7, 5), (12, COMPLETE), (12, 11), (12, 40)])
def test_small_consortia_and_large_degrees_get_the_complete_graph(n: int, degree: int):
    # prepare / act
    graph = CommGraph.derive([f"site-{i}" for i in range(n)], bytes(32), degree)

    # assert: Bonawitz et al. unchanged (the existing protocol tests run on this graph)
    assert graph.complete and graph.group_size == n
    assert all(graph.neighbours(s) == set(graph.participants) - {s} for s in graph.participants)


def test_the_graph_survives_the_state_round_trip(sparse: Federation):
    # prepare
    site = "site-4"

    # act
    restored = SecAggClient.from_bytes(sparse.clients[site].to_bytes(), sparse.identities[site])

    # assert
    assert restored.graph is not None and restored.graph.edges() == sparse.server.graph.edges()


def _assign_lies(graph: CommGraph, u: str, t: int, capacity: int) -> dict[str, set[str]]:
    """For each neighbour v of u, t holders of v's shares (not u, not v) told "v dropped", at most
    ``capacity`` lies per holder: a b-matching found by augmenting paths (Ford–Fulkerson)."""
    told: dict[str, set[str]] = {w: set() for w in graph.participants}

    def augment(v: str, seen: set[str]) -> bool:
        for w in sorted(graph.neighbours(v) - {u}):
            if w in seen or v in told[w]:
                continue
            seen.add(w)
            if len(told[w]) < capacity:
                told[w].add(v)
                return True
            for other in sorted(told[w]):  # move one of w's lies to another holder of that site
                told[w].discard(other)
                if augment(other, seen):
                    told[w].add(v)
                    return True
                told[w].add(other)
        return False

    for v in sorted(graph.neighbours(u)):
        for _ in range(t):
            assert augment(v, set()), f"no lie assignment for {v}"
    return told


@pytest.mark.parametrize("certificates", ["each story signed by whoever was told it", "the true survivors signed"])
def test_a_server_lying_about_dropouts_on_a_sparse_graph_is_refused(certificates: str):
    """The attack the consistency round stops (``common/secagg/consistency.py``, docs/privacy.md).

    The server receives every y, then tells each holder of a neighbour v's shares "v dropped"
    (at most k + 1 − t of them per holder, so every holder's graph and threshold checks pass) and
    tells u's neighbourhood "u survived". Without the consistency round each honest holder released
    one kind of share per site, as the protocol asks, and the server ended with u's self-mask seed
    and the mask keys of all of u's neighbours, which open x_u alone. Now each story must come with
    signatures on that very set from more than two thirds of the participants, and a hospital signs
    one set per round: the server either collects each story's signatures from the hospitals it
    told that story (far fewer than the quorum) or has the true survivor set signed and presents
    that certificate with the lies.
    """
    # prepare
    fed = make_federation(N, LENGTH, degree=K)
    graph, t, u = fed.server.graph, fed.threshold, "site-0"
    xs = _inputs(fed, 4)
    fed.server.begin_round(1)
    masked = {s: fed.clients[s].mask(1, xs[s]) for s in fed.sites}
    told_dead = _assign_lies(graph, u, t, capacity=K + 1 - t)  # holder → the neighbours of u it is told dropped
    story = {w: tuple(sorted(set(fed.sites) - dead)) for w, dead in told_dead.items()}
    if certificates == "the true survivors signed":
        honest = tuple(fed.sites)
        signed = {w: {s: fed.clients[s].sign_survivors(1, honest) for s in fed.sites} for w in fed.sites}
    else:
        by_story: dict[tuple[str, ...], dict[str, bytes]] = {}
        for w in fed.sites:
            by_story.setdefault(story[w], {})[w] = fed.clients[w].sign_survivors(1, story[w])
        signed = {w: by_story[story[w]] for w in fed.sites}

    # act: the lies, each with the best certificate the server holds for it
    s_keys: dict[str, list[Share]] = {v: [] for v in graph.neighbours(u)}
    refused: dict[str, Exception] = {}
    for w in fed.sites:
        dead = told_dead[w]
        s_cts = {v: fed.s_share_cts[v][w] for v in dead}
        b_cts = {u: masked[u].b_share_cts[w]} if w in graph.group(u) else {}  # u "survived" in every view
        try:
            reply = fed.clients[w].unmask(1, list(story[w]), sorted(dead), s_cts, b_cts,
                                          signatures=signed[w], roster=fed.roster)
        except InconsistentSurvivors as exc:
            refused[w] = exc
            continue
        for v, share in reply.s_shares.items():
            s_keys[v].append(share)

    # assert: every hospital told a lie refused with the typed error, and no mask key of u's neighbours opens
    lied_to = {w for w, dead in told_dead.items() if dead}
    # the lies are the whole attack: each of u's K neighbours "dropped" for t holders of its shares,
    # at most K + 1 − t lies per holder, so at least ⌈K·t / (K + 1 − t)⌉ hospitals were lied to (how
    # many more depends on the random graph; "more than half" held for most graphs, not all)
    assert all(sum(v in dead for dead in told_dead.values()) >= t for v in graph.neighbours(u))
    assert len(lied_to) >= -(-K * t // (K + 1 - t))
    assert lied_to <= set(refused)  # (a story told to too few is refused even when it is the truth)
    expected = UncertifiedSurvivors if certificates.startswith("each") else ConflictingSurvivors
    assert all(isinstance(exc, expected) for exc in refused.values())
    assert all(len(shares) == 0 for shares in s_keys.values())


def test_one_story_in_which_all_neighbours_of_a_site_dropped_is_never_signed():
    # prepare: the lie told consistently instead: every neighbour of u "dropped", u "survived";
    # 40 sites, so that the 30 left are above the signature quorum (27) and only the graph checks refuse
    fed = make_federation(40, LENGTH, degree=K)
    u = "site-0"
    story = sorted(set(fed.sites) - fed.server.graph.neighbours(u))
    fed.server.begin_round(1)
    for s in fed.sites:
        fed.clients[s].mask(1, np.zeros(LENGTH, dtype=np.uint64))

    # act / assert: u would be unmasked alone; no hospital signs it (u keeps 1 of its t holders)
    assert len(story) >= consistency_quorum(40)
    for s in story:
        with pytest.raises(NeighbourhoodBelowThreshold, match=f"site {u!r}"):
            fed.clients[s].sign_survivors(1, story)
