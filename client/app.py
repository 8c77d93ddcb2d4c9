"""Flower ClientApp: translates messages into typed calls (``client.task``, ``client.secagg``).

Actions: ``train`` (a round: plain update, or — when the request carries a ``secagg`` record —
train and keep the update for masking, or mask it at once when the record names the session),
``train.secagg_keys`` / ``train.secagg_share`` (session setup), ``train.secagg_mask``,
``train.secagg_consistency`` (sparse SecAgg+ graphs only: sign the round's survivor set) and
``train.secagg_unmask`` (with the next round's key shares when asked), and ``query.final_model``
(the final global model after the last round: kept, not trained on; ``client.final_model``).
Before any action the run is checked against the hospital's own settings (``client.policy``).
Every reply, errors included, is first written to the hospital's audit log (``client.audit``).

Nothing data-dependent leaves in an error: a failure becomes an ``error`` reply whose reason is
one of the fixed texts of ``common.protocol.messages.ERRORS`` (a code and a sentence, no value); the
exception's own message, which may hold a loss or a count, goes to the hospital's log and audit
log only. An unexpected exception is answered the same way (code ``internal``), with its
traceback in the hospital's log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from client.audit import AuditLogCorrupt, append_entry, entry_for
from client.policy import ModelRefused, NoiseRefused, RunRefused, check_run_allowed
from common.config import ConfigError, RunConfig, SiteConfig, default_state_dir, site_paths
from common.dataset import DatasetError
from common.errors import UserError
from common.protocol.messages import (
    ProtocolError,
    SiteReply,
    decode_train_request,
    decode_warm_start,
    encode_reply,
    error_reason,
)
from common.secagg import AlreadyReleased, MembershipMismatch, NothingToMask, SecAggAbort, ValueOutOfRange

log = logging.getLogger("medsynth.client")
app = ClientApp()


def error_codes() -> tuple[tuple[type[Exception], str], ...]:
    """Exception class → the fixed error code its reply carries.

    The first match wins, so subclasses come before their bases. Every ``UserError`` a ClientApp
    action can raise is listed (tests check it); anything unlisted is answered ``internal``. The
    ledger's and the prepare step's classes are imported here, not with this module: they load
    Opacus, torch and pydicom, which a ClientApp process answering a key exchange never needs.
    """
    from client.ledger import AuditLogBehind, LedgerCorrupt, LedgerMismatch, LedgerMissing, LedgerRolledBack
    from client.prepare.pipeline import PrepareError
    from client.release import ReleaseRecordCorrupt

    return (
        (NoiseRefused, "noise-refused"),
        (RunRefused, "run-refused"),
        (ModelRefused, "model-refused"),
        (MembershipMismatch, "membership"),
        (AlreadyReleased, "already-released"),
        (NothingToMask, "nothing-to-mask"),
        (ValueOutOfRange, "out-of-range"),
        (SecAggAbort, "secagg-abort"),
        (LedgerCorrupt, "ledger"),
        (LedgerMismatch, "ledger"),
        (LedgerMissing, "ledger"),
        (LedgerRolledBack, "ledger"),
        (AuditLogBehind, "ledger"),
        (AuditLogCorrupt, "ledger"),
        (ReleaseRecordCorrupt, "ledger"),
        (ConfigError, "config"),
        (DatasetError, "data"),
        (PrepareError, "data"),
        (FileNotFoundError, "data"),
        (ProtocolError, "protocol"),
    )


def error_code(exc: Exception) -> str:
    """The fixed error code an exception is reported under (``internal`` when it is not listed)."""
    return next((code for kind, code in error_codes() if isinstance(exc, kind)), "internal")


def _error_reply(msg: Message, site_id: str, code: str) -> Message:
    reply = SiteReply(
        site_id=site_id,
        status="error",
        epsilon=float("nan"),
        epsilon_budget=float("nan"),
        delta=float("nan"),
        total_steps=0,
        noise_multiplier=None,
        update=None,
        reason=error_reason(code),
    )
    return Message(encode_reply(reply), reply_to=msg)


def _audit_path(context: Context, site: SiteConfig | None) -> Path | None:
    """Where this reply is audited, even when the site config itself could not be built."""
    if site is not None:
        return site.audit_path
    cfg = context.node_config
    if "audit-path" in cfg:
        return Path(str(cfg["audit-path"]))
    if "state-dir" in cfg:
        return site_paths(Path(str(cfg["state-dir"]))).audit_path
    if "data-dir" in cfg:
        return site_paths(default_state_dir(Path(str(cfg["data-dir"])))).audit_path
    sites_dir = context.run_config.get("sim.sites-dir")
    if "partition-id" in cfg and sites_dir:
        return site_paths(Path(str(sites_dir)) / f"site-{cfg['partition-id']}").audit_path
    return None


def _handle(msg: Message, context: Context, action: Callable[[RunConfig, SiteConfig], RecordDict]) -> Message:
    t0 = time.process_time()
    site_id = str(context.node_config.get("site-id", context.node_config.get("partition-id", "?")))
    site: SiteConfig | None = None
    detail = ""
    try:
        run = RunConfig.from_flower(context.run_config)
        site = SiteConfig.from_flower(context.node_config, run)
        site_id = site.site_id
        check_run_allowed(run, site)  # the hospital decides, before anything is charged or sent
        reply = Message(action(run, site), reply_to=msg)
    except UserError as exc:  # a refusal a person at the hospital can act on: one log line
        code, detail = error_code(exc), f"{type(exc).__name__}: {exc}"
        log.error("site %s: %s refused (%s): %s", site_id, msg.metadata.message_type, code, detail)
        reply = _error_reply(msg, site_id, code)
    except Exception as exc:  # a bug, or a file gone missing: the traceback goes to the hospital's log
        code, detail = error_code(exc), f"{type(exc).__name__}: {exc}"
        log.exception("site %s: unexpected error answering %s", site_id, msg.metadata.message_type)
        reply = _error_reply(msg, site_id, code)
    path = _audit_path(context, site)
    if path is not None:
        append_entry(path, entry_for(msg, reply.content, site_id, detail=detail, cpu_s=time.process_time() - t0))
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round: kept for masking under secure aggregation, else sent plain (if allowed)."""

    def act(run: RunConfig, site: SiteConfig) -> RecordDict:
        if "secagg" in msg.content.config_records:
            return secagg.train_secure(run, site, msg.content, context.state, run_id=context.run_id)
        if not site.allow_plain_aggregation:
            raise RunRefused(
                "the server asked for an unmasked update (plain aggregation) and this hospital's node "
                "config does not allow it (allow-plain-aggregation = false); nothing was trained or sent"
            )
        from client.task import train_round  # torch & Opacus: loaded only by the step that trains

        arrays, server_round = decode_train_request(msg.content)
        return encode_reply(train_round(run, site, arrays, run_id=context.run_id, server_round=server_round,
                                        warm_start=decode_warm_start(msg.content)))

    return _handle(msg, context, act)


@app.query("final_model")
def final_model(msg: Message, context: Context) -> Message:
    """The final global model: kept as this hospital's newest model; nothing is trained or charged."""
    from client.final_model import keep_final_model

    return _handle(msg, context, lambda run, site: keep_final_model(run, site, msg.content, run_id=context.run_id))


@app.train("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    return _handle(msg, context, lambda run, site: secagg.advertise_keys(site, msg.content, context.state))


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    return _handle(msg, context, lambda run, site: secagg.share_keys(run, site, msg.content, context.state))


@app.train("secagg_mask")
def secagg_mask(msg: Message, context: Context) -> Message:
    return _handle(msg, context, lambda run, site: secagg.mask(site, msg.content, context.state))


@app.train("secagg_consistency")
def secagg_consistency(msg: Message, context: Context) -> Message:
    return _handle(msg, context, lambda run, site: secagg.sign_survivors(site, msg.content, context.state))


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return _handle(msg, context, lambda run, site: secagg.unmask(run, site, msg.content, context.state))


__all__ = ["app"]
