"""The server's stage exchange: every reply that arrives in time is collected, none twice, and
the wait ends at the timeout with what came. A fake Grid and a fake clock (a unit test)."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict

from server import exchange
from tests.helpers import set_task_identity


class SlowGrid:
    """Replies to message i become available at pull number ``ready_at[i]`` (None: never)."""

    def __init__(self, ready_at: list[int | None]) -> None:
        self.ready_at = ready_at
        self.pulls = 0
        self.pushed: list[Message] = []
        self.delivered: set[str] = set()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = list(messages)
        for i, msg in enumerate(self.pushed):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        out = []
        for i, msg in enumerate(self.pushed):
            ready = self.ready_at[i]
            mid = msg.metadata.message_id
            if mid in set(message_ids) and ready is not None and ready <= self.pulls and mid not in self.delivered:
                self.delivered.add(mid)
                out.append(Message(RecordDict(), reply_to=msg))
        return out


def _messages(n: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i + 1, message_type="train", group_id="1") for i in range(n)]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake monotonic clock that each sleep advances."""
    set_task_identity()  # Flower's Message needs the run it belongs to
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    return now


def test_all_replies_are_collected_as_they_arrive(clock: list[float]) -> None:
    # prepare: three hospitals answering at the 1st, 3rd and 6th pull
    grid = SlowGrid([1, 3, 6])
    # act
    replies = exchange.send_and_receive(grid, _messages(3), timeout_s=60.0)  # type: ignore[arg-type]
    # assert: all three, each once, after 6 pulls and 5 pauses that doubled from the first (not
    # Flower's 3 s ones)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    waited = sum(min(exchange.FIRST_PULL_INTERVAL_S * 2**i, exchange.LONGEST_PULL_INTERVAL_S) for i in range(5))
    assert grid.pulls == 6 and clock[0] == pytest.approx(waited) and waited < 3


def test_the_wait_ends_at_the_timeout_with_the_replies_that_came(clock: list[float]) -> None:
    # prepare: one hospital never answers
    grid = SlowGrid([2, None])
    # act
    replies = exchange.send_and_receive(grid, _messages(2), timeout_s=10.0)  # type: ignore[arg-type]
    # assert: the one reply, and the wait stopped at the timeout (no pull after it)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 10.0 <= clock[0] < 10.0 + exchange.LONGEST_PULL_INTERVAL_S + 1e-9
