"""The aggregator's side of secure aggregation: route ciphertexts, collect shares, output the sum.

Server of Bonawitz et al., CCS 2017 (Fig. 4), on the session's communication graph G
(``graph``: complete by default, the sparse k-regular graph of Bell et al., CCS 2020, when the
run asks for a degree k < n − 1). The server holds only public keys and ciphertexts it cannot
open; after a round it learns exactly

    Σ_{u ∈ alive} x_u  (mod 2^64)

because for the alive set A and dead set D (sites whose y never arrived):

    Σ_{u∈A} y_u = Σ_{u∈A} x_u + Σ_{u∈A} PRG(b_u) + Σ_{u∈A} Σ_{v∈D∩N(u)} sign(u,v)·PRG(s_uv)

(pairs inside A cancel: sign(u,v) + sign(v,u) = 0). It removes the second term with the b_u
reconstructed from b-shares of N[u] and the third with s_v (v ∈ D) reconstructed from s-shares
of N[v], using
X25519(s_v_sk, s_u_pk) = X25519(s_u_sk, s_v_pk). It never asks for both kinds for one site, in
one round or across rounds of a setup (``b_released``/``s_released``): a site that contributed
to an aggregated round and then drops needs a new setup, which ``unmask_requests`` reports as
``ActiveDeadOverlap`` before asking anyone for anything. Before asking, it also checks the graph's
survivor conditions (``CommGraph.check_survivors``): t surviving holders per neighbourhood that
must be unmasked, and connected survivors. On a sparse graph it first freezes the survivor set
and collects the survivors' signatures on it (``consistency_request``, ``receive_signature``);
it cannot verify them (it holds no roster), the hospitals do, and it asks for shares only with
a quorum of them (``consistency``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg.consistency import consistency_quorum, needs_certificate
from common.secagg.encoding import check_u64
from common.secagg.errors import (
    ActiveDeadOverlap,
    IncompleteSetup,
    InconsistentShares,
    OutOfOrder,
    ReplayDetected,
    TooFewSurvivors,
    UnknownParticipant,
)
from common.secagg.graph import COMPLETE, CommGraph
from common.secagg.identity import ED25519_SIG_BYTES, KeyAdvert
from common.secagg.messages import MaskedInput, UnmaskReply
from common.secagg.primitives import mask_seed, prg_words, x25519
from common.secagg.session import MIN_THRESHOLD, Session, check_threshold_rules
from common.secagg.shamir import Share, reconstruct_secret

# per responder: (alive, dead, s-share cts addressed to it from dead senders, b-share cts from alive senders)
UnmaskRequest = tuple[list[str], list[str], dict[str, bytes], dict[str, bytes]]


class SecAggServer:
    """One setup's aggregator state; call route_s_shares once, then per round:
    begin_round → receive_masked* → [consistency_request → receive_signature*, on a sparse graph]
    → unmask_requests → receive_unmask* → aggregate."""

    def __init__(
        self, session: Session, adverts: Mapping[str, KeyAdvert], threshold: int, vector_length: int,
        degree: int = COMPLETE,
    ) -> None:
        if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
            raise ValueError(f"vector_length must be a positive int, got {vector_length!r}")
        stale = sorted(site for site, a in adverts.items() if a.session != session or a.site_id != site)
        if stale:
            raise ReplayDetected(f"adverts of {stale} are not this setup's ({session}); collect fresh adverts")
        if len(adverts) < max(MIN_THRESHOLD, threshold):
            raise TooFewSurvivors(
                f"{len(adverts)} sites advertised keys, need at least {max(MIN_THRESHOLD, threshold)}"
            )
        self.graph = CommGraph.of_session(session, adverts, degree)  # what every site derives too
        check_threshold_rules(threshold, self.graph.group_size)
        self.session = session
        self.threshold = threshold
        self.vector_length = vector_length
        self.participants: tuple[str, ...] = self.graph.participants
        self._s_pks = {site: a.s_pk for site, a in adverts.items()}
        self._s_cts: dict[str, dict[str, bytes]] = {}  # sender → receiver → s-share ciphertext
        self.round = 0
        self.b_released: set[str] = set()  # sites whose b-shares were requested in some round
        self.s_released: set[str] = set()  # sites whose s-shares were requested: never alive again
        self._dead_keys: dict[str, X25519PrivateKey] = {}  # reconstructed s keys of dropped sites
        self._reset_round()

    def _reset_round(self) -> None:
        self._masked: dict[str, MaskedInput] = {}
        self._alive: list[str] | None = None  # frozen by consistency_request or the first unmask_requests
        self._signatures: dict[str, bytes] = {}  # survivor → its signature on (session, round, alive)
        self._dead: list[str] = []
        self._need_s: list[str] = []  # dead sites whose s key is not yet known
        self._asked: dict[str, tuple[set[str], set[str]]] = {}  # responder → (b-share sites, s-share sites) asked
        self._replies: dict[str, UnmaskReply] = {}

    @property
    def eligible(self) -> tuple[str, ...]:
        """Sites that may still contribute in this setup (no s-share of theirs was ever requested)."""
        return tuple(site for site in self.participants if site not in self.s_released)

    def route_s_shares(self, cts_by_sender: Mapping[str, Mapping[str, bytes]]) -> None:
        """Keep every sender's setup ciphertexts; each participant must have shared to exactly its N[u]."""
        if self._s_cts:
            raise OutOfOrder(f"s-shares of setup {self.session} were already routed")
        everyone = set(self.participants)
        unknown = set(cts_by_sender) - everyone
        if unknown:
            raise UnknownParticipant(f"s-shares from {sorted(unknown)}, who did not advertise keys in {self.session}")
        missing = sorted(everyone - set(cts_by_sender))
        if missing:
            raise IncompleteSetup(f"sites {missing} sent no key shares; re-run setup with the sites that did")
        for sender, cts in cts_by_sender.items():
            if set(cts) != set(self.graph.group(sender)):
                raise IncompleteSetup(
                    f"{sender!r} shared its key with {sorted(cts)}, not with its neighbourhood "
                    f"{list(self.graph.group(sender))} on the session's graph (k = {self.graph.degree})"
                )
        self._s_cts = {sender: dict(cts) for sender, cts in cts_by_sender.items()}

    def begin_round(self, round: int) -> None:
        if not self._s_cts:
            raise OutOfOrder("begin_round before route_s_shares: dropouts could not be unmasked")
        check_u64("round", round)
        if round <= self.round:
            raise ReplayDetected(f"round {round} is not after the last round {self.round} of setup {self.session}")
        self.round = round
        self._reset_round()

    def receive_masked(self, site: str, masked: MaskedInput) -> None:
        if site not in self.participants:
            raise UnknownParticipant(f"{site!r} did not take part in setup {self.session}")
        if self.round == 0:
            raise OutOfOrder("receive_masked before begin_round")
        if self._alive is not None:
            raise OutOfOrder(f"masked input from {site!r} arrived after unmasking of round {self.round} began")
        if site in self.s_released:
            raise ActiveDeadOverlap(f"{site!r} was unmasked as dropped earlier in {self.session}; it needs a new setup")
        if site in self._masked:
            raise ReplayDetected(f"second masked input from {site!r} in round {self.round}")
        y = masked.y
        if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (self.vector_length,):
            raise ValueError(f"masked input from {site!r} must be ({self.vector_length},) uint64")
        if set(masked.b_share_cts) != set(self.graph.group(site)):
            raise ValueError(f"masked input from {site!r} must carry one b-share ciphertext per member of its "
                             "neighbourhood")
        self._masked[site] = masked

    @property
    def quorum(self) -> int:
        """Signatures a survivor set needs on this session's graph (``consistency``); 0 on the complete graph."""
        return consistency_quorum(len(self.participants)) if needs_certificate(self.graph) else 0

    def consistency_request(self) -> tuple[str, ...]:
        """Freeze the round's survivors (sorted senders of masked input) and return them: the one set
        every survivor is asked to sign on a sparse graph (``consistency``). ``TooFewSurvivors`` when
        the set could not be unmasked or certified."""
        if self.round == 0:
            raise OutOfOrder("consistency_request before begin_round")
        alive = self._freeze()
        if len(alive) < self.quorum:
            raise TooFewSurvivors(
                f"{len(alive)} of {len(self.participants)} sites sent masked inputs in round {self.round}; a survivor "
                f"set needs {self.quorum} signers (more than two thirds) on a sparse graph"
            )
        return tuple(alive)

    def receive_signature(self, site: str, signature: bytes) -> None:
        """A survivor's signature on the frozen set; the hospitals verify it, the server only keeps it."""
        if self._alive is None:
            raise OutOfOrder("receive_signature before consistency_request")
        if site not in self._alive:
            raise UnknownParticipant(f"signature from {site!r}, who is not a survivor of round {self.round}")
        if not isinstance(signature, bytes) or len(signature) != ED25519_SIG_BYTES:
            raise ValueError(f"signature from {site!r} must be {ED25519_SIG_BYTES} bytes")
        if self._signatures.get(site, signature) != signature:
            raise ReplayDetected(f"{site!r} sent two different signatures on the survivors of round {self.round}")
        self._signatures[site] = signature

    @property
    def certificate(self) -> dict[str, bytes]:
        """site → signature on this round's survivor set, what every unmask request carries (sparse
        graph): the first ``quorum`` signers in site order, since every signature sent is one more
        verification at every hospital and more than the quorum proves nothing more."""
        return {site: self._signatures[site] for site in sorted(self._signatures)[: self.quorum]}

    def _freeze(self) -> list[str]:
        """Fix the round's alive and dead sets once, after the checks that do not depend on replies;
        returns the alive set."""
        if self._alive is not None:
            return self._alive
        alive = sorted(self._masked)
        dead = sorted(set(self.participants) - set(alive))
        floor = max(MIN_THRESHOLD, self.threshold if self.graph.complete else MIN_THRESHOLD)
        if len(alive) < floor:
            raise TooFewSurvivors(f"{len(alive)} masked inputs in round {self.round}, need {floor}")
        self.graph.check_survivors(alive, self.threshold)
        # dropped sites some survivor masked with: their s keys are needed (all dropped ones on the complete graph)
        needed = [d for d in dead if self.graph.neighbours(d) & set(alive)]
        flipped = sorted(set(needed) & self.b_released)
        if flipped:
            raise ActiveDeadOverlap(
                f"{flipped} contributed to an earlier round of {self.session} and dropped now: their mask keys "
                "cannot be revealed without unmasking that contribution; run a new setup without them"
            )
        self._alive, self._dead = alive, dead
        self._need_s = [d for d in needed if d not in self._dead_keys]
        return alive

    def unmask_requests(self, responders: Sequence[str] | None = None) -> dict[str, UnmaskRequest]:
        """What to send each responder (default: every alive site); never both kinds for one site.

        On a sparse graph only after the consistency round, with at least ``quorum`` signatures
        collected; every request then travels with ``certificate``."""
        if self.round == 0:
            raise OutOfOrder("unmask_requests before begin_round")
        if needs_certificate(self.graph):
            if self._alive is None:
                raise OutOfOrder("unmask_requests before the consistency round (consistency_request) on a sparse graph")
            if len(self._signatures) < self.quorum:
                raise TooFewSurvivors(
                    f"{len(self._signatures)} survivors signed the survivor set of round {self.round}, need "
                    f"{self.quorum} of {len(self.participants)}: the hospitals would refuse to unmask"
                )
        alive = self._freeze()
        asked = sorted(set(alive if responders is None else responders))
        strangers = sorted(set(asked) - set(alive))
        if strangers:
            raise UnknownParticipant(f"responders {strangers} are not alive in round {self.round}")
        if len(set(asked) | set(self._asked)) < max(MIN_THRESHOLD, self.threshold):
            raise TooFewSurvivors(f"asking {len(asked)} responders cannot yield {self.threshold} shares per site")
        requests: dict[str, UnmaskRequest] = {}
        for r in asked:
            holds = self.graph.neighbours(r) | {r}  # r holds shares of exactly these sites
            s_cts = {d: self._s_cts[d][r] for d in self._need_s if d in holds}
            b_cts = {u: self._masked[u].b_share_cts[r] for u in alive if u in holds}
            requests[r] = (list(alive), list(self._dead), s_cts, b_cts)
            self._asked[r] = (set(b_cts), set(s_cts))
        self.b_released |= set(alive)
        self.s_released |= set(self._need_s)
        return requests

    def receive_unmask(self, site: str, reply: UnmaskReply) -> None:
        if self._alive is None:
            raise OutOfOrder("receive_unmask before unmask_requests")
        if site not in self._asked:
            raise UnknownParticipant(f"unmask reply from {site!r}, who was not asked in round {self.round}")
        b_asked, s_asked = self._asked[site]
        if set(reply.b_shares) - b_asked or set(reply.s_shares) - s_asked:
            raise InconsistentShares(f"reply from {site!r} carries shares that were not requested")
        x = self.participants.index(site) + 1
        if any(s.x != x for s in (*reply.b_shares.values(), *reply.s_shares.values())):
            raise InconsistentShares(f"reply from {site!r} carries shares not at its evaluation point x={x}")
        self._replies[site] = reply

    def aggregate(self) -> tuple[np.ndarray, list[str]]:
        """(Σ_alive x_u mod 2^64 as (L,) uint64, sorted alive sites); ``TooFewSurvivors`` if < t shares."""
        if self._alive is None:
            raise OutOfOrder("aggregate before unmask_requests")
        alive, t, length = self._alive, self.threshold, self.vector_length
        b_seeds = {u: reconstruct_secret(self._collect(u, "b"), t, what=f"self-mask seed of {u!r}") for u in alive}
        for d in self._need_s:
            raw = reconstruct_secret(self._collect(d, "s"), t, what=f"mask key of {d!r}")
            key = X25519PrivateKey.from_private_bytes(raw)
            if key.public_key().public_bytes_raw() != self._s_pks[d]:
                raise InconsistentShares(f"reconstructed mask key of {d!r} does not match its advertised public key")
            self._dead_keys[d] = key
        total = np.zeros(length, dtype=np.uint64)  # (L,) uint64, arithmetic mod 2^64
        for u in alive:
            np.add(total, self._masked[u].y, out=total)
            np.subtract(total, prg_words(b_seeds[u], length), out=total)
        for d in self._dead:
            for v in sorted(self.graph.neighbours(d) & set(alive)):
                seed = mask_seed(x25519(self._dead_keys[d], self._s_pks[v], peer=v), self.session, v, d, self.round)
                # y_v carries sign(v, d)·PRG(s_vd): remove it
                (np.subtract if v < d else np.add)(total, prg_words(seed, length), out=total)
        return total, list(alive)

    def _collect(self, site: str, kind: str) -> list[Share]:
        """Every received share of ``site``'s b seed (kind "b") or s key (kind "s"); at least t of them."""
        by_kind = [reply.b_shares if kind == "b" else reply.s_shares for reply in self._replies.values()]
        shares = [found[site] for found in by_kind if site in found]
        if len(shares) < self.threshold:
            raise TooFewSurvivors(
                f"only {len(shares)} {kind}-shares of {site!r} arrived in round {self.round}, need {self.threshold}; "
                "ask more alive sites (unmask_requests(responders=...)) or abandon the round"
            )
        return shares
