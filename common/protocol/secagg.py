"""Flower record encoding of the secure-aggregation messages (no Flower logic, no crypto).

Message types (ClientApp named actions) and what each carries, all in one ConfigRecord
``secagg`` (Flower run ids exceed int64, so run ids travel as strings). Per round:

    train                server → every site    global model + round + {run}
                         site → server          privacy record only: the site trains (or declines)
                                                and keeps its quantised update locally
                         server → every site    global model + round + {run, setup, round}: the
                                                sites are exactly the current session's participants
                         site → server          privacy record + what train.secagg_mask returns
                                                (masked vector, b-seed shares, next_advert); a site
                                                that declines: the privacy record only
    train.secagg_keys    server → contributors  {run, setup}                 (only for a new session)
                         site → server          {site, advert}
    train.secagg_share   server → contributors  {run, setup, threshold, adverts[]}
                         site → server          {site, receivers[], cts[]}   s-key shares, encrypted
    train.secagg_mask    server → contributors  {run, setup, round} + {next_setup} (below)
                         site → server          masked vector ``masked/y`` (uint64)
                                                + {site, receivers[], cts[]} b-seed shares, encrypted
                                                + {next_advert}                when asked
    train.secagg_consistency
                         server → survivors     {run, setup, round, alive[]}   sparse graph only (below)
                         site → server          {site, signature}              Ed25519, 64 bytes
    train.secagg_unmask  server → site          {run, setup, round, alive[], dead[], s_senders[], s_cts[],
                                                 b_senders[], b_cts[]}
                                                + {signers[], signatures[]}    sparse graph only (below)
                                                + {next_setup, next_threshold, next_adverts[]}
                         site → server          {site, b_sites[], b_shares[], s_sites[], s_shares[]}
                                                + {next_receivers[], next_cts[]}  when asked

With ``secagg.degree`` = k > 0 in the run config (SecAgg+, ``common.secagg.graph``) every site
derives the session's graph from the adverts it receives, and the ``receivers``, ``cts``,
``*_senders`` and ``*_sites`` lists then name its k + 1 closed neighbourhood only (complete graph:
every participant). When that graph is sparse, one more stage runs between mask and unmask
(``common.secagg.consistency``): ``train.secagg_consistency`` asks every survivor to sign the one
set of survivors (``alive``: the sites whose masked vector arrived), and every unmask request
carries the signatures collected (``signers``, ``signatures``), which each hospital verifies
against its pinned roster before it releases a share. On the complete graph the stage is not sent
and the unmask request has no ``signers`` (the majority threshold already stops a server that
lies about dropouts there), so a complete-graph round has the same four messages as before.

Only hospitals that trained take part in a session (contributors): one that declines sends no
masked vector and can never be counted as a survivor. A session is reused for the next round
while its participants are that round's contributors; otherwise a new one is set up. In a round
whose train requests go to exactly the current session's participants, the train request names
the session (``setup``) and round, and the hospital masks at once (no ``train.secagg_mask``): a
round of a reused session is train, (consistency,) unmask.

The next round's session is set up alongside a round (every round but the run's last): the mask
request (or the train request that masks) names a new session id (``next_setup``); each site
replies with a fresh advert for it (``next_advert``, as ``train.secagg_keys`` would), and the
unmask request carries the adverts of every site asked to unmask (``next_adverts``) with the
threshold, to which each replies with its encrypted s-key shares (``next_receivers``, ``next_cts``,
as ``train.secagg_share`` would). When every advertiser's shares arrived, that session is the next
round's, unused: if its participants are the hospitals asked to train, the round is train (and
mask), (consistency,) unmask — the key set-up costs no stage of its own, and because each round
has a session of its own, a hospital that drops out of a round is unmasked from a session no
update of an earlier round depends on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from common.config import RunConfig
from common.dp.warm_start import RELEASE_BOUND, WARM_START_ROUND, EmbeddingSpec
from common.protocol.messages import ProtocolError
from common.secagg import Quantizer
from common.weights import UpdateLayout, update_bounds

KEYS, SHARE, MASK, UNMASK = "train.secagg_keys", "train.secagg_share", "train.secagg_mask", "train.secagg_unmask"
CONSISTENCY = "train.secagg_consistency"  # sparse graph only, between MASK and UNMASK


@dataclass(frozen=True)
class SessionRef:
    """Which protocol session a message belongs to: Flower run and setup attempt."""

    run_id: int
    setup_id: int

    def fields(self) -> dict[str, str | int]:
        return {"run": str(self.run_id), "setup": self.setup_id}


def _rec(content: RecordDict) -> ConfigRecord:
    try:
        return content.config_records["secagg"]
    except KeyError as exc:
        raise ProtocolError("message lacks the 'secagg' record") from exc


def session_of(content: RecordDict) -> SessionRef:
    rec = _rec(content)
    try:
        return SessionRef(int(str(rec["run"])), int(cast(int, rec["setup"])))
    except (KeyError, ValueError) as exc:
        raise ProtocolError(f"secagg record lacks a valid session ({exc})") from exc


def run_of(content: RecordDict) -> int:
    """The Flower run id a secure ``train`` request names."""
    try:
        return int(str(_rec(content)["run"]))
    except (KeyError, ValueError) as exc:
        raise ProtocolError(f"secagg record lacks a valid run ({exc})") from exc


def field(content: RecordDict, key: str) -> object:
    try:
        return _rec(content)[key]
    except KeyError as exc:
        raise ProtocolError(f"secagg record lacks '{key}'") from exc


def str_list(content: RecordDict, key: str) -> list[str]:
    return [str(v) for v in cast(list[str], field(content, key))]


def bytes_list(content: RecordDict, key: str) -> list[bytes]:
    return [bytes(v) for v in cast(list[bytes], field(content, key))]


def optional_pairs(content: RecordDict, keys: str, values: str) -> dict[str, bytes] | None:
    """``pairs`` when the record has ``keys``, else None (a field only some requests carry)."""
    return pairs(content, keys, values) if keys in _rec(content) else None


def pairs(content: RecordDict, keys: str, values: str) -> dict[str, bytes]:
    k, v = str_list(content, keys), bytes_list(content, values)
    if len(k) != len(v):
        raise ProtocolError(f"'{keys}' and '{values}' differ in length")
    return dict(zip(k, v, strict=True))


def secagg_record(session: SessionRef | None = None, /, **values: object) -> RecordDict:
    """A RecordDict holding one ``secagg`` ConfigRecord (session fields first)."""
    data: dict[str, object] = dict(session.fields()) if session else {}
    data.update(values)
    return RecordDict({"secagg": ConfigRecord(data)})  # type: ignore[arg-type]


def split_pairs(mapping: Mapping[str, bytes]) -> tuple[list[str], list[bytes]]:
    keys = sorted(mapping)
    return keys, [mapping[k] for k in keys]


def protocol_round(server_round: int) -> int:
    """The secure-aggregation round of a Flower round: ``server_round + 1``.

    The protocol binds its key setup to round 0 (``common.secagg.client.SETUP_ROUND``: the
    associated data of the s-key shares) and needs rounds to increase, so data rounds start at 1;
    Flower round 0 (the warm-start release) is protocol round 1, Flower round r is r + 1.
    """
    return server_round + 1


def quantizer_for(run: RunConfig, layout: UpdateLayout, server_round: int) -> Quantizer:
    """The ring encoding both sides agree on for a round; bounds follow from the training config.

    Round 0 of a warm-started run carries the release (``common.dp.embedding``) in front of
    zeros: its coordinates get ``RELEASE_BOUND``, the rest the smallest bound (they are 0).
    """
    if server_round == WARM_START_ROUND:
        size = EmbeddingSpec.of(run).size
        return Quantizer(np.concatenate([np.full(size, RELEASE_BOUND), np.ones(layout.size - size)]))
    return Quantizer(
        update_bounds(
            layout,
            lr_d=run.train.lr_d,
            lr_g=run.train.lr_g,
            beta1=run.train.beta1,
            d_steps=run.train.local_steps,
            g_steps=run.train.local_steps // run.train.d_steps_per_g,
        )
    )
