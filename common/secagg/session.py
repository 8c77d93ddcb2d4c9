"""A secure-aggregation session and its threshold rules.

A session is one key setup (Bonawitz et al., CCS 2017, rounds 0-1: advertise keys, share keys)
identified by the Flower ``run_id`` and a ``setup_id`` chosen by the server; masking rounds
r = 1, 2, ... reuse it. Both ids are bound into every signature, key derivation and associated
data, so nothing produced in one session verifies or decrypts in another.

Threshold rules (t shares of n reconstruct a secret):

* t >= 3: a sum over two sites would let each learn the other's update;
* t <= n: otherwise nothing can ever be reconstructed;
* 2t > n (majority): any two sets of t sites intersect, so a server that tells some sites
  "u is alive" and others "u is dead" (or does so in different rounds) can never collect t
  shares of both kinds for u from honest sites, which each refuse to release the second kind.
  On the complete graph this replaces the consistency-check round of Bonawitz et al.'s actively
  secure variant for the honest-but-curious-server-that-may-lie model of a hospital consortium;
  on a sparse SecAgg+ graph, where t counts one neighbourhood only, it does not, and that round
  runs (``consistency``).

``default_threshold(n) = max(3, n // 2 + 1)`` satisfies all three for every n >= 3.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.secagg.encoding import check_u64

MIN_THRESHOLD = 3


@dataclass(frozen=True)
class Session:
    """(run_id, setup_id): which key setup everything in a round belongs to."""

    run_id: int
    setup_id: int

    def __post_init__(self) -> None:
        check_u64("run_id", self.run_id)
        check_u64("setup_id", self.setup_id)


def default_threshold(n: int) -> int:
    """max(3, n // 2 + 1): the smallest majority, never below 3."""
    return max(MIN_THRESHOLD, n // 2 + 1)


def check_threshold_rules(threshold: int, n: int) -> None:
    """``ValueError`` unless 3 <= t, 2t > n (see module docstring); t <= n is a ``TooFewSurvivors`` matter
    checked by the caller, because it depends on who showed up rather than on configuration."""
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ValueError(f"threshold must be an int, got {threshold!r}")
    if threshold < MIN_THRESHOLD:
        raise ValueError(
            f"threshold must be >= {MIN_THRESHOLD} (a sum of two reveals each to the other), got {threshold}"
        )
    if 2 * threshold <= n:
        raise ValueError(
            f"threshold {threshold} is not a majority of {n} participants: two disjoint groups of t sites could "
            f"each release a different kind of share of one site; use default_threshold(n) = {default_threshold(n)}"
        )
