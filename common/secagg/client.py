"""One site's side of secure aggregation: key setup, masking, unmasking.

Protocol of Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017 (Fig. 4), on the communication graph of ``graph``: by default the complete
graph of participants; with a requested degree k < n − 1 the sparse k-regular graph of Bell et
al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+), so
a site runs k key agreements and k + 1 PRG streams per round and shares its secrets among its
k + 1 closed neighbourhood only. Every site derives the graph itself from the signed adverts and
refuses (``GraphMismatch``) a request about a site outside its neighbourhood; a hospital accepts
a sparse graph only down to its own ``min_degree`` (``SparseGraphRefused``; by default it
accepts only the complete graph). On a sparse graph a round has one more step between masking
and unmasking (``sign_survivors``, ``consistency``): the site signs the round's one survivor set,
and ``unmask`` answers only for a set a quorum of survivors signed. What the sparse graph does and
does not protect against is in ``graph``'s docstring.

One key setup serves rounds r = 1, 2, ...: the pairwise seed s_uv is re-derived per round by
HKDF, the self-mask seed b_u is fresh per round. Reusing the s keys across rounds adds one rule
(kept in ``b_revealed``/``s_revealed``): once this site released a b-share of u in any round,
it never releases an s-share of u in this setup, and vice versa, because s_u together with any
b_u^r unmasks u's round-r input. With a majority threshold no honest quorum can then be
assembled for the second kind, so a site that drops out after its first aggregated round needs
a new setup (new ``setup_id``) to be excluded; the server knows this in advance.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.secagg.client_state import open_state, seal_state
from common.secagg.consistency import check_certificate, consistency_quorum, needs_certificate, survivors_payload
from common.secagg.encoding import check_u64
from common.secagg.errors import (
    ActiveDeadOverlap,
    ConflictingSurvivors,
    GraphMismatch,
    InconsistentShares,
    KeySwapDetected,
    OutOfOrder,
    ReplayDetected,
    SparseGraphRefused,
    TooFewSurvivors,
    UncertifiedSurvivors,
    UnknownParticipant,
)
from common.secagg.graph import COMPLETE, CommGraph, check_degree, graph_seed
from common.secagg.identity import KeyAdvert, Roster, SiteIdentity
from common.secagg.messages import MaskedInput, UnmaskReply
from common.secagg.primitives import (
    KIND_B,
    KIND_S,
    mask_seed,
    open_share,
    prg_words,
    seal_share,
    share_ad,
    share_key,
    x25519,
)
from common.secagg.session import MIN_THRESHOLD, Session, check_threshold_rules
from common.secagg.shamir import Share, split_secret_at

SETUP_ROUND = 0  # the "round" bound into setup (s-share) ciphertexts


class SecAggClient:
    """Protocol state of one site in one session; ``to_bytes``/``from_bytes`` carry it between messages.

    Before ``share_keys``: ``participants == ()`` and ``threshold == 0``. ``round`` is the last
    round this site masked (0: none yet); ``unmask`` only answers for that round.
    """

    def __init__(
        self, identity: SiteIdentity, session: Session, c_sk: X25519PrivateKey, s_sk: X25519PrivateKey
    ) -> None:
        self.identity = identity
        self.session = session
        self._c_sk = c_sk  # X25519, share encryption
        self._s_sk = s_sk  # X25519, pairwise masks; its shares are what a dropout costs
        self.participants: tuple[str, ...] = ()  # sorted site ids; index i ↔ Shamir x = i + 1
        self.threshold = 0
        self.graph: CommGraph | None = None  # set by share_keys
        self._requested_degree = COMPLETE
        self._c_pks: dict[str, bytes] = {}  # of this site's closed neighbourhood only
        self._s_pks: dict[str, bytes] = {}
        self.round = 0
        self._b_revealed: set[str] = set()  # sites whose b-share this site released (any round)
        self._s_revealed: set[str] = set()  # sites whose s-share this site released
        self._agreed: tuple[str, ...] = ()  # the survivor set this site signed or unmasked for in ``round``

    @property
    def site_id(self) -> str:
        return self.identity.site_id

    @staticmethod
    def start(identity: SiteIdentity, session: Session) -> tuple[SecAggClient, KeyAdvert]:
        """Round 0: fresh c and s key pairs and the signed advert of their public halves."""
        client = SecAggClient(identity, session, X25519PrivateKey.generate(), X25519PrivateKey.generate())
        return client, client.advert()

    def advert(self) -> KeyAdvert:
        c_pk = self._c_sk.public_key().public_bytes_raw()
        return KeyAdvert.signed(self.identity, self.session, c_pk, self._s_sk.public_key().public_bytes_raw())

    def share_keys(
        self, adverts: Mapping[str, KeyAdvert], roster: Roster, threshold: int, *,
        min_participants: int = MIN_THRESHOLD, degree: int = COMPLETE, min_degree: int = COMPLETE,
    ) -> dict[str, bytes]:
        """Round 1: verify every advert, derive the graph, then t-of-(k+1) share s_u among N[u];
        returns receiver → encrypted s-share.

        ``min_participants`` is the hospital's own floor (never below 3) on how many sites a
        session may have; the server's threshold can only raise it. ``degree`` is the run's
        requested graph degree (0: complete); ``min_degree`` the fewest neighbours this hospital
        accepts on a sparse graph (0: it accepts only the complete graph).
        """
        if self.participants:
            raise OutOfOrder(f"site {self.site_id!r} already shared its keys in session {self.session}")
        check_degree("degree", degree)
        check_degree("min_degree", min_degree)
        for key, advert in adverts.items():
            if key != advert.site_id:
                raise KeySwapDetected(f"advert of {advert.site_id!r} was delivered as {key!r}; aborting setup")
            roster.verify(advert.site_id, advert.signed_payload(), advert.signature)
        for advert in adverts.values():
            if advert.session != self.session:
                raise ReplayDetected(
                    f"advert of {advert.site_id!r} is for {advert.session}, this setup is {self.session}: "
                    "a stale advert was replayed; the server must collect fresh adverts"
                )
        own = adverts.get(self.site_id)
        if own is None:
            raise UnknownParticipant(f"this site {self.site_id!r} is not among the adverts {sorted(adverts)}")
        if own != self.advert():
            raise KeySwapDetected(f"the advert under this site's name {self.site_id!r} is not the one it sent")
        floor = max(MIN_THRESHOLD, threshold, min_participants)
        if len(adverts) < floor:
            raise TooFewSurvivors(f"{len(adverts)} sites advertised keys, need at least {floor}")
        keys = [k for a in adverts.values() for k in (a.c_pk, a.s_pk)]
        if len(set(keys)) != len(keys):  # Bonawitz et al. round 1: all public keys distinct
            raise KeySwapDetected("two adverts (or one advert's two keys) carry the same public key; aborting setup")
        graph = CommGraph.derive(adverts, graph_seed(self.session, adverts), degree)
        if not graph.complete and (min_degree == COMPLETE or graph.degree < min_degree):
            accepts = ("only the complete graph" if min_degree == COMPLETE
                       else f"at least {min_degree} neighbours")
            raise SparseGraphRefused(
                f"the session's graph gives each site {graph.degree} of {len(adverts) - 1} others as neighbours; "
                f"this hospital accepts {accepts} ([consortium] min-neighbours); no share was made"
            )
        check_threshold_rules(threshold, graph.group_size)
        participants = graph.participants
        group = graph.group(self.site_id)
        c_pks = {site: adverts[site].c_pk for site in group}
        s_pks = {site: adverts[site].s_pk for site in group}
        for site, pk in s_pks.items():
            x25519(self._s_sk, pk, peer=site)  # reject low-order mask keys now rather than in a round
        shares = split_secret_at(self._s_sk.private_bytes_raw(), [participants.index(v) + 1 for v in group], threshold)
        cts = {v: self._seal(v, c_pks[v], SETUP_ROUND, KIND_S, share) for v, share in zip(group, shares, strict=True)}
        self.participants, self.threshold, self._c_pks, self._s_pks = participants, threshold, c_pks, s_pks
        self.graph, self._requested_degree = graph, degree
        return cts

    def check_can_mask(self, round: int) -> CommGraph:
        """The checks ``mask`` makes before it masks anything (key setup done, ``round`` after the last
        masked one), without side effects: a hospital asked to train and mask in one message runs
        them before it trains, so a request it would refuse to mask is refused before any charge."""
        graph = self._require_setup("mask")
        check_u64("round", round)
        if round <= self.round:
            raise ReplayDetected(f"round {round} is not after this site's last masked round {self.round}")
        return graph

    def mask(self, round: int, x: np.ndarray) -> MaskedInput:
        """Round 2: y = x + PRG(b_u) + Σ_{v∈N(u)} sign(u,v)·PRG(s_uv,r) mod 2^64, and encrypted shares of
        b_u for N[u]."""
        graph = self.check_can_mask(round)
        if not isinstance(x, np.ndarray) or x.dtype != np.uint64 or x.ndim != 1 or x.size == 0:
            raise TypeError("x must be a non-empty 1-D np.uint64 array (quantize it with Quantizer.encode)")
        me, length = self.site_id, x.shape[0]
        b_seed = secrets.token_bytes(32)  # fresh self-mask seed b_u for this round only
        y = x.copy()  # (L,) uint64; numpy wraps mod 2^64
        np.add(y, prg_words(b_seed, length), out=y)
        for v in sorted(graph.neighbours(me)):
            seed = mask_seed(x25519(self._s_sk, self._s_pks[v], peer=v), self.session, me, v, round)
            # sign(u, v) = +1 if u < v else -1: the pair's two masks cancel in the sum
            (np.add if me < v else np.subtract)(y, prg_words(seed, length), out=y)
        group = graph.group(me)
        shares = split_secret_at(b_seed, [self.participants.index(v) + 1 for v in group], self.threshold)
        cts = {v: self._seal(v, self._c_pks[v], round, KIND_B, share) for v, share in zip(group, shares, strict=True)}
        self.round, self._agreed = round, ()
        return MaskedInput(y, cts)

    def sign_survivors(self, round: int, alive: Sequence[str], *, min_participants: int = MIN_THRESHOLD) -> bytes:
        """Round 3 on a sparse graph (``consistency``): this site's Ed25519 signature on the round's
        survivor set ``alive``, at most one set per (session, round).

        Signed only if this site masked ``round``, is in ``alive``, ``alive`` holds at least
        ``consistency_quorum(n)`` participants (a smaller set could never be certified) and passes
        the checks ``unmask`` will make; asked again for the same set it signs again (the same
        bytes: Ed25519 is deterministic), for another set ``ConflictingSurvivors``.
        """
        graph = self._require_setup("sign_survivors")
        if self.round == 0 or round != self.round:
            raise ReplayDetected(f"survivors of round {round} to sign, but this site's current round is {self.round}")
        payload = survivors_payload(self.session, round, alive)  # repeats refused
        alive_set = set(alive)
        unknown = sorted(alive_set - set(self.participants))
        if unknown:
            raise UnknownParticipant(f"sites {unknown} took no part in setup {self.session}")
        if self.site_id not in alive_set:
            raise UnknownParticipant(f"this site {self.site_id!r} masked round {round} but is not in the survivor set")
        quorum = consistency_quorum(len(self.participants))
        if len(alive_set) < quorum:
            raise TooFewSurvivors(
                f"only {len(alive_set)} of {len(self.participants)} sites survived round {round}: a set of fewer "
                f"than {quorum} cannot be certified; run a new setup among the sites still there"
            )
        self._check_survivors(graph, round, alive_set, set(self.participants) - alive_set, min_participants)
        self._agree(round, alive_set)
        return self.identity.sign(payload)

    def unmask(
        self,
        round: int,
        alive: Sequence[str],
        dead: Sequence[str],
        s_share_cts: Mapping[str, bytes],
        b_share_cts: Mapping[str, bytes],
        *,
        min_participants: int = MIN_THRESHOLD,
        signatures: Mapping[str, bytes] | None = None,
        roster: Roster | None = None,
    ) -> UnmaskReply:
        """Round 4: decrypt b-shares of ``alive`` senders and s-shares of ``dead`` ones, after every guard.

        ``alive`` must hold at least max(3, ``min_participants``) sites and pass the graph's
        survivor checks (every neighbourhood that must be unmasked has t surviving holders, the
        survivors are connected; on the complete graph: at least t alive). Shares are released
        only for this site's neighbours (``GraphMismatch`` otherwise). An honest site masks only
        an update it trained (``NothingToMask`` otherwise) and answers an unmask request only for
        the round it masked, so every alive site that answers contributed a trained update.

        On a sparse graph (and wherever ``signatures`` are given) the request must also carry
        ``signatures`` on (session, round, ``alive``) from a quorum of its members, verified
        against ``roster`` (this hospital's pinned one), ``dead`` must be exactly the other
        participants, and ``alive`` the set this site signed for the round if it signed one
        (``consistency``; ``UncertifiedSurvivors`` / ``ConflictingSurvivors`` otherwise).
        """
        graph = self._require_setup("unmask")
        if self.round == 0 or round != self.round:
            raise ReplayDetected(f"unmask request for round {round}, but this site's current round is {self.round}")
        alive_set, dead_set, s_from, b_from = set(alive), set(dead), set(s_share_cts), set(b_share_cts)
        if alive_set & dead_set:
            raise ActiveDeadOverlap(f"sites {sorted(alive_set & dead_set)} are declared both alive and dead")
        if s_from & b_from:
            raise ActiveDeadOverlap(f"asked for both b- and s-shares of {sorted(s_from & b_from)}; refusing")
        unknown = (alive_set | dead_set | s_from | b_from) - set(self.participants)
        if unknown:
            raise UnknownParticipant(f"sites {sorted(unknown)} took no part in setup {self.session}")
        if self.site_id not in alive_set:
            raise UnknownParticipant(f"this site {self.site_id!r} is asked to unmask but is not in the alive set")
        if s_from & alive_set or b_from & dead_set:
            both = sorted((s_from & alive_set) | (b_from & dead_set))
            raise ActiveDeadOverlap(f"asked for shares of {both} of the kind that contradicts their alive/dead status")
        if s_from - dead_set or b_from - alive_set:
            undeclared = sorted((s_from - dead_set) | (b_from - alive_set))
            raise UnknownParticipant(f"asked for shares of {undeclared}, declared neither alive nor dead")
        strangers = sorted((b_from - graph.neighbours(self.site_id) - {self.site_id})
                           | (s_from - graph.neighbours(self.site_id)))
        if strangers:
            raise GraphMismatch(
                f"asked for shares of {strangers}, who are not neighbours of {self.site_id!r} on the graph of "
                f"{self.session} (k = {graph.degree}): the server routes by another graph; refusing"
            )
        self._check_survivors(graph, round, alive_set, dead_set, min_participants)
        if needs_certificate(graph) or signatures is not None:
            self._check_certified(round, alive, dead, signatures, roster)
            self._agree(round, alive_set)
        b_shares = {u: self._open(u, round, KIND_B, ct) for u, ct in sorted(b_share_cts.items())}
        s_shares = {u: self._open(u, SETUP_ROUND, KIND_S, ct) for u, ct in sorted(s_share_cts.items())}
        self._b_revealed |= b_from
        self._s_revealed |= s_from
        return UnmaskReply(b_shares, s_shares)

    def _check_survivors(
        self, graph: CommGraph, round: int, alive_set: set[str], dead_set: set[str], min_participants: int
    ) -> None:
        """The survivor floors and graph checks, and no site changed between alive and dead across rounds."""
        floor = max(MIN_THRESHOLD, self.threshold if graph.complete else MIN_THRESHOLD, min_participants)
        if len(alive_set) < floor:
            raise TooFewSurvivors(f"only {len(alive_set)} sites alive in round {round}, need {floor}")
        graph.check_survivors(alive_set, self.threshold)
        if alive_set & self._s_revealed or dead_set & self._b_revealed:
            flipped = sorted((alive_set & self._s_revealed) | (dead_set & self._b_revealed))
            raise ActiveDeadOverlap(
                f"sites {flipped} changed between alive and dead across rounds of setup {self.session}: releasing "
                "the other share kind would unmask an earlier update; run a new setup without them"
            )

    def _check_certified(
        self, round: int, alive: Sequence[str], dead: Sequence[str], signatures: Mapping[str, bytes] | None,
        roster: Roster | None,
    ) -> None:
        """One agreed survivor set (``consistency``): the lists are A and its complement, A is the set
        this site agreed to (if any) and a quorum of A's members signed it."""
        alive_set, dead_set = set(alive), set(dead)
        if len(alive_set) != len(alive) or len(dead_set) != len(dead):
            raise ConflictingSurvivors(f"the alive or dead list of round {round} names a site twice; refusing")
        if dead_set != set(self.participants) - alive_set:
            raise ConflictingSurvivors(
                f"the dead list of round {round} is not the participants outside the alive set (missing "
                f"{sorted(set(self.participants) - alive_set - dead_set)}): the server tells different hospitals "
                "different stories; refusing"
            )
        if self._agreed and set(self._agreed) != alive_set:
            raise ConflictingSurvivors(
                f"asked to unmask round {round} for another survivor set than the one this site signed "
                f"(differs in {sorted(set(self._agreed) ^ alive_set)}); refusing"
            )
        if signatures is None or roster is None:
            raise UncertifiedSurvivors(
                f"the unmask request for round {round} carries no signed survivor set, which a sparse graph needs "
                "(consistency round); refusing"
            )
        check_certificate(roster, self.session, round, alive, signatures, self.participants)

    def _agree(self, round: int, alive_set: set[str]) -> None:
        """Remember ``alive_set`` as this round's one survivor set; ``ConflictingSurvivors`` for a second one."""
        agreed = tuple(sorted(alive_set))
        if self._agreed and self._agreed != agreed:
            raise ConflictingSurvivors(
                f"already signed another survivor set for round {round} of {self.session} (differs in "
                f"{sorted(set(self._agreed) ^ alive_set)}): a hospital signs one set per round; refusing"
            )
        self._agreed = agreed

    def _require_setup(self, step: str) -> CommGraph:
        if self.graph is None:
            raise OutOfOrder(f"{step} before share_keys: site {self.site_id!r} has no key setup yet")
        return self.graph

    def _seal(self, receiver: str, receiver_c_pk: bytes, round: int, kind: str, share: Share) -> bytes:
        key = share_key(self._c_sk, receiver_c_pk, self.session, self.site_id, receiver)
        return seal_share(key, share_ad(self.session, round, self.site_id, receiver, kind), share)

    def _open(self, sender: str, round: int, kind: str, ct: bytes) -> Share:
        key = share_key(self._c_sk, self._c_pks[sender], self.session, self.site_id, sender)
        ad = share_ad(self.session, round, sender, self.site_id, kind)
        share = open_share(key, ad, ct, what=f"{kind}-share from {sender!r} (round {round})")
        if share.x != self.participants.index(self.site_id) + 1:  # its global point, on any graph
            raise InconsistentShares(f"{kind}-share from {sender!r} is for x={share.x}, not this site's point")
        return share

    def to_bytes(self) -> bytes:
        """Sealed JSON of the whole state (see ``client_state``); holds private keys, keep it local."""
        return seal_state(
            self.identity,
            {
                "site_id": self.site_id,
                "run_id": self.session.run_id,
                "setup_id": self.session.setup_id,
                "c_sk": self._c_sk.private_bytes_raw().hex(),
                "s_sk": self._s_sk.private_bytes_raw().hex(),
                "participants": list(self.participants),
                "threshold": self.threshold,
                "degree": self._requested_degree,
                "graph_seed": self.graph.seed.hex() if self.graph is not None else "",
                "c_pks": {k: v.hex() for k, v in self._c_pks.items()},
                "s_pks": {k: v.hex() for k, v in self._s_pks.items()},
                "round": self.round,
                "b_revealed": sorted(self._b_revealed),
                "s_revealed": sorted(self._s_revealed),
                "agreed": list(self._agreed),
            },
        )

    @staticmethod
    def from_bytes(b: bytes, identity: SiteIdentity) -> SecAggClient:
        st = open_state(identity, b)
        client = SecAggClient(
            identity,
            Session(int(st["run_id"]), int(st["setup_id"])),
            X25519PrivateKey.from_private_bytes(bytes.fromhex(st["c_sk"])),
            X25519PrivateKey.from_private_bytes(bytes.fromhex(st["s_sk"])),
        )
        client.participants = tuple(st["participants"])
        client.threshold = int(st["threshold"])
        client._requested_degree = int(st["degree"])
        if client.participants:
            seed = bytes.fromhex(st["graph_seed"])
            client.graph = CommGraph.derive(client.participants, seed, client._requested_degree)
        client._c_pks = {k: bytes.fromhex(v) for k, v in st["c_pks"].items()}
        client._s_pks = {k: bytes.fromhex(v) for k, v in st["s_pks"].items()}
        client.round = int(st["round"])
        client._b_revealed = set(st["b_revealed"])
        client._s_revealed = set(st["s_revealed"])
        client._agreed = tuple(st["agreed"])
        return client
