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


def _messages(n: int, kind: str = "train") -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i + 1, message_type=kind, group_id="1") for i in range(n)]


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


class WindowGrid:
    """Message i (in the order given) is answered ``delay[i]`` pulls after it was pushed (None: never);
    records how many were pushed and unanswered at once, as the Simulation Engine would hold them."""

    def __init__(self, delay: list[int | None]) -> None:
        self.delay = delay
        self.pulls = 0
        self.pushed: dict[str, tuple[Message, int | None]] = {}  # id → (message, pull number it is answered at)
        self.answered: set[str] = set()
        self.most_in_flight = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            i = len(self.pushed)
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            delay = self.delay[i]
            self.pushed[f"m{i}"] = (msg, None if delay is None else self.pulls + delay)
            ids.append(f"m{i}")
        self.most_in_flight = max(self.most_in_flight, len(self.pushed) - len(self.answered))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        out = []
        for mid in set(message_ids) - self.answered:
            msg, at = self.pushed[mid]
            if at is not None and at <= self.pulls:
                self.answered.add(mid)
                out.append(Message(RecordDict(), reply_to=msg))
        return out


def test_a_window_keeps_at_most_that_many_in_flight_and_sends_every_message_once(clock: list[float]) -> None:
    # prepare: ten hospitals answering 1 to 3 pulls after their message arrives
    grid = WindowGrid([1, 3, 2, 1, 1, 2, 3, 1, 2, 1])
    # act
    replies = exchange.send_and_receive(grid, _messages(10), timeout_s=60.0, in_flight=3)  # type: ignore[arg-type]
    # assert: every reply once, never more than 3 pushed and unanswered, each message pushed once
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(f"m{i}" for i in range(10))
    assert grid.most_in_flight == 3 and len(grid.pushed) == 10
    assert {m.metadata.dst_node_id for m, _ in grid.pushed.values()} == set(range(1, 11))


def test_with_a_window_the_pauses_between_pulls_are_the_short_ones(clock: list[float]) -> None:
    # prepare: two hospitals, the second answering at the 5th pull after its push
    grid = WindowGrid([1, 5])
    # act
    exchange.send_and_receive(grid, _messages(2), timeout_s=60.0, in_flight=2)  # type: ignore[arg-type]
    # assert: 5 pulls, the 4 pauses between them doubling from the window's first up to its longest
    # (a reply in the first pull resets the pause)
    pauses = [exchange.WINDOW_FIRST_PULL_INTERVAL_S * 2**i for i in range(4)]
    assert grid.pulls == 5
    assert clock[0] == pytest.approx(sum(min(p, exchange.WINDOW_LONGEST_PULL_INTERVAL_S) for p in pauses))
    assert clock[0] < 4 * exchange.FIRST_PULL_INTERVAL_S


def test_without_a_window_the_whole_stage_is_pushed_at_once(clock: list[float]) -> None:
    # prepare
    grid = WindowGrid([1] * 10)
    # act
    exchange.send_and_receive(grid, _messages(10), timeout_s=60.0)  # type: ignore[arg-type]
    # assert
    assert grid.most_in_flight == 10


def test_a_stage_that_does_not_train_goes_out_a_light_window_at_a_time(clock: list[float]) -> None:
    # prepare: a window of 3 (a simulation's training window); light stages (a secure round's
    # unmask) of 100, 200 and 500 messages, and a training stage of 10
    light = {n: WindowGrid([1] * n) for n in (100, 200, 500)}
    training = WindowGrid([1] * 10)
    # act
    replies = {n: exchange.send_and_receive(grid, _messages(n, "train.secagg_unmask"), timeout_s=600.0,  # type: ignore[arg-type]
                                            in_flight=3) for n, grid in light.items()}
    exchange.send_and_receive(training, _messages(10), timeout_s=60.0, in_flight=3)  # type: ignore[arg-type]
    # assert: a light stage keeps 100 × 128 // n in flight, at most 128 (100 hospitals: all at once,
    # one pull; 200: 64; 500: 25, so a tick of the engine checks at most 12,800 stored messages),
    # every message once; the training stage keeps its window of 3
    assert (exchange.LIGHT_STAGE_IN_FLIGHT, exchange.LIGHT_STAGE_SCAN) == (128, 12_800)
    assert {n: grid.most_in_flight for n, grid in light.items()} == {100: 100, 200: 64, 500: 25}
    assert light[100].pulls == 1 and light[200].pulls == 4
    assert all(len(grid.pushed) == n and len(replies[n]) == n for n, grid in light.items())
    assert training.most_in_flight == 3
    assert exchange.light_stage_window(20_000, 3) == 3  # never below the training window


def test_messages_still_queued_at_the_deadline_are_never_sent(clock: list[float]) -> None:
    # prepare: a window of one, and the first hospital never answers
    grid = WindowGrid([None, 1, 1])
    # act
    replies = exchange.send_and_receive(grid, _messages(3), timeout_s=10.0, in_flight=1)  # type: ignore[arg-type]
    # assert: nothing came, only the first was pushed, and the wait ended at the timeout
    assert replies == [] and list(grid.pushed) == ["m0"]
    assert 10.0 <= clock[0] < 10.0 + exchange.LONGEST_PULL_INTERVAL_S + 1e-9
