"""A hospital's side of secure aggregation: the four named actions, as typed functions.

The protocol itself (keys, masks, shares, guards) is ``common.secagg``; this module loads the
site's long-lived signing key and roster, keeps the per-run protocol state in Flower's
``context.state`` between messages, and quantises the update vector into the ring.

A site that declines to train (budget spent) still masks a zero vector with weight 0, so its
pairwise masks cancel and the round needs no special case; the server learns it declined
only from the plain privacy record, which it is allowed to see.

A protocol restart of the same round (after an early dropout elsewhere) re-masks the update
cached for that (run, round) under the new session's keys: the site never trains, and so
never spends privacy, twice for one round because of the protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.config import RunConfig, SiteConfig
from common.protocol import SiteReply, decode_reply, decode_train_request, encode_reply
from common.secagg import KeyAdvert, ReplayDetected, Roster, SecAggClient, Session, SiteIdentity
from common.secure_protocol import (
    SessionRef,
    bytes_list,
    field,
    pairs,
    quantizer_for,
    secagg_record,
    session_of,
    split_pairs,
    str_list,
)
from common.weights import UpdateLayout

STATE_CLIENT, STATE_UPDATE, STATE_PRIVACY = "secagg-client", "secagg-update", "secagg-privacy"


def timed(action: Callable[..., RecordDict]) -> Callable[..., RecordDict]:
    """Add ``cpu-s`` (this process's CPU seconds in the protocol step) to the secagg record.

    Training time is excluded: ``masked_update`` subtracts it. Reported in plain text; it is
    not data-dependent, and the benchmark reads it.
    """

    def wrapper(*args: object, **kwargs: object) -> RecordDict:
        t0 = time.process_time()
        out = action(*args, **kwargs)
        rec = out.config_records["secagg"]
        rec["cpu-s"] = time.process_time() - t0 - float(cast(float, rec.get("train-cpu-s", 0.0)))
        return out

    return wrapper


def _identity(site: SiteConfig) -> SiteIdentity:
    if not site.signing_key_path.is_file():
        raise FileNotFoundError(
            f"secure aggregation signing key {site.signing_key_path} is missing; create the site's keys "
            "(medsynth simulate does it for virtual hospitals)"
        )
    return SiteIdentity.load(site.signing_key_path, site.site_id)


def _save_client(state: RecordDict, client: SecAggClient) -> None:
    state[STATE_CLIENT] = ConfigRecord({"blob": client.to_bytes()})


def _load_client(state: RecordDict, site: SiteConfig, session: SessionRef) -> SecAggClient:
    if STATE_CLIENT not in state.config_records:
        raise ReplayDetected(f"no secure-aggregation session at {site.site_id} for {session}; the key setup "
                             "for this run never reached this site")
    client = SecAggClient.from_bytes(cast(bytes, state.config_records[STATE_CLIENT]["blob"]), _identity(site))
    if (client.session.run_id, client.session.setup_id) != (session.run_id, session.setup_id):
        raise ReplayDetected(
            f"message for session {session.run_id}/{session.setup_id}, but this site is in "
            f"{client.session.run_id}/{client.session.setup_id}"
        )
    return client


@timed
def advertise_keys(site: SiteConfig, content: RecordDict, state: RecordDict) -> RecordDict:
    """Setup step 1: fresh per-session X25519 keys, signed with the site's Ed25519 key."""
    ref = session_of(content)
    client, advert = SecAggClient.start(_identity(site), Session(ref.run_id, ref.setup_id))
    _save_client(state, client)
    return secagg_record(site=site.site_id, advert=advert.to_bytes())


@timed
def share_keys(site: SiteConfig, content: RecordDict, state: RecordDict) -> RecordDict:
    """Setup step 2: check every advert against the roster, send encrypted shares of the s-key."""
    ref = session_of(content)
    client = _load_client(state, site, ref)
    adverts = {a.site_id: a for a in (KeyAdvert.from_bytes(b) for b in bytes_list(content, "adverts"))}
    cts = client.share_keys(adverts, Roster.load(site.roster_path), int(cast(int, field(content, "threshold"))))
    _save_client(state, client)
    receivers, blobs = split_pairs(cts)
    return secagg_record(site=site.site_id, receivers=receivers, cts=blobs)


def _cached(state: RecordDict, run_id: int, server_round: int) -> tuple[np.ndarray, SiteReply] | None:
    meta = state.config_records.get(STATE_PRIVACY)
    if meta is None or (str(meta["run"]), meta["round"]) != (str(run_id), server_round):
        return None
    reply = decode_reply(RecordDict({"privacy": meta}))  # the record this site sent for the round
    return state.array_records[STATE_UPDATE]["x"].numpy(), reply


@timed
def masked_update(
    run: RunConfig, site: SiteConfig, content: RecordDict, state: RecordDict, *, run_id: int
) -> RecordDict:
    """A round: train once (ledger first), quantise, mask; reply = privacy record + masked vector."""
    ref = session_of(content)
    client = _load_client(state, site, ref)
    arrays, server_round = decode_train_request(content)
    layout = UpdateLayout.of(arrays)
    cached = _cached(state, run_id, server_round)
    train_cpu = 0.0
    if cached is None:
        t_train = time.process_time()  # training, including importing torch, is not protocol time
        from client.task import train_round  # torch & Opacus: only the step that trains loads them

        reply = train_round(run, site, arrays, run_id=run_id, server_round=server_round)
        train_cpu = time.process_time() - t_train
        vector = reply.update if reply.update is not None else np.zeros(layout.size)  # declined: weight 0
        x = quantizer_for(run, layout).encode(vector)  # ValueOutOfRange: refuse, never clip
        state[STATE_UPDATE] = ArrayRecord({"x": Array(x)})
        privacy = encode_reply(reply).config_records["privacy"]
        state[STATE_PRIVACY] = ConfigRecord({**privacy, "run": str(run_id), "round": server_round})
    else:
        x, reply = cached
    masked = client.mask(server_round, x)
    _save_client(state, client)
    out = encode_reply(SiteReply(**{**reply.__dict__, "update": None}))
    receivers, blobs = split_pairs(masked.b_share_cts)
    out["masked"] = ArrayRecord({"y": Array(masked.y)})
    out["secagg"] = ConfigRecord({**ref.fields(), "receivers": receivers, "cts": blobs, "train-cpu-s": train_cpu})
    return out


@timed
def unmask(site: SiteConfig, content: RecordDict, state: RecordDict) -> RecordDict:
    """Reveal b-shares of the alive and s-shares of the dead, after the protocol's checks."""
    ref = session_of(content)
    client = _load_client(state, site, ref)
    reply = client.unmask(
        int(cast(int, field(content, "round"))),
        str_list(content, "alive"),
        str_list(content, "dead"),
        pairs(content, "s_senders", "s_cts"),
        pairs(content, "b_senders", "b_cts"),
    )
    _save_client(state, client)
    b_sites, s_sites = sorted(reply.b_shares), sorted(reply.s_shares)
    return secagg_record(
        site=site.site_id,
        b_sites=b_sites,
        b_shares=[reply.b_shares[s].to_bytes() for s in b_sites],
        s_sites=s_sites,
        s_shares=[reply.s_shares[s].to_bytes() for s in s_sites],
    )

