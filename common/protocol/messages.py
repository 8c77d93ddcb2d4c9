"""What travels between server and hospitals, and its Flower record encoding.

Server → hospital (``train``): ``global`` (ArrayRecord: every ``g.*``/``d.*`` tensor),
``round`` (ConfigRecord: ``round``; round 0 asks for the warm-start release) and, in runs with a
warm start, ``warm-start`` (ArrayRecord ``sum``: the summed release of round 0, DP output, which
every G step is anchored to; ``common.dp.embedding``).

Server → hospital after the last round (:data:`FINAL_MODEL`, ``query.final_model``): ``global`` and
``round`` as in a train request, the final global model, which the hospital keeps (for ``medsynth
node evaluate``) and does not train on. Its answer (``kept``: site id and round, both public) says
only that it arrived.

Hospital → server: ``update`` (ArrayRecord with one ``vector``: the packed update, see
``common.weights``; absent when the hospital did not train) and ``privacy`` (ConfigRecord:
site id, status, cumulative epsilon, budget, delta, total steps, the round's noise multiplier σ
when it trained or released, reason). The privacy record is the only plain-text part, and every
value in it is a function of public run parameters and the hospital's own settings: ε is
computed from (σ, q, steps) with the run's public sample rate q (``dp.sample-rate``, never a
batch over a patient count) and σ calibrated from q, the planned steps, the hospital's budget,
per-run cap and δ and its ledger's earlier (σ, q, steps), themselves computed the same way; the
warm-start release's σ from the budget share alone (``common.dp.plan``). So two hospitals with
the same settings and different patient counts send identical records. An error reply's ``reason`` is one of the
fixed texts of ``ERRORS`` (a code and a sentence, never a value: a loss or a count in an error
message would leave without DP); the detail stays in the hospital's own log and audit log.
Everything else that leaves is inside ``vector``: DP output or public.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from common.errors import UserError
from common.round_record import RecordError, SitePrivacyReport, reports_from_json, reports_to_json

Status = Literal["ok", "budget-exhausted", "error"]
STATUSES: tuple[str, ...] = ("ok", "budget-exhausted", "error")


#: code → the fixed sentence a hospital's error reply carries (``reason = "code: sentence"``).
ERRORS: dict[str, str] = {
    "run-refused": "the run asks for privacy parameters or classes this hospital's settings do not allow; "
                   "nothing was charged or sent",
    "noise-refused": "the run would train at a noise multiplier above the hospital's max-noise-multiplier "
                     "(what is left of its budget is too little for the rounds asked); nothing was charged",
    "config": "the hospital's node configuration needs fixing (see the hospital's node log)",
    "model-refused": "the global model was refused (not the run's model, or a non-finite or out-of-range "
                     "value); nothing was charged",
    "membership": "the roster differs from the consortium membership this hospital pinned; nothing was sent",
    "already-released": "this round's update already left the hospital masked in another session; it is "
                        "never masked again",
    "nothing-to-mask": "the hospital has no trained update for this round",
    "secagg-abort": "the hospital aborted secure aggregation (see its audit log)",
    "out-of-range": "the trained update does not fit the secure-sum bounds; it was not sent",
    "ledger": "the hospital's privacy ledger needs its privacy officer (see the hospital's node log)",
    "data": "the hospital's data could not be read (see the hospital's node log)",
    "protocol": "the request was malformed",
    "internal": "unexpected error at the hospital (see the hospital's node log)",
}


def error_reason(code: str) -> str:
    """The fixed ``reason`` text of an error reply."""
    return f"{code}: {ERRORS[code]}"


class ProtocolError(UserError, ValueError):
    """A message lacks a record or field this protocol requires."""


@dataclass(frozen=True)
class SiteReply:
    """A hospital's answer to one round. Only ``update`` is data-dependent."""

    site_id: str
    status: Status
    epsilon: float  # cumulative, recomputed from the ledger after this round
    epsilon_budget: float
    delta: float
    total_steps: int
    noise_multiplier: float | None
    update: np.ndarray | None  # (layout.size,) float64
    reason: str = ""  # for status "error": error_reason(code), a fixed text without values


def flower_error_line(msg: Message) -> str:
    """A Flower-level error reply as one readable line (the last line of its traceback)."""
    lines = (msg.error.reason or "").strip().splitlines()
    return f"node {msg.metadata.src_node_id}: {lines[-1] if lines else 'error ' + str(msg.error.code)}"


def encode_train_request(arrays: dict[str, np.ndarray], server_round: int,
                         warm_start: np.ndarray | None = None) -> RecordDict:
    record = ArrayRecord()
    for name, value in arrays.items():
        record[name] = Array(np.ascontiguousarray(value))
    content = RecordDict({"global": record, "round": ConfigRecord({"round": server_round})})
    if warm_start is not None:
        content["warm-start"] = ArrayRecord({"sum": Array(np.ascontiguousarray(warm_start, dtype=np.float64))})
    return content


#: the message type of the final model (Flower's ``query`` category: nothing is trained or charged)
FINAL_MODEL = "query.final_model"


def encode_final_model(arrays: dict[str, np.ndarray], model_round: int,
                       reports: Mapping[str, SitePrivacyReport]) -> RecordDict:
    """The final global model (after round ``model_round``), in the layout of a train request, with
    every hospital's newest privacy report (public: ε is a function of σ, q and steps), so that a
    hospital's exports can name every hospital's ε."""
    content = encode_train_request(arrays, model_round)
    content["privacy-reports"] = ConfigRecord({"json": reports_to_json(reports)})
    return content


def decode_final_model(content: RecordDict) -> tuple[dict[str, np.ndarray], int, dict[str, SitePrivacyReport]]:
    """(the final global model, the round it is the result of, every hospital's privacy report)."""
    arrays, model_round = decode_train_request(content)
    record = content.config_records.get("privacy-reports")
    if record is None or not isinstance(record.get("json"), str):
        raise ProtocolError("the final model lacks its privacy reports")
    try:
        reports = reports_from_json(cast(str, record["json"]), source="the final model")
    except RecordError as exc:
        raise ProtocolError(str(exc)) from exc
    return arrays, model_round, reports


def encode_final_ack(site_id: str, model_round: int) -> RecordDict:
    """A hospital's answer to the final model: which site kept which round (public values only)."""
    return RecordDict({"kept": ConfigRecord({"site": site_id, "round": int(model_round)})})


def decode_final_ack(content: RecordDict) -> tuple[str, int]:
    """(site id, round) of a hospital's answer to the final model."""
    try:
        kept = content.config_records["kept"]
        return str(kept["site"]), int(cast(int, kept["round"]))
    except KeyError as exc:
        raise ProtocolError(f"final-model answer lacks {exc}") from exc


def decode_warm_start(content: RecordDict) -> np.ndarray | None:
    """The summed warm-start release a train request carries, or None."""
    record = content.array_records.get("warm-start")
    if record is None:
        return None
    if "sum" not in record:
        raise ProtocolError("the warm-start record lacks 'sum'")
    return np.asarray(record["sum"].numpy(), dtype=np.float64)


def decode_train_request(content: RecordDict) -> tuple[dict[str, np.ndarray], int]:
    try:
        record = content.array_records["global"]
        server_round = int(cast(int, content.config_records["round"]["round"]))
    except KeyError as exc:
        raise ProtocolError(f"train request lacks {exc}") from exc
    return {name: arr.numpy() for name, arr in record.items()}, server_round


def encode_reply(reply: SiteReply) -> RecordDict:
    privacy = ConfigRecord(
        {
            "site": reply.site_id,
            "status": reply.status,
            "epsilon": float(reply.epsilon),
            "epsilon-budget": float(reply.epsilon_budget),
            "delta": float(reply.delta),
            "steps": int(reply.total_steps),
            "reason": reply.reason,
        }
    )
    if reply.noise_multiplier is not None:
        privacy["noise-multiplier"] = float(reply.noise_multiplier)
    content = RecordDict({"privacy": privacy})
    if reply.update is not None:
        content["update"] = ArrayRecord({"vector": Array(np.ascontiguousarray(reply.update))})
    return content


def decode_reply(content: RecordDict) -> SiteReply:
    try:
        p = content.config_records["privacy"]
        status = str(p["status"])
        if status not in STATUSES:
            raise ProtocolError(f"unknown status {status!r}")
        update = None
        if "update" in content.array_records:
            update = content.array_records["update"]["vector"].numpy().astype(np.float64)
        return SiteReply(
            site_id=str(p["site"]),
            status=cast(Status, status),
            epsilon=float(cast(float, p["epsilon"])),
            epsilon_budget=float(cast(float, p["epsilon-budget"])),
            delta=float(cast(float, p["delta"])),
            total_steps=int(cast(int, p["steps"])),
            # σ is a function of public values (see the module docstring): q is the run's public
            # dp.sample-rate, not batch / patients, so it may leave with ε; absent when not trained
            noise_multiplier=float(cast(float, p["noise-multiplier"])) if "noise-multiplier" in p else None,
            update=update,
            reason=str(p["reason"]),
        )
    except KeyError as exc:
        raise ProtocolError(f"reply lacks {exc}") from exc


def content_bytes(content: RecordDict) -> int:
    """Payload size of a message: array bytes plus bytes/str values of config records."""
    total = sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())
    for rec in content.config_records.values():
        for value in rec.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total


def payload_digest(content: RecordDict) -> str:
    """SHA-256 of a message's payload, identical on both ends of the wire.

    Covers every array (record name, key, dtype, shape, raw bytes) and every config value
    (record name, key, typed value), in sorted order, each length-prefixed. The hospital's
    audit log and the server's round record both hold it, so an auditor can match what left
    the hospital with what the server received.
    """
    h = hashlib.sha256()

    def put(tag: str, blob: bytes) -> None:
        h.update(tag.encode() + len(blob).to_bytes(8, "big") + blob)

    for name in sorted(content.array_records):
        rec = content.array_records[name]
        for key in sorted(rec):
            arr = rec[key]
            put("a", f"{name}/{key}/{arr.dtype}/{tuple(arr.shape)}".encode())
            put("d", arr.data)
    for name in sorted(content.config_records):
        crec = content.config_records[name]
        for key in sorted(crec):
            value = crec[key]
            for item in value if isinstance(value, list) else [value]:
                blob = item if isinstance(item, bytes) else repr(item).encode()
                put(f"c:{name}/{key}:{type(item).__name__}", blob)
    return h.hexdigest()
