"""What the server sees of one site is uniform noise, and it never obtains both share kinds of a site."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from common.secagg import ActiveDeadOverlap, SecAggClient, UnmaskRequest
from common.secagg.primitives import prg_words
from common.secagg.shamir import reconstruct_secret
from tests.test_secagg_harness import make_federation, run_round

ALPHA = 0.001  # fixed significance: a uniform source fails one assertion with probability 0.001
WORDS = 2**16  # 2^16 uint64 = 2^19 bytes: 2048 expected per byte value, 256 per top-byte value


def _uniformity_p_values(y: np.ndarray) -> tuple[float, float]:
    """(p of the byte histogram, p of the top-8-bit histogram) under a chi-square test against uniform."""
    byte_counts = np.bincount(y.view(np.uint8), minlength=256)  # (256,), Σ = 8·WORDS
    top_counts = np.bincount((y >> np.uint64(56)).astype(np.int64), minlength=256)  # (256,), Σ = WORDS
    assert byte_counts.sum() == 8 * WORDS and top_counts.sum() == WORDS
    return float(chisquare(byte_counts).pvalue), float(chisquare(top_counts).pvalue)


def test_masked_zero_update_is_indistinguishable_from_uniform():
    # prepare: the most structured input there is
    fed = make_federation(3, WORDS)
    x = np.zeros(WORDS, dtype=np.uint64)

    # act
    y = fed.clients["site-0"].mask(1, x).y

    # assert
    p_bytes, p_top = _uniformity_p_values(y)
    assert p_bytes > ALPHA
    assert p_top > ALPHA


def test_what_the_server_can_unmask_of_one_alive_site_is_still_uniform():
    # prepare: the server reconstructs b_u of every alive site, so y_u - PRG(b_u) = x_u + Σ ±PRG(s_uv)
    # is all it can isolate about u; the pairwise masks must keep that uniform
    fed = make_federation(3, WORDS)
    zeros = np.zeros(WORDS, dtype=np.uint64)
    fed.server.begin_round(1)
    masked = {s: fed.clients[s].mask(1, zeros) for s in fed.sites}
    for s, m in masked.items():
        fed.server.receive_masked(s, m)
    replies = [fed.clients[s].unmask(1, *req) for s, req in fed.server.unmask_requests().items()]

    # act: do what a curious server can do with the b-shares it received
    b0 = reconstruct_secret([r.b_shares["site-0"] for r in replies], fed.threshold)
    isolated = masked["site-0"].y - prg_words(b0, WORDS)

    # assert
    p_bytes, p_top = _uniformity_p_values(isolated)
    assert p_bytes > ALPHA
    assert p_top > ALPHA


def test_two_maskings_of_the_same_update_differ_everywhere():
    # prepare: two copies of the same client state mask the same x in the same round
    fed = make_federation(3, 1024)
    blob = fed.clients["site-1"].to_bytes()
    first, second = (SecAggClient.from_bytes(blob, fed.identities["site-1"]) for _ in range(2))
    x = np.arange(1024, dtype=np.uint64)

    # act
    y1, y2 = first.mask(1, x).y, second.mask(1, x).y

    # assert: only b_u differs, and PRG(b_u) collides with probability 2^-64 per element
    assert np.count_nonzero(y1 == y2) == 0


def test_server_never_requests_both_share_kinds_of_a_site():
    # prepare: round 1 loses site-5 before masking and site-4 at unmasking; round 2 site-3 at unmasking
    fed = make_federation(7, 4)
    xs = {s: np.full(4, i, dtype=np.uint64) for i, s in enumerate(fed.sites)}

    # act
    run_round(fed, 1, xs, drop_before_mask={"site-5"}, drop_at_unmask={"site-4"})
    run_round(fed, 2, {s: xs[s] for s in fed.server.eligible}, drop_at_unmask={"site-3"})

    # assert: per round and across the setup, no site's b- and s-shares were both requested
    (s1, b1), (s2, b2) = (_senders(fed.requests[r]) for r in (1, 2))
    assert s1 == {"site-5"} and s2 == set()  # site-5's key is known after round 1; not asked again
    assert b1 == b2 == {"site-0", "site-1", "site-2", "site-3", "site-4", "site-6"}
    assert not (s1 | s2) & (b1 | b2)


def _senders(requests: dict[str, UnmaskRequest]) -> tuple[set[str], set[str]]:
    """(sites whose s-shares were requested, sites whose b-shares were requested) in one round."""
    s_from = {d for (_, _, s_cts, _) in requests.values() for d in s_cts}
    b_from = {u for (_, _, _, b_cts) in requests.values() for u in b_cts}
    return s_from, b_from


def test_site_refuses_to_release_both_kinds_for_one_node():
    # prepare: a round where all sent y; a lying server asks site-0 for site-1's b- and s-shares
    fed = make_federation(4, 2)
    fed.server.begin_round(1)
    for s in fed.sites:
        fed.server.receive_masked(s, fed.clients[s].mask(1, np.zeros(2, dtype=np.uint64)))
    alive, dead, _, b_cts = fed.server.unmask_requests()["site-0"]
    s_cts = {"site-1": fed.s_share_cts["site-1"]["site-0"]}

    # act / assert
    with pytest.raises(ActiveDeadOverlap, match="both b- and s-shares"):
        fed.clients["site-0"].unmask(1, alive, dead, s_cts, b_cts)
