"""An in-process federation for the secure-aggregation tests (honest parties; tests inject the attacks).

Imported by the other ``test_secagg_*`` modules; its one test checks the builder itself.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from common.secagg import (
    COMPLETE,
    KeyAdvert,
    Roster,
    SecAggClient,
    SecAggServer,
    Session,
    SiteIdentity,
    UnmaskReply,
    UnmaskRequest,
    default_threshold,
    effective_degree,
)

SESSION = Session(run_id=11, setup_id=2)


@dataclass
class Federation:
    session: Session
    identities: dict[str, SiteIdentity]
    roster: Roster
    clients: dict[str, SecAggClient]
    adverts: dict[str, KeyAdvert]
    threshold: int
    server: SecAggServer
    s_share_cts: dict[str, dict[str, bytes]]  # sender → receiver → ciphertext
    requests: dict[int, dict[str, UnmaskRequest]] = field(default_factory=dict)  # round → what each site was asked

    @property
    def sites(self) -> list[str]:
        return sorted(self.clients)


def identities_for(n: int) -> dict[str, SiteIdentity]:
    return {f"site-{i}": SiteIdentity.generate(f"site-{i}") for i in range(n)}


def started(identities: Mapping[str, SiteIdentity], session: Session = SESSION):
    """(clients, adverts) after round 0."""
    clients, adverts = {}, {}
    for site, identity in identities.items():
        clients[site], adverts[site] = SecAggClient.start(identity, session)
    return clients, adverts


def make_federation(
    n: int, length: int, threshold: int | None = None, session: Session = SESSION, degree: int = COMPLETE
) -> Federation:
    """n sites after key setup (adverts verified, s-shares routed), server ready for round 1.

    ``degree`` > 0: the sparse SecAgg+ graph, every site opted in down to that degree; the
    default threshold is then the majority of a neighbourhood of k + 1."""
    identities = identities_for(n)
    roster = Roster({site: ident.public_key() for site, ident in identities.items()})
    t = default_threshold(effective_degree(n, degree) + 1) if threshold is None else threshold
    clients, adverts = started(identities, session)
    s_cts = {site: client.share_keys(adverts, roster, t, degree=degree, min_degree=degree)
             for site, client in clients.items()}
    server = SecAggServer(session, adverts, t, length, degree=degree)
    server.route_s_shares(s_cts)
    return Federation(session, identities, roster, clients, adverts, t, server, s_cts)


def certify(fed: Federation, round: int, silent: Collection[str] = ()) -> dict[str, bytes]:
    """The consistency round on a sparse graph: every survivor not in ``silent`` signs the server's
    survivor set; returns the certificate (empty on the complete graph, which has no such round)."""
    if fed.server.graph.complete:
        return {}
    alive = fed.server.consistency_request()
    for site in alive:
        if site not in silent:
            fed.server.receive_signature(site, fed.clients[site].sign_survivors(round, alive))
    return fed.server.certificate


def unmask_as_asked(fed: Federation, site: str, round: int, request: UnmaskRequest) -> UnmaskReply:
    """``site``'s honest answer to ``request``, with the round's certificate on a sparse graph."""
    if fed.server.graph.complete:
        return fed.clients[site].unmask(round, *request)
    return fed.clients[site].unmask(round, *request, signatures=fed.server.certificate, roster=fed.roster)


def run_round(
    fed: Federation,
    round: int,
    xs: Mapping[str, np.ndarray],
    drop_before_mask: Collection[str] = (),
    drop_at_unmask: Collection[str] = (),
    drop_at_consistency: Collection[str] = (),
) -> tuple[np.ndarray, list[str]]:
    """One honest round: sites in ``drop_before_mask`` never send y, those in ``drop_at_consistency``
    send y but never sign the survivor set (sparse graph), those in ``drop_at_unmask`` never answer
    the unmask request. Returns ``server.aggregate()``."""
    fed.server.begin_round(round)
    for site in fed.sites:
        if site in xs and site not in drop_before_mask:
            fed.server.receive_masked(site, fed.clients[site].mask(round, xs[site]))
    certify(fed, round, drop_at_consistency)
    fed.requests[round] = fed.server.unmask_requests()
    for site, request in fed.requests[round].items():
        if site not in drop_at_unmask:
            fed.server.receive_unmask(site, unmask_as_asked(fed, site, round, request))
    return fed.server.aggregate()


def exact_sum(xs: Mapping[str, np.ndarray], sites: Collection[str]) -> np.ndarray:
    """Σ x_u mod 2^64 computed with Python ints (independent of numpy's wraparound)."""
    length = len(next(iter(xs.values())))
    totals = [sum(int(xs[s][i]) for s in sites) % 2**64 for i in range(length)]
    return np.array(totals, dtype=np.uint64)


def test_harness_builds_a_federation_ready_for_round_one():
    # prepare / act
    fed = make_federation(5, 8)

    # assert
    assert fed.threshold == 3
    assert all(c.participants == ("site-0", "site-1", "site-2", "site-3", "site-4") for c in fed.clients.values())
    assert {len(cts) for cts in fed.s_share_cts.values()} == {5}
    assert fed.server.eligible == fed.clients["site-0"].participants
