"""Flower ClientApp: translates a train message into ``client.task.train_round`` and back.

Typed failures a hospital can fix (a bad node config, an unreadable ledger, an unusable data
folder) become an ``error`` reply with a readable reason, so the server logs one line and
carries on with the others; nothing else is caught.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.ledger import LedgerCorrupt, LedgerMismatch
from client.task import AccountingMismatch, train_round
from common.config import ConfigError, RunConfig, SiteConfig
from common.dataset import DatasetError
from common.protocol import SiteReply, decode_train_request, encode_reply

log = logging.getLogger("medsynth.client")
app = ClientApp()

HOSPITAL_FIXABLE = (ConfigError, DatasetError, LedgerCorrupt, LedgerMismatch, AccountingMismatch)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round; the reply carries the update vector and the plain privacy record."""
    run = RunConfig.from_flower(context.run_config)
    site_id = str(context.node_config.get("site-id", context.node_config.get("partition-id", "?")))
    try:
        site = SiteConfig.from_flower(context.node_config, run)
        site_id = site.site_id
        arrays, server_round = decode_train_request(msg.content)
        reply = train_round(run, site, arrays, run_id=context.run_id, server_round=server_round)
    except HOSPITAL_FIXABLE as exc:
        log.error("site %s: %s", site_id, exc)
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
