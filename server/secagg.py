"""Secure rounds over Flower's Grid: the server learns only the sum of the hospitals' vectors.

A round (message flow in ``common.protocol.secagg``):

1. ``train`` to every connected hospital; each trains (or declines: budget spent) and keeps its
   update; the replies carry privacy records only. The hospitals that trained are the round's
   contributors; fewer than the threshold (never below 3) → the round is abandoned and the
   record says so: a declined hospital sends no masked vector, so it can never pass as a
   survivor of a sum it did not contribute to.
2. a key setup (adverts, then encrypted s-key shares) among the contributors, unless the current
   session has exactly these participants and no s-key of theirs was ever revealed; on the
   run's graph (``secagg.degree``: 0 the complete graph, k > 0 SecAgg+'s k-regular one, which
   every hospital derives itself and must have accepted, ``common.secagg.graph``);
3. ``train.secagg_mask``: each contributor's masked vector and encrypted b-seed shares;
4. on a sparse graph only, ``train.secagg_consistency``: every survivor signs the one set of
   survivors (``common.secagg.consistency``; the complete graph skips it);
5. ``train.secagg_unmask`` to the survivors (with the signatures, on a sparse graph), then the sum.

Every round but the last also sets up the next round's session (``NextSession``): the masking
step asks each hospital for an advert of fresh keys, the unmask step carries those adverts and
collects the key shares, so the set-up takes no stage of its own. When the next round asks exactly
that session's participants to train, steps 1 and 3 are one message: the ``train`` request names
the session and round, and each hospital that trains replies with its privacy record *and* its
masked vector. A steady round is thus train-and-mask, (consistency,) unmask: one stage more than
a plain round. Only a session that served no round is used so: a hospital that declines or drops
out in that stage is a dropout of a session no earlier update depends on, so its s-key can be
reconstructed and the others' updates are summed at once (nobody trains twice). When fewer than t
masked, the round restarts and the hospitals whose update left train again (charged).

Dropouts: up to n − t contributors may vanish after masking (their s-keys are reconstructed, the
session is spent); on a sparse graph more than two thirds of the session must have masked and
signed the survivor set, while dropouts after signing cost nothing more. Fewer than t at any
step → the round restarts (``secagg.max-retries``) with a new session among whoever is still
there: updates that never left are reused (no new charge); an update that already left masked is
never masked again (the hospital refuses), so a hospital asked to train again for the round
trains again and is charged. Every wait is
``server.exchange.send_and_receive(grid, ..., round-timeout)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TypedDict, cast

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.errors import EXIT_RESTARTABLE, UserError
from common.protocol.messages import (
    ProtocolError,
    SiteReply,
    content_bytes,
    decode_reply,
    encode_train_request,
    flower_error_line,
    payload_digest,
)
from common.protocol.secagg import (
    CONSISTENCY,
    KEYS,
    MASK,
    SHARE,
    UNMASK,
    SessionRef,
    field,
    pairs,
    protocol_round,
    quantizer_for,
    secagg_record,
    split_pairs,
    str_list,
)
from common.round_record import (
    ReceivedMessage,
    RoundMetrics,
    RoundRecord,
    SecureStats,
    SiteCost,
    SitePrivacyReport,
)
from common.secagg import (
    KeyAdvert,
    MaskedInput,
    SecAggAbort,
    SecAggServer,
    Session,
    Share,
    UnmaskReply,
    default_threshold,
    effective_degree,
)
from common.weights import UpdateLayout, fedavg
from server.exchange import send_and_receive

log = logging.getLogger("medsynth.server")


#: a round's sum → (the new global model, the round's metrics): FedAvg, or the warm start's pre-training
Aggregate = Callable[[np.ndarray], tuple[dict[str, np.ndarray], RoundMetrics | None]]


def fedavg_of(global_arrays: Mapping[str, np.ndarray], layout: UpdateLayout) -> Aggregate:
    """FedAvg of ``global_arrays`` as an :data:`Aggregate` (with the losses' weighted means)."""
    def aggregate(total: np.ndarray) -> tuple[dict[str, np.ndarray], RoundMetrics | None]:
        new_arrays, means = fedavg(global_arrays, layout, total)
        return new_arrays, RoundMetrics.from_means(means)

    return aggregate


class SecureRoundFailed(UserError, RuntimeError):
    """A secure round could not complete (too few hospitals answered); it may be retried."""

    exit_code = EXIT_RESTARTABLE


def _ok(replies: list[Message], failures: list[str], step: str) -> list[Message]:
    """Replies without Flower errors or hospital error records; the rest become failure lines."""
    good = []
    for msg in replies:
        if msg.has_error():
            failures.append(f"{step}: {flower_error_line(msg)}")
        elif "privacy" in msg.content.config_records and msg.content.config_records["privacy"]["status"] == "error":
            privacy = msg.content.config_records["privacy"]
            failures.append(f"{step}: {privacy['site']!s}: {privacy['reason']!s}")
        else:
            good.append(msg)
    return good


@dataclass
class NextSession:
    """The next round's session, set up alongside this round: each hospital's advert comes with its
    masked vector, its key shares with its unmask reply (no stage of its own)."""

    setup_id: int
    adverts: dict[str, KeyAdvert] = dataclass_field(default_factory=dict)
    nodes_of: dict[str, int] = dataclass_field(default_factory=dict)  # site → Flower node
    threshold: int = 0
    cts: dict[str, dict[str, bytes]] = dataclass_field(default_factory=dict)  # sender → receiver → ciphertext


class SecureRounds:
    """Drives sessions and rounds; holds only public keys, ciphertexts and masked vectors."""

    def __init__(self, grid: Grid, run: RunConfig, run_id: int, layout: UpdateLayout) -> None:
        self.grid, self.run, self.run_id, self.layout = grid, run, run_id, layout
        self.timeout = run.federation.round_timeout_s
        self.in_flight = run.federation.messages_in_flight
        self.setup_id = 0  # the current session's id
        self.last_setup_id = 0  # the last id handed out: a session id is never used twice in a run
        self.server: SecAggServer | None = None
        self.nodes_of: dict[str, int] = {}  # site id → Flower node id, of the current session
        self.next: NextSession | None = None  # the next round's session, set up during this round
        self.prepare_next = False  # whether this round sets up the next round's session
        self.received: dict[str, list[ReceivedMessage]] = {}  # per site this round: what it sent

    def _send(self, requests: Mapping[int, RecordDict], kind: str, group: str) -> list[Message]:
        """One stage: ``requests[node]`` to each node; the replies within the round timeout."""
        messages = [
            Message(content, dst_node_id=node, message_type=kind, group_id=group) for node, content in requests.items()
        ]
        return send_and_receive(self.grid, messages, self.timeout, self.in_flight)

    def _new_setup_id(self) -> int:
        self.last_setup_id += 1
        return self.last_setup_id

    def _account(self, replies: list[Message]) -> list[Message]:
        """Add each reply (type, payload bytes and digest) to its site's messages of the round."""
        for msg in replies:
            recs = msg.content.config_records
            site = str(recs["privacy"]["site"]) if "privacy" in recs else str(recs["secagg"]["site"])
            self.received.setdefault(site, []).append(received_entry(msg))
        return replies

    @property
    def ref(self) -> SessionRef:
        return SessionRef(self.run_id, self.setup_id)

    def threshold(self, n: int) -> int:
        """max(configured, strict majority of a neighbourhood): configurable upward only, never below 3.

        A neighbourhood is the k + 1 holders of one site's shares: all n sites on the complete
        graph (``secagg.degree = 0``), k + 1 on a SecAgg+ graph (``common.secagg.graph``). A strict
        majority (2t > k + 1) means two groups of t holders always overlap, so honest holders never
        let both kinds of one site's shares be opened.
        """
        group, t = self._holders_and_threshold(n)
        if n < max(t, 3):
            raise SecureRoundFailed(f"only {n} hospitals available; secure aggregation needs at least {max(t, 3)}")
        if t > group:
            raise SecureRoundFailed(
                f"secagg.threshold = {t} exceeds the {group} holders of each hospital's shares on a graph of degree "
                f"{group - 1} among {n} hospitals: raise secagg.degree or lower secagg.threshold"
            )
        return t

    def _holders_and_threshold(self, n: int) -> tuple[int, int]:
        """Among n hospitals: the holders of each one's shares (its neighbourhood, itself included;
        0 when n = 0) and t = max(configured, their strict majority), never below 3."""
        group = effective_degree(n, self.run.federation.secagg_degree) + 1 if n > 0 else 0
        return group, max(self.run.federation.secagg_threshold, default_threshold(group))

    # ---- step 1: train ---------------------------------------------------------------------
    def train(
        self, nodes: list[int], global_arrays: dict[str, np.ndarray], server_round: int, failures: list[str],
        warm_start: np.ndarray | None = None, mask_under: SecAggServer | None = None,
    ) -> tuple[dict[str, SiteReply], dict[str, int]]:
        """Every node trains (or declines) and keeps its update; (privacy records, site → node).

        With ``mask_under`` (the current session, whose participants are exactly ``nodes``) each
        hospital also masks its update under it in the same reply (step 3 folded into step 1), and
        the masked vectors go to that session's round.
        """
        content = encode_train_request(global_arrays, server_round, warm_start)
        if mask_under is None:
            content["secagg"] = ConfigRecord({"run": str(self.run_id)})
        else:
            mask_under.begin_round(protocol_round(server_round))
            request = secagg_record(self.ref, round=server_round, **self._next_fields())
            content["secagg"] = request.config_records["secagg"]
        sent = self._send(dict.fromkeys(nodes, content), MessageType.TRAIN, str(server_round))
        privacy: dict[str, SiteReply] = {}
        node_of: dict[str, int] = {}
        for msg in self._account(_ok(sent, failures, "train")):
            reply = decode_reply(msg.content)
            privacy[reply.site_id], node_of[reply.site_id] = reply, msg.metadata.src_node_id
            if mask_under is not None and reply.status == "ok":
                self._receive_masked(mask_under, msg)
        if len(sent) < len(nodes):
            failures.append(f"train: {len(nodes) - len(sent)} hospital(s) did not answer within {self.timeout:.0f} s")
        return privacy, node_of

    # ---- step 2: session setup -------------------------------------------------------------
    def setup(self, nodes_of: Mapping[str, int], failures: list[str]) -> None:
        """Key adverts from every contributor, then their encrypted s-key shares; fresh session id."""
        self.setup_id = self._new_setup_id()
        self.server = None
        group = f"setup-{self.setup_id}"
        replies = self._account(_ok(
            self._send({n: secagg_record(self.ref) for n in nodes_of.values()}, KEYS, group),
            failures, "keys",
        ))
        adverts: dict[str, KeyAdvert] = {}
        self.nodes_of = {}
        for msg in replies:
            advert = KeyAdvert.from_bytes(cast(bytes, field(msg.content, "advert")))
            adverts[advert.site_id] = advert
            self.nodes_of[advert.site_id] = msg.metadata.src_node_id
        t = self.threshold(len(adverts))
        request = secagg_record(self.ref, threshold=t, adverts=[adverts[s].to_bytes() for s in sorted(adverts)])
        sent = self._send(dict.fromkeys(self.nodes_of.values(), request), SHARE, group)
        replies = self._account(_ok(sent, failures, "share"))
        cts = {str(field(m.content, "site")): pairs(m.content, "receivers", "cts") for m in replies}
        if set(cts) != set(adverts):
            missing = sorted(set(adverts) - set(cts))
            raise SecureRoundFailed(f"key setup incomplete: no shares from {missing}")
        server = SecAggServer(Session(self.run_id, self.setup_id), adverts, t, self.layout.size,
                              degree=self.run.federation.secagg_degree)
        server.route_s_shares(cts)
        self.server = server
        log.info("secure aggregation session %d: %d hospitals, %d neighbours each, threshold %d", self.setup_id,
                 len(adverts), server.graph.degree, t)

    def _session_of(self, nodes: list[int]) -> SecAggServer | None:
        """The current session when it has served no round yet and its participants are exactly
        ``nodes``: the round's train requests then ask for the masked update at once. (A session
        that served a round is never used so: a participant that contributed to it and then
        drops out could not be unmasked, and every other update of the round would be lost.)"""
        server = self.server
        if server is None or server.round != 0 or sorted(self.nodes_of.values()) != sorted(nodes):
            return None
        return server

    def _session_for(self, contributors: Mapping[str, int], failures: list[str]) -> SecAggServer:
        """The current session if its participants are exactly the contributors and none of them
        was ever unmasked as dropped; else a new one among the contributors."""
        server = self.server
        if server is None or set(server.participants) != set(contributors) or server.s_released:
            self.setup(contributors, failures)
            server = self.server
        if server is None:
            raise SecureRoundFailed("no session")
        return server

    # ---- steps 3-5: mask, consistency, unmask ------------------------------------------------
    def _receive_masked(self, server: SecAggServer, msg: Message) -> None:
        """A masked vector into the round; the sender's advert for the next session, if asked for."""
        site = str(field(msg.content, "site"))
        if "masked" not in msg.content.array_records:
            raise ProtocolError(f"{site} sent no masked vector")
        y = msg.content.array_records["masked"]["y"].numpy()
        server.receive_masked(site, MaskedInput(y, pairs(msg.content, "receivers", "cts")))
        if self.next is not None and "next_advert" in msg.content.config_records["secagg"]:
            advert = KeyAdvert.from_bytes(cast(bytes, field(msg.content, "next_advert")))
            if advert.site_id != site:
                raise ProtocolError(f"{site} sent an advert for the next session under the name {advert.site_id!r}")
            self.next.adverts[site], self.next.nodes_of[site] = advert, msg.metadata.src_node_id

    def _next_fields(self) -> dict[str, object]:
        """What a round's mask requests carry to start the next round's session: a new session id
        (nothing when this is the run's last round)."""
        if not self.prepare_next:
            return {}
        self.next = NextSession(self._new_setup_id())
        return {"next_setup": self.next.setup_id}

    def _next_share_fields(self, responders: set[str]) -> dict[str, object]:
        """What every unmask request carries for the next session's key shares: its id, threshold
        and the adverts of the responders that sent one (nothing when it cannot be set up)."""
        nxt = self.next
        if nxt is None:
            return {}
        nxt.adverts = {s: a for s, a in nxt.adverts.items() if s in responders}
        group, t = self._holders_and_threshold(len(nxt.adverts))
        if set(nxt.adverts) != responders or len(nxt.adverts) < max(t, 3) or t > group:
            self.next = None  # the next round sets its session up on its own
            return {}
        nxt.threshold = t
        return {"next_setup": nxt.setup_id, "next_threshold": t,
                "next_adverts": [nxt.adverts[s].to_bytes() for s in sorted(nxt.adverts)]}

    def _receive_next_shares(self, msg: Message) -> None:
        if self.next is not None and "next_cts" in msg.content.config_records["secagg"]:
            self.next.cts[str(field(msg.content, "site"))] = pairs(msg.content, "next_receivers", "next_cts")

    def _install_next(self) -> None:
        """The next session becomes the current one when every advertiser's key shares arrived."""
        nxt, self.next = self.next, None
        if nxt is None or set(nxt.cts) != set(nxt.adverts):
            return
        try:
            server = SecAggServer(Session(self.run_id, nxt.setup_id), nxt.adverts, nxt.threshold, self.layout.size,
                                  degree=self.run.federation.secagg_degree)
            server.route_s_shares(nxt.cts)
        except SecAggAbort as exc:
            log.warning("the next session %d could not be set up (%s); the next round sets one up", nxt.setup_id, exc)
            return
        self.server, self.setup_id = server, nxt.setup_id
        self.nodes_of = {site: node for site, node in nxt.nodes_of.items() if site in nxt.adverts}
        log.info("secure aggregation session %d set up with the round: %d hospitals, %d neighbours each, "
                 "threshold %d", nxt.setup_id, len(nxt.adverts), server.graph.degree, nxt.threshold)

    def _mask(self, server: SecAggServer, server_round: int, failures: list[str]) -> None:
        """Step 3 for a session set up this round: every participant's kept update, masked."""
        server.begin_round(protocol_round(server_round))
        request = secagg_record(self.ref, round=server_round, **self._next_fields())
        sent = self._send(dict.fromkeys(self.nodes_of.values(), request), MASK, str(server_round))
        for msg in self._account(_ok(sent, failures, "mask")):
            self._receive_masked(server, msg)

    def _masked_round(
        self, server: SecAggServer, server_round: int, failures: list[str]
    ) -> tuple[np.ndarray, list[str]]:
        """Steps 3-5 after a train stage that kept the updates: mask, then unmask."""
        self._mask(server, server_round, failures)
        return self._unmask(server, server_round, failures)

    def _unmask(self, server: SecAggServer, server_round: int, failures: list[str]) -> tuple[np.ndarray, list[str]]:
        """Steps 4-5 once the masked vectors are in: (the sum of the survivors' vectors, survivors)."""
        certified = self._consistency(server, server_round, failures)
        requests = server.unmask_requests()
        next_session = self._next_share_fields(set(requests))
        unmask_content: dict[int, RecordDict] = {}
        for site, (alive, dead, s_cts, b_cts) in requests.items():
            s_senders, s_blobs = split_pairs(s_cts)
            b_senders, b_blobs = split_pairs(b_cts)
            unmask_content[self.nodes_of[site]] = secagg_record(
                self.ref, round=server_round, alive=sorted(alive), dead=sorted(dead),
                s_senders=s_senders, s_cts=s_blobs, b_senders=b_senders, b_cts=b_blobs, **certified, **next_session,
            )
        unmasked = _ok(self._send(unmask_content, UNMASK, str(server_round)), failures, "unmask")
        for msg in self._account(unmasked):
            self._receive_next_shares(msg)
            site = str(field(msg.content, "site"))
            b = dict(zip(str_list(msg.content, "b_sites"), field(msg.content, "b_shares"), strict=True))  # type: ignore[call-overload]
            s = dict(zip(str_list(msg.content, "s_sites"), field(msg.content, "s_shares"), strict=True))  # type: ignore[call-overload]
            server.receive_unmask(site, UnmaskReply(
                b_shares={k: Share.from_bytes(v) for k, v in b.items()},
                s_shares={k: Share.from_bytes(v) for k, v in s.items()},
            ))
        return server.aggregate()

    def _consistency(self, server: SecAggServer, server_round: int, failures: list[str]) -> dict[str, object]:
        """On a sparse graph: every survivor signs the round's one survivor set; returns the fields
        every unmask request then carries (``signers``, ``signatures``). Nothing on the complete graph."""
        if not server.quorum:
            return {}
        alive = server.consistency_request()  # TooFewSurvivors below the quorum: the round restarts
        request = secagg_record(self.ref, round=server_round, alive=list(alive))
        nodes = {self.nodes_of[site]: request for site in alive}
        sent = self._send(nodes, CONSISTENCY, str(server_round))
        for msg in self._account(_ok(sent, failures, "consistency")):
            signature = bytes(cast(bytes, field(msg.content, "signature")))
            server.receive_signature(str(field(msg.content, "site")), signature)
        signers, signatures = split_pairs(server.certificate)
        return {"signers": signers, "signatures": signatures}

    def run_round(
        self, nodes: list[int], global_arrays: dict[str, np.ndarray], server_round: int,
        aggregate: Aggregate | None = None, warm_start: np.ndarray | None = None, prepare_next: bool = False,
    ) -> tuple[dict[str, np.ndarray] | None, RoundRecord]:
        """One secure round with bounded restarts; returns (new arrays or None, round record).

        ``aggregate`` turns the sum into the new model (default: FedAvg of the global model);
        ``warm_start`` is the summed release the train requests carry; ``prepare_next``: set up
        the next round's session alongside this round (every round but the run's last).
        """
        combine = aggregate or fedavg_of(global_arrays, self.layout)
        t0 = time.monotonic()
        failures: list[str] = []
        self.received = {}
        self.prepare_next = prepare_next
        privacy: dict[str, SiteReply] = {}
        for attempt in range(self.run.federation.secagg_max_retries + 1):
            self.next = None
            try:
                # the session already covers exactly these hospitals: train and mask in one message
                server = self._session_of(nodes)
                privacy, node_of = self.train(nodes, global_arrays, server_round, failures, warm_start, server)
                contributors = {s: n for s, n in node_of.items() if privacy[s].status == "ok"}
                _, needed = self._holders_and_threshold(len(contributors))  # the same t the session will use
                if server is None and len(contributors) < needed:
                    failures.append(
                        f"only {len(contributors)} hospital(s) trained ({', '.join(sorted(contributors)) or 'none'}); "
                        f"secure aggregation needs at least {needed}: round abandoned, no update was requested"
                    )
                    if len(privacy) == len(nodes):  # everybody answered: asking again changes nothing
                        break
                    nodes = sorted(self.grid.get_node_ids())
                    continue
                if server is None:
                    total, alive = self._masked_round(self._session_for(contributors, failures), server_round, failures)
                else:
                    total, alive = self._unmask(server, server_round, failures)
            except (SecureRoundFailed, SecAggAbort, ProtocolError) as exc:
                failures.append(f"attempt {attempt + 1}: {type(exc).__name__}: {exc}")
                log.warning("round %d attempt %d failed: %s", server_round, attempt + 1, exc)
                self.server = None  # a fresh session among whoever is still there
                nodes = sorted(self.grid.get_node_ids())
                continue
            dead = sorted(set(self.nodes_of) - set(alive))
            stats = SecureStats(session=self.setup_id, alive=tuple(alive), dead=tuple(dead), attempts=attempt + 1)
            if dead:
                self.server = None  # the dead sites' s-keys were revealed: new session next round
            self._install_next()
            vector = quantizer_for(self.run, self.layout, server_round).decode_sum(total, len(alive))
            new_arrays, metrics = combine(vector)
            return new_arrays, self._record(server_round, privacy, failures, t0, sorted(alive), metrics, stats)
        self.next = None
        return None, self._record(server_round, privacy, failures, t0, [], None, None)

    def _record(
        self, server_round: int, privacy: Mapping[str, SiteReply], failures: list[str], t0: float,
        trained: list[str], metrics: RoundMetrics | None, secure: SecureStats | None,
    ) -> RoundRecord:
        """The round's record: the hospitals' privacy reports, what they sent, the outcome."""
        return RoundRecord(
            round=server_round,
            sites_trained=tuple(trained),
            failures=tuple(failures),
            costs={site: SiteCost.of(msgs) for site, msgs in self.received.items()},
            metrics=metrics,
            secure=secure,
            seconds=round(time.monotonic() - t0, 2),
            **privacy_fields(privacy),
        )


def received_entry(msg: Message) -> ReceivedMessage:
    """What the server records of one reply: its type, size and payload digest (matches the
    hospital's audit log line for the same message)."""
    return ReceivedMessage(type=msg.metadata.message_type, group=msg.metadata.group_id,
                           bytes=content_bytes(msg.content), sha256=payload_digest(msg.content))


class PrivacyFields(TypedDict):
    """The two fields of a round record built from the hospitals' privacy records."""

    sites_budget_exhausted: tuple[str, ...]
    privacy: dict[str, SitePrivacyReport]


def privacy_fields(privacy: Mapping[str, SiteReply]) -> PrivacyFields:
    """The round record's ``sites_budget_exhausted`` and ``privacy`` from the hospitals' records
    (replies with status "error" are failures, never passed here)."""
    return PrivacyFields(
        sites_budget_exhausted=tuple(sorted(s for s, r in privacy.items() if r.status == "budget-exhausted")),
        privacy={s: privacy_entry(r) for s, r in privacy.items()},
    )


def privacy_entry(r: SiteReply) -> SitePrivacyReport:
    """A hospital's privacy report as recorded: its ledger figures, nothing else of the reply."""
    if r.status == "error":
        raise ProtocolError(f"{r.site_id}: an error reply has no privacy report")
    return SitePrivacyReport(status=r.status, epsilon=r.epsilon, epsilon_budget=r.epsilon_budget,
                             delta=r.delta, steps=r.total_steps, noise_multiplier=r.noise_multiplier)
