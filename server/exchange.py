"""Send one stage's messages to the hospitals and collect their replies, polling briskly.

Flower's ``Grid.send_and_receive`` (flwr 1.41, ``HttpGrid``: the Deployment Engine and every
``flwr run`` against a SuperLink) pushes the messages and then pulls the replies with a fixed
3 s sleep between pulls. A round is several such stages (a secure round: train and mask, then
unmask; a run adds key set-up and the final model), so the sleep adds on average 1.5 s to each
stage while the hospitals are already done. This module does the same two calls of the public
Grid API, ``push_messages`` and ``pull_messages``, with a pause that starts short and doubles
while replies are missing, up to :data:`LONGEST_PULL_INTERVAL_S`: a reply is noticed within about
half the time the stage has taken so far and at most 0.5 s late, and a long training stage costs
the SuperLink two small requests a second (a pull costs it about 11 ms of CPU).

The Simulation Engine also needs a window. Every 0.1 s it asks its in-memory LinkState, once per
virtual hospital, for that hospital's next message, and each ask scans every message stored and
not yet answered (flwr 1.41 ``InMemoryLinkState.get_message_ins``, with an expiry and federation
check per message): a stage pushed to all n hospitals at once costs n × n checks per tick. At 500
hospitals that kept one of the two cores busy and round 1 did not finish in 900 s. With at most w
messages in flight the tick costs n × w checks, and a few messages per Ray actor keep every actor
fed. ``medsynth simulate`` sets w; the Deployment Engine's SuperLink indexes its messages and
keeps the default 0 (everything at once).

A window costs time where the messages are light. The Simulation Engine takes at most one
message per hospital per 0.1 s tick, so a stage of n messages w at a time needs at least n / w
ticks: at 100 hospitals and w = 8, 1.25 s for a stage whose messages take milliseconds (a secure
round's consistency and unmask, the final model), the floor of the secure round's extra time
there. Only training messages are long, so every other stage is pushed more at a time: as many as
keep a tick's scan within :data:`LIGHT_STAGE_SCAN` checks (hospitals × stored messages; the
stage's message count stands for the hospitals), at most :data:`LIGHT_STAGE_IN_FLIGHT` and never
fewer than w. Measured on 2 cores (docs/benchmarks.md): at 100 hospitals a secure round's
consistency and unmask took 1.4 s and 1.3 s with w = 8, and 0.4 s and 1.0 s with 128 in flight;
at 500 hospitals 128 in flight made each tick check 64,000 stored messages: in the last round of
a one-step run those two stages took 11.3 s and 37.8 s, against 6.7 s and 24.2 s at 25 (and
11.1 s and 28.5 s at w = 8).

With a window the pauses are shorter (:data:`WINDOW_FIRST_PULL_INTERVAL_S` doubling up to
:data:`WINDOW_LONGEST_PULL_INTERVAL_S`): a window is refilled only after a pull has seen replies,
so every pause there is time the Ray actors may sit idle, and a pull of the in-memory grid is a
few dictionary lookups (no request to a SuperLink). A short stage of more messages than its
window is made of such refills.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

FIRST_PULL_INTERVAL_S = 0.1  # the first pause between two pulls; doubled after each one
LONGEST_PULL_INTERVAL_S = 0.5
WINDOW_FIRST_PULL_INTERVAL_S = 0.02  # the same with a window (``in_flight`` > 0: the Simulation Engine)
WINDOW_LONGEST_PULL_INTERVAL_S = 0.1
# The window of a stage that does not train (a few ms of work per message): at most this many in
# flight, and at most LIGHT_STAGE_SCAN // hospitals, so that a tick checks no more stored messages
# than 100 hospitals' stage does at 128 (100 hospitals: 128, one tick; 500: 25).
LIGHT_STAGE_IN_FLIGHT = 128
LIGHT_STAGE_SCAN = 100 * LIGHT_STAGE_IN_FLIGHT


def light_stage_window(messages: int, in_flight: int) -> int:
    """The window of a stage of ``messages`` that do not train, given the training window ``in_flight`` > 0."""
    return max(in_flight, min(LIGHT_STAGE_IN_FLIGHT, LIGHT_STAGE_SCAN // max(1, messages)))

log = logging.getLogger("medsynth.server")


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout_s: float, in_flight: int = 0) -> list[Message]:
    """Push ``messages``; return the replies that arrived within ``timeout_s`` seconds (maybe fewer).

    ``in_flight`` > 0 (run key ``sim.messages-in-flight``) keeps at most that many pushed and
    unanswered: the rest wait here and are pushed as replies come in, and the pause goes back to
    the shortest after each reply. A stage of other than training messages keeps
    :func:`light_stage_window` in flight (module docstring). A message still waiting here at the
    deadline is never sent.
    """
    queued = list(messages)  # HttpGrid.push_messages iterates its argument twice
    stage, total = (queued[0].metadata.message_type if queued else ""), len(queued)
    if in_flight > 0 and stage != MessageType.TRAIN:
        in_flight = light_stage_window(total, in_flight)
    window = in_flight if in_flight > 0 else len(queued)
    started = time.monotonic()
    deadline = started + timeout_s
    waiting: set[str] = set()
    replies: list[Message] = []
    first, longest = ((WINDOW_FIRST_PULL_INTERVAL_S, WINDOW_LONGEST_PULL_INTERVAL_S) if in_flight > 0
                      else (FIRST_PULL_INTERVAL_S, LONGEST_PULL_INTERVAL_S))
    pause = first
    while True:
        if queued and len(waiting) < window:
            batch, queued = queued[: window - len(waiting)], queued[window - len(waiting):]
            waiting |= {i for i in grid.push_messages(batch) if i}  # a message that could not be pushed has no id
            continue
        if not waiting:
            break
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if (not waiting and not queued) or time.monotonic() >= deadline:
            break
        if got and in_flight > 0:
            pause = first  # room in the window: refill it soon
        if not (got and queued):
            time.sleep(pause)
            pause = min(2 * pause, longest)
    log.info("stage %s: %d of %d replies in %.1f s", stage, len(replies), total, time.monotonic() - started)
    return replies
