"""The communication graph of SecAgg+ (Bell et al., CCS 2020): who masks with and shares to whom.

Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020, replace the complete graph of Bonawitz et al. (CCS 2017)
by a sparse k-regular graph G: site u agrees pairwise masks only with its neighbours N(u) and
Shamir-shares its mask key s_u and self-mask seed b_u only among its closed neighbourhood
N[u] = N(u) ∪ {u} (k + 1 holders, t of them reconstruct). Per round a site then runs k key
agreements and k + 1 PRG streams instead of n − 1 and n, and the server's unmasking of d dropped
sites costs O(d·k) streams instead of O(d·n).

Construction (deterministic, recomputed by every site and the server):

* seed = SHA-256(str("medsynth-secagg graph v1") u64(run) u64(setup) u64(n) [bytes(advert)]×n),
  the adverts (``KeyAdvert.to_bytes``, each signed by its site over fresh X25519 keys) in sorted
  site order. Every input is public and every site checks every signature, so the server cannot
  pick the graph: it cannot forge an advert, and a different graph needs a different set of
  signed adverts.
* ring order: participants sorted by SHA-256(seed || str(site)), a uniformly random permutation;
* edges: the Harary graph H(k, n) on that ring for even k (positions i and i ± 1, ..., i ± k/2,
  mod n), which is exactly k-regular. An odd requested degree is rounded up (more neighbours,
  never fewer). k = 0 ("complete") or k ≥ n − 1 give the complete graph, i.e. Bonawitz et al.
  unchanged; a sparse graph needs k ≥ ``MIN_DEGREE`` (so n ≥ 6: smaller consortia are always
  complete).

What the graph must satisfy, and how this module checks it each round (``check_survivors``):

1. Connectivity after dropouts. The server can remove every mask inside a union of connected
   components of the survivors' subgraph, so it learns the sum of each component: an isolated
   honest survivor would be exposed alone. H(k, n) is k-connected (Harary, 1962): removing fewer
   than k sites (dropped plus corrupt) leaves the honest survivors connected, whatever the ring
   order. The server and every hospital additionally refuse a round whose survivors are not
   connected (``GraphDisconnected``).
2. Threshold per neighbourhood. t of the k + 1 holders reconstruct a secret, so (a) every
   survivor and every dropped site with a surviving neighbour needs t surviving holders
   (``NeighbourhoodBelowThreshold`` otherwise: the round could not be unmasked), and (b) the
   majority rule of ``session`` applies per neighbourhood: 2t > k + 1, so two disjoint groups
   of t holders of u's shares cannot exist, and honest holders, each releasing only one kind
   of u's shares, never let both b_u and s_u be opened. A coalition of the server and corrupt
   sites opens u's input if it holds t of N[u]; Bell et al. bound that by choosing k so that a
   random neighbourhood holds fewer than t corrupt sites except with negligible probability
   (their semi-honest and semi-malicious analysis, with a δ fraction dropping and a γ fraction
   corrupt; e.g. n = 10^4, γ = δ = 5%: each client talks to 3% of the others). With the majority
   t here, a neighbourhood of k + 1 consecutive ring positions is a uniform sample, so the
   failure probability is the hypergeometric tail P[≥ t corrupt of k + 1] (``docs/privacy.md``
   gives the numbers).

A server that lies about who dropped: on the complete graph the majority threshold stops it (a
counting argument over the whole consortium, ``session``). On a sparse graph it does not by
itself: a server that tells the neighbourhoods of u's neighbours "they dropped" while telling N[u]
"u survived" could open x_u alone. A sparse graph therefore adds the consistency round
(``consistency``: every survivor signs the one survivor set of the round, a hospital signs one
set per round and unmasks only for a set signed by more than two thirds of the participants);
``tests/test_secagg_graph.py`` runs that attack and every hospital it lies to refuses.

Not covered (why a hospital must still opt in, ``[consortium] min-neighbours``): a site
colluding with the server can choose its advert after seeing the honest ones and so try many
graphs; a commit-then-reveal round would remove that freedom and is not implemented; the server
itself, by leaving some adverts out (claiming those sites did not answer), can also choose among
a few graphs. Both matter only together with corrupt sites. More than a third of the sites
corrupt could also certify two survivor sets (``consistency``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from common.secagg.encoding import Writer
from common.secagg.errors import GraphDisconnected, NeighbourhoodBelowThreshold
from common.secagg.identity import KeyAdvert
from common.secagg.session import Session

GRAPH_TAG = b"medsynth-secagg graph v1"
ORDER_TAG = b"medsynth-secagg graph order v1"
COMPLETE = 0  # requested degree meaning "the complete graph" (every other participant is a neighbour)
MIN_DEGREE = 4  # smallest sparse degree: a neighbourhood of 5 with majority t = 3 tolerates 2 dropouts


def check_degree(name: str, degree: int) -> int:
    """``degree`` if it is ``COMPLETE`` (0) or an int >= ``MIN_DEGREE``; else ``ValueError`` naming it."""
    if isinstance(degree, bool) or not isinstance(degree, int) or not (degree == COMPLETE or degree >= MIN_DEGREE):
        raise ValueError(
            f"{name} must be 0 (the complete graph) or an integer >= {MIN_DEGREE} (neighbours per site), "
            f"got {degree!r}"
        )
    return degree


def effective_degree(n: int, degree: int) -> int:
    """The k actually used among n participants: n − 1 when ``degree`` is 0 or k ≥ n − 1 (the
    complete graph); otherwise ``degree`` rounded up to even (H(k, n) is k-regular for even k)."""
    check_degree("degree", degree)
    if degree == COMPLETE:
        return n - 1
    k = degree + degree % 2
    return n - 1 if k >= n - 1 else k


def graph_seed(session: Session, adverts: Mapping[str, KeyAdvert]) -> bytes:
    """SHA-256 over the session and every signed advert in sorted site order (module docstring)."""
    w = Writer(GRAPH_TAG).put_u64(session.run_id).put_u64(session.setup_id).put_u64(len(adverts))
    for site in sorted(adverts):
        w.put_bytes(adverts[site].to_bytes())
    return hashlib.sha256(w.done()).digest()


@dataclass(frozen=True)
class CommGraph:
    """One session's graph: participants (sorted), effective degree k, seed, ring order, N(u) per site."""

    participants: tuple[str, ...]
    degree: int
    seed: bytes
    order: tuple[str, ...]
    _neighbours: Mapping[str, frozenset[str]] = field(repr=False, compare=False)

    @staticmethod
    def derive(participants: Iterable[str], seed: bytes, requested_degree: int) -> CommGraph:
        """H(k, n) on the ring ordered by SHA-256(seed || site); complete for k ≥ n − 1 or k = 0."""
        sites = tuple(sorted(set(participants)))
        if len(seed) != hashlib.sha256().digest_size:
            raise ValueError(f"graph seed must be 32 bytes, got {len(seed)}")
        n = len(sites)
        k = effective_degree(n, requested_degree)
        order = tuple(sorted(sites, key=lambda s: hashlib.sha256(Writer(ORDER_TAG).put_bytes(seed).put_str(s).done())
                                                           .digest()))
        neighbours: dict[str, frozenset[str]]
        if k >= n - 1:
            everyone = frozenset(sites)
            neighbours = {s: everyone - {s} for s in sites}
        else:
            half = k // 2
            neighbours = {
                s: frozenset(order[(i + j) % n] for j in range(-half, half + 1) if j != 0) for i, s in enumerate(order)
            }
        return CommGraph(sites, k, bytes(seed), order, neighbours)

    @staticmethod
    def of_session(session: Session, adverts: Mapping[str, KeyAdvert], requested_degree: int) -> CommGraph:
        """The graph every party derives from the same session, adverts and requested degree."""
        return CommGraph.derive(adverts, graph_seed(session, adverts), requested_degree)

    @property
    def complete(self) -> bool:
        return self.degree >= len(self.participants) - 1

    @property
    def group_size(self) -> int:
        """k + 1: how many sites hold shares of one site's secrets (its closed neighbourhood)."""
        return self.degree + 1

    def neighbours(self, site: str) -> frozenset[str]:
        """N(site): the sites ``site`` masks with (never itself)."""
        return self._neighbours[site]

    def group(self, site: str) -> tuple[str, ...]:
        """N[site] = N(site) ∪ {site}, sorted: the holders of ``site``'s shares."""
        return tuple(sorted(self._neighbours[site] | {site}))

    def edges(self) -> frozenset[tuple[str, str]]:
        """Every edge once, as (smaller, larger) site id."""
        return frozenset((u, v) for u in self.participants for v in self._neighbours[u] if u < v)

    def check_survivors(self, alive: Collection[str], threshold: int) -> None:
        """Abort unless the round can be unmasked and reveals only the total (module docstring, 1-2).

        ``NeighbourhoodBelowThreshold``: a survivor, or a dropped site with a surviving neighbour,
        has fewer than ``threshold`` surviving holders of its shares. ``GraphDisconnected``: the
        survivors' subgraph splits (the server would learn each part's sum).
        """
        alive_set = set(alive)
        for site in self.participants:
            group = self._neighbours[site] | {site}
            if site not in alive_set and not (self._neighbours[site] & alive_set):
                continue  # a dropped site no survivor masked with: nothing of it to remove
            holders = len(group & alive_set)
            if holders < threshold:
                status = "surviving" if site in alive_set else "dropped"
                raise NeighbourhoodBelowThreshold(
                    f"{status} site {site!r} has {holders} surviving holders of its shares among its "
                    f"{len(group)} (k = {self.degree}), need {threshold}: the round cannot be unmasked; run a new "
                    "setup among the sites still there"
                )
        if not alive_set:
            return
        start = min(alive_set)
        seen, frontier = {start}, [start]
        while frontier:
            for v in self._neighbours[frontier.pop()] & alive_set:
                if v not in seen:
                    seen.add(v)
                    frontier.append(v)
        if seen != alive_set:
            raise GraphDisconnected(
                f"the survivors split into parts on the graph (k = {self.degree}; {len(seen)} of {len(alive_set)} "
                "reachable from one site): unmasking would reveal each part's sum; run a new setup"
            )
