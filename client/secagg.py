"""A hospital's side of secure aggregation: the named actions, as typed functions.

The protocol itself (keys, masks, shares, guards) is ``common.secagg``; this module loads the
site's long-lived signing key and the roster (refused unless it is exactly the membership the
hospital pinned), keeps the per-run protocol state in Flower's ``context.state`` between
messages, and quantises the update vector into the ring.

A round, seen from the hospital (see ``common.protocol.secagg``):

1. ``train``: check, charge, train, quantise; the update stays here (``context.state``) and only
   the privacy record leaves. A hospital that declines (budget spent) keeps nothing to mask, so
   it can never be counted as a survivor of a sum it did not contribute to. When the request
   names this hospital's current session (a round whose session was set up alongside the round
   before), step 3 follows in the same reply; its session checks run before anything is trained;
2. key setup among the hospitals that trained (when no session was set up with the round before);
3. ``mask``: the cached update, masked under the session's keys, leaves — at most once: its
   digest is recorded on disk first (``client.release``), and a second session asking for the
   same update is refused (``AlreadyReleased``). The update is then dropped from
   ``context.state`` (its digest stays): Flower passes that state to and from every later
   message, and nothing needs the update once it has left. Asked to ``train`` again for that
   round, the hospital trains again (charged like any round) instead of re-sending what left.
   When asked (``next_setup``), fresh keys for the next round's session leave with it (an advert,
   as in step 2), kept as ``STATE_NEXT``;
4. on a sparse graph only, ``consistency``: the hospital signs the round's one survivor set, at
   most one per round (``common.secagg.consistency``);
5. ``unmask``: shares, after the protocol's guards (on a sparse graph: a quorum of signatures on
   the request's survivor set, checked against the pinned roster) and the hospital's own
   ``min-participants``; with the next session's adverts, this hospital's key shares for it
   (step 2's checks), and that session becomes its current one.
"""

from __future__ import annotations

import hashlib
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client.release import ReleaseRecord
from common.config import RunConfig, SiteConfig
from common.errors import MissingFile
from common.protocol.messages import (
    ProtocolError,
    SiteReply,
    decode_reply,
    decode_train_request,
    decode_warm_start,
    encode_reply,
)
from common.protocol.secagg import (
    SessionRef,
    bytes_list,
    field,
    optional_pairs,
    pairs,
    protocol_round,
    quantizer_for,
    run_of,
    secagg_record,
    session_of,
    split_pairs,
    str_list,
)
from common.secagg import (
    KeyAdvert,
    NothingToMask,
    ReplayDetected,
    Roster,
    SecAggClient,
    Session,
    SiteIdentity,
)
from common.weights import UpdateLayout

STATE_CLIENT, STATE_UPDATE, STATE_PRIVACY = "secagg-client", "secagg-update", "secagg-privacy"
#: (run, round, digest) of the update that left masked; the update itself is then dropped from the
#: state, which Flower hands to every later message (1.3 MB each way at the default model)
STATE_LEFT = "secagg-left"
#: the next round's session while it is set up alongside this round (advert sent, shares not yet)
STATE_NEXT = "secagg-next"


def _identity(site: SiteConfig) -> SiteIdentity:
    if not site.signing_key_path.is_file():
        raise MissingFile(
            f"secure aggregation signing key {site.signing_key_path} is missing; create the site's keys "
            "(medsynth simulate does it for virtual hospitals)"
        )
    return SiteIdentity.load(site.signing_key_path, site.site_id)


def pinned_roster(site: SiteConfig) -> Roster:
    """The operator's roster, refused (``MembershipMismatch``) unless it is exactly the membership
    this hospital pinned in its own configuration."""
    roster = Roster.load(site.roster_path)
    roster.check_pinned(dict(site.members))
    return roster


def _save_client(state: RecordDict, client: SecAggClient) -> None:
    state[STATE_CLIENT] = ConfigRecord({"blob": client.to_bytes()})


def _load_client(state: RecordDict, site: SiteConfig, session: SessionRef, key: str = STATE_CLIENT) -> SecAggClient:
    """The protocol state kept under ``key`` (the current session, or ``STATE_NEXT``), refused
    (``ReplayDetected``) unless it is ``session``'s."""
    if key not in state.config_records:
        raise ReplayDetected(f"no secure-aggregation session at {site.site_id} for {session}; the key setup "
                             "for this run never reached this site")
    client = SecAggClient.from_bytes(cast(bytes, state.config_records[key]["blob"]), _identity(site))
    if (client.session.run_id, client.session.setup_id) != (session.run_id, session.setup_id):
        raise ReplayDetected(
            f"message for session {session.run_id}/{session.setup_id}, but this site is in "
            f"{client.session.run_id}/{client.session.setup_id}"
        )
    return client


def advertise_keys(site: SiteConfig, content: RecordDict, state: RecordDict) -> RecordDict:
    """Setup step 1: fresh per-session X25519 keys, signed with the site's Ed25519 key."""
    client, advert = _start(site, session_of(content))
    _save_client(state, client)
    return secagg_record(site=site.site_id, advert=advert.to_bytes())


def _start(site: SiteConfig, ref: SessionRef) -> tuple[SecAggClient, KeyAdvert]:
    pinned_roster(site)  # refuse a tampered roster before anything of this session leaves
    return SecAggClient.start(_identity(site), Session(ref.run_id, ref.setup_id))


def share_keys(run: RunConfig, site: SiteConfig, content: RecordDict, state: RecordDict) -> RecordDict:
    """Setup step 2: check every advert against the pinned roster, derive the run's graph
    (``secagg.degree``; refused below the hospital's ``min-neighbours``), send encrypted s-key
    shares to this hospital's neighbourhood."""
    client = _load_client(state, site, session_of(content))
    receivers, blobs = _share(run, site, client, content, "adverts", "threshold")
    _save_client(state, client)
    return secagg_record(site=site.site_id, receivers=receivers, cts=blobs)


def _share(run: RunConfig, site: SiteConfig, client: SecAggClient, content: RecordDict, adverts_key: str,
           threshold_key: str) -> tuple[list[str], list[bytes]]:
    """``client``'s encrypted s-key shares for the adverts in ``content[adverts_key]``, after every
    check of ``SecAggClient.share_keys`` against this hospital's pins and settings."""
    adverts = {a.site_id: a for a in (KeyAdvert.from_bytes(b) for b in bytes_list(content, adverts_key))}
    cts = client.share_keys(adverts, pinned_roster(site), int(cast(int, field(content, threshold_key))),
                            min_participants=site.min_participants, degree=run.federation.secagg_degree,
                            min_degree=site.min_neighbours)
    return split_pairs(cts)


def _cached(state: RecordDict, run_id: int, server_round: int) -> tuple[np.ndarray | None, SiteReply] | None:
    """(quantised update or None when the site declined, privacy record) cached for (run, round)."""
    meta = state.config_records.get(STATE_PRIVACY)
    if meta is None or (str(meta["run"]), meta["round"]) != (str(run_id), server_round):
        return None
    reply = decode_reply(RecordDict({"privacy": meta}))
    update = state.array_records.get(STATE_UPDATE)
    return (update["x"].numpy() if update is not None else None), reply


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def masking_session(content: RecordDict) -> SessionRef | None:
    """The session a ``train`` request asks the update to be masked under at once, or None (train
    and keep it for a later ``train.secagg_mask``). The server asks so when the hospitals it asks
    to train are exactly the participants of a session that served no round yet (``server.secagg``)."""
    return session_of(content) if "setup" in content.config_records["secagg"] else None


def train_secure(
    run: RunConfig, site: SiteConfig, content: RecordDict, state: RecordDict, *, run_id: int
) -> RecordDict:
    """Train once (ledger first), quantise, keep the update here; the reply is the privacy record,
    and, when the request names this hospital's current session (``masking_session``), the update
    masked under it (exactly what ``mask`` would send next).

    An update already trained for (run, round) that has not left is reused (no new charge): a
    restart after an early dropout costs nothing. One that left masked is never sent again, so
    a new request to train for that round trains again. A request to mask at once is checked
    against the session before anything is trained (``SecAggClient.check_can_mask``): a request
    this hospital would refuse to mask costs it nothing.
    """
    if run_of(content) != run_id:
        raise ReplayDetected(f"train request names run {run_of(content)}, this is run {run_id}")
    pinned_roster(site)  # a roster this hospital would refuse at setup: refuse before charging anything
    arrays, server_round = decode_train_request(content)
    session = masking_session(content)
    if session is not None:
        if int(cast(int, field(content, "round"))) != server_round:
            raise ProtocolError(f"the secagg record names round {field(content, 'round')}, the request {server_round}")
        _load_client(state, site, session).check_can_mask(protocol_round(server_round))
    out = _train_or_reuse(run, site, arrays, content, state, run_id=run_id, server_round=server_round)
    if session is None or decode_reply(out).status != "ok":
        return out  # kept for a later mask request; or declined: nothing to mask, never a survivor
    nxt = {"next_setup": field(content, "next_setup")} if "next_setup" in content.config_records["secagg"] else {}
    masked = mask(site, secagg_record(session, round=server_round, **nxt), state)
    out["secagg"], out["masked"] = masked.config_records["secagg"], masked.array_records["masked"]
    return out


def _train_or_reuse(
    run: RunConfig, site: SiteConfig, arrays: dict[str, np.ndarray], content: RecordDict, state: RecordDict, *,
    run_id: int, server_round: int,
) -> RecordDict:
    """The privacy record of (run, round)'s update, trained now unless one trained for it is still here."""
    cached = _cached(state, run_id, server_round)
    if cached is not None:
        x, reply = cached
        released = ReleaseRecord.read(site.released_path).releases(run_id, server_round)
        if x is not None and all(r.sha256 != _digest(x) for r in released):
            return encode_reply(reply)
    from client.task import train_round  # torch & Opacus: only the step that trains loads them

    reply = train_round(run, site, arrays, run_id=run_id, server_round=server_round,
                        warm_start=decode_warm_start(content))
    state.array_records.pop(STATE_UPDATE, None)
    state.config_records.pop(STATE_LEFT, None)  # what a mask request now refers to is this round's new reply
    if reply.update is not None:
        x = quantizer_for(run, UpdateLayout.of(arrays), server_round).encode(reply.update)  # ValueOutOfRange: refuse
        state[STATE_UPDATE] = ArrayRecord({"x": Array(x)})
    out = encode_reply(SiteReply(**{**reply.__dict__, "update": None}))  # the privacy record alone
    state[STATE_PRIVACY] = ConfigRecord({**out.config_records["privacy"], "run": str(run_id), "round": server_round})
    return out


def mask(site: SiteConfig, content: RecordDict, state: RecordDict) -> RecordDict:
    """The cached update, masked under this session's keys; recorded as released before it leaves."""
    ref = session_of(content)
    server_round = int(cast(int, field(content, "round")))
    client = _load_client(state, site, ref)
    cached = _cached(state, ref.run_id, server_round)
    if cached is None or cached[0] is None:
        left = state.config_records.get(STATE_LEFT)
        if left is not None and (str(left["run"]), left["round"]) == (str(ref.run_id), server_round):
            ReleaseRecord.read(site.released_path).refuse_again(ref.run_id, server_round, ref.setup_id,
                                                                str(left["sha256"]))  # AlreadyReleased
        raise NothingToMask(f"site {site.site_id} trained no update for run {ref.run_id} round {server_round}")
    x, digest = cached[0], _digest(cached[0])
    next_advert = _start_next(site, content, state)
    masked = client.mask(protocol_round(server_round), x)
    with ReleaseRecord.locked(site.released_path) as record:
        record.record(ref.run_id, server_round, ref.setup_id, digest)  # AlreadyReleased: refuse
    _save_client(state, client)
    state.array_records.pop(STATE_UPDATE)  # it left; never masked again, so no later message carries it
    state[STATE_LEFT] = ConfigRecord({"run": str(ref.run_id), "round": server_round, "sha256": digest})
    receivers, blobs = split_pairs(masked.b_share_cts)
    out = secagg_record(site=site.site_id, receivers=receivers, cts=blobs, **next_advert)
    out["masked"] = ArrayRecord({"y": Array(masked.y)})
    return out


def _start_next(site: SiteConfig, content: RecordDict, state: RecordDict) -> dict[str, bytes]:
    """When the mask request names the next round's session (``next_setup``): fresh keys for it,
    as ``advertise_keys`` makes them, kept as ``STATE_NEXT``; the advert's reply field."""
    if "next_setup" not in content.config_records["secagg"]:
        return {}
    ref = session_of(content)
    nxt = SessionRef(ref.run_id, int(cast(int, field(content, "next_setup"))))
    if nxt.setup_id == ref.setup_id:
        raise ReplayDetected(f"the next session {nxt.setup_id} is the current one")
    client, advert = _start(site, nxt)
    state[STATE_NEXT] = ConfigRecord({"blob": client.to_bytes()})
    return {"next_advert": advert.to_bytes()}


def _share_next(run: RunConfig, site: SiteConfig, content: RecordDict, state: RecordDict) -> dict[str, object]:
    """When the unmask request carries the next session's adverts: this hospital's key shares for
    it (``share_keys``' checks and reply), and that session becomes the current one here."""
    if "next_adverts" not in content.config_records["secagg"]:
        return {}
    nxt = SessionRef(session_of(content).run_id, int(cast(int, field(content, "next_setup"))))
    client = _load_client(state, site, nxt, STATE_NEXT)
    receivers, blobs = _share(run, site, client, content, "next_adverts", "next_threshold")
    _save_client(state, client)
    state.config_records.pop(STATE_NEXT)
    return {"next_receivers": receivers, "next_cts": blobs}


def sign_survivors(site: SiteConfig, content: RecordDict, state: RecordDict) -> RecordDict:
    """The consistency stage (sparse graph): this hospital's signature on the round's survivor set,
    one set per round (remembered in the sealed protocol state)."""
    ref = session_of(content)
    client = _load_client(state, site, ref)
    signature = client.sign_survivors(protocol_round(int(cast(int, field(content, "round")))),
                                      str_list(content, "alive"), min_participants=site.min_participants)
    _save_client(state, client)
    return secagg_record(site=site.site_id, signature=signature)


def unmask(run: RunConfig, site: SiteConfig, content: RecordDict, state: RecordDict) -> RecordDict:
    """Reveal b-shares of the alive and s-shares of the dead, after the protocol's checks (on a
    sparse graph: the survivor set's signatures, verified against the roster this hospital pinned);
    with the next round's adverts, also this hospital's key shares for that session."""
    ref = session_of(content)
    client = _load_client(state, site, ref)
    signatures = optional_pairs(content, "signers", "signatures")
    reply = client.unmask(
        protocol_round(int(cast(int, field(content, "round")))),
        str_list(content, "alive"),
        str_list(content, "dead"),
        pairs(content, "s_senders", "s_cts"),
        pairs(content, "b_senders", "b_cts"),
        min_participants=site.min_participants,
        signatures=signatures,
        roster=pinned_roster(site) if signatures is not None else None,
    )
    _save_client(state, client)
    next_shares = _share_next(run, site, content, state)  # the next session replaces this one here
    b_sites, s_sites = sorted(reply.b_shares), sorted(reply.s_shares)
    return secagg_record(
        site=site.site_id,
        b_sites=b_sites,
        b_shares=[reply.b_shares[s].to_bytes() for s in b_sites],
        s_sites=s_sites,
        s_shares=[reply.s_shares[s].to_bytes() for s in s_sites],
        **next_shares,
    )
