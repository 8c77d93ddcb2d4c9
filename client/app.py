"""Flower ClientApp: translates messages into typed calls (``client.task``, ``client.secure``).

Actions: ``train`` (a round: plain update, or masked when the request carries a secure-
aggregation session), ``train.secagg_keys`` / ``train.secagg_share`` (session setup) and
``train.secagg_unmask``. Every reply is first written to the hospital's audit log
(``client.audit``). Failures a hospital can act on — a bad node config, an unreadable
ledger or data folder, a secure-aggregation abort (key swap, replay, …) — become an ``error``
reply with a one-line reason and a log line; the server carries on with the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import secure
from client.audit import append_entry, entry_for
from common.config import ConfigError, RunConfig, SiteConfig
from common.protocol import ProtocolError, SiteReply, decode_train_request, encode_reply
from common.secagg import SecAggAbort

log = logging.getLogger("medsynth.client")
app = ClientApp()


def hospital_fixable() -> tuple[type[Exception], ...]:
    """Errors a hospital can act on. Imported on demand: in deployment every message starts a
    fresh process, and the key/share/unmask steps should not pay for importing torch."""
    from client.audit import AuditLogCorrupt
    from client.ledger import AuditLogBehind, LedgerCorrupt, LedgerMismatch, LedgerMissing, LedgerRolledBack
    from client.task import AccountingMismatch
    from common.dataset import DatasetError

    return (ConfigError, DatasetError, LedgerCorrupt, LedgerMismatch, LedgerMissing, LedgerRolledBack,
            AuditLogBehind, AuditLogCorrupt, AccountingMismatch, ProtocolError, SecAggAbort, FileNotFoundError)


def _error_reply(msg: Message, site_id: str, exc: Exception) -> Message:
    log.error("site %s: %s: %s", site_id, type(exc).__name__, exc)
    reply = SiteReply(
        site_id=site_id,
        status="error",
        epsilon=float("nan"),
        epsilon_budget=float("nan"),
        delta=float("nan"),
        total_steps=0,
        noise_multiplier=None,
        update=None,
        reason=f"{type(exc).__name__}: {exc}",
    )
    return Message(encode_reply(reply), reply_to=msg)


def _audited(msg: Message, reply: Message, site: SiteConfig | None, site_id: str) -> Message:
    """Record the outgoing reply in the hospital's audit log (when the site config is known)."""
    if site is not None and site.audit_path is not None:
        append_entry(site.audit_path, entry_for(msg, reply.content, site_id))
    return reply


def _handle(msg: Message, context: Context, action: Callable[[RunConfig, SiteConfig], RecordDict]) -> Message:
    site_id = str(context.node_config.get("site-id", context.node_config.get("partition-id", "?")))
    site: SiteConfig | None = None
    try:
        run = RunConfig.from_flower(context.run_config)
        site = SiteConfig.from_flower(context.node_config, run)
        site_id = site.site_id
        return _audited(msg, Message(action(run, site), reply_to=msg), site, site_id)
    except Exception as exc:
        if not isinstance(exc, hospital_fixable()):
            raise
        return _audited(msg, _error_reply(msg, site_id, exc), site, site_id)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round; masked when the server runs secure aggregation."""

    def act(run: RunConfig, site: SiteConfig) -> RecordDict:
        if "secagg" in msg.content.config_records:
            return secure.masked_update(run, site, msg.content, context.state, run_id=context.run_id)
        if not site.allow_plain_aggregation:
            raise ConfigError(
                "the server asked for an unmasked update (plain aggregation) and this hospital's node "
                "config does not allow it (allow-plain-aggregation = false); nothing was trained or sent"
            )
        from client.task import train_round  # torch & Opacus: loaded only by the step that trains

        arrays, server_round = decode_train_request(msg.content)
        return encode_reply(train_round(run, site, arrays, run_id=context.run_id, server_round=server_round))

    return _handle(msg, context, act)


@app.train("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    return _handle(msg, context, lambda run, site: secure.advertise_keys(site, msg.content, context.state))


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    return _handle(msg, context, lambda run, site: secure.share_keys(site, msg.content, context.state))


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return _handle(msg, context, lambda run, site: secure.unmask(site, msg.content, context.state))


__all__ = ["app"]
