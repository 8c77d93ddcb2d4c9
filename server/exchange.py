"""Send one stage's messages to the hospitals and collect their replies, polling briskly.

Flower's ``Grid.send_and_receive`` (flwr 1.41, ``HttpGrid``: the Deployment Engine and every
``flwr run`` against a SuperLink) pushes the messages and then pulls the replies with a fixed
3 s sleep between pulls. A round is several such stages (a secure round: train and mask, then
unmask; a run adds key set-up and the final model), so the sleep adds on average 1.5 s to each
stage while the hospitals are already done. This module does the same two calls of the public
Grid API, ``push_messages`` and ``pull_messages``, with a pause that starts short and doubles
while replies are missing, up to :data:`LONGEST_PULL_INTERVAL_S`: a reply is noticed within about
half the time the stage has taken so far and at most 0.5 s late, and a long training stage costs
the SuperLink two small requests a second (a pull costs it about 11 ms of CPU). The Simulation
Engine's in-memory grid, whose own loop pulls every 0.1 s, gets the same pacing (its pulls are
cheaper still).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_PULL_INTERVAL_S = 0.1  # the first pause between two pulls; doubled after each one
LONGEST_PULL_INTERVAL_S = 0.5


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout_s: float) -> list[Message]:
    """Push ``messages``; return the replies that arrived within ``timeout_s`` seconds (maybe fewer)."""
    batch = list(messages)  # HttpGrid.push_messages iterates its argument twice
    waiting = {i for i in grid.push_messages(batch) if i}  # a message that could not be pushed has no id
    deadline = time.monotonic() + timeout_s
    replies: list[Message] = []
    pause = FIRST_PULL_INTERVAL_S
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(pause)
        pause = min(2 * pause, LONGEST_PULL_INTERVAL_S)
    return replies
