"""The consistency round on a sparse graph: one signed set of survivors per (session, round).

Why. On the complete graph every hospital holds a share of every other's secrets, so the
majority threshold alone stops a server that tells different hospitals different stories about
who dropped out (``session``). On the sparse graph of Bell et al. (CCS 2020, ``graph``) it does
not: holders of a neighbour v's shares and holders of u's shares are different, mostly disjoint
groups, so a server could tell the former "v dropped" and the latter "u survived", collect the
s-keys of all of u's neighbours and u's self-mask seed b_u, and open x_u alone.

What. The consistency round of the actively secure variant of Bonawitz et al. (CCS 2017, §4,
round "ConsistencyCheck": the survivors sign the set of survivors and a user unmasks only after
seeing t valid signatures on it), which Bell et al. also add against a malicious server. Here it
is global (one set for the whole session, not per neighbourhood), which costs each hospital
O(n) signature checks per round where masking costs O(k) (measured in ``docs/benchmarks.md``).
After the masked inputs are in and before any share is released:

1. the server sends every survivor the one set A of sites whose masked input it received;
2. each hospital signs ``payload(session, round, sorted A)`` with its long-lived Ed25519 identity
   key, and signs at most one set per (session, round) (``SecAggClient.sign_survivors``; the set
   is kept in the sealed client state);
3. an unmask request carries signatures on A from at least ``consistency_quorum(n)`` distinct
   members of A, n the session's participants; the hospital verifies each against the roster it
   pinned itself, and answers only if the request's alive list is A and its dead list is
   exactly the other participants (``SecAggClient.unmask``).

The quorum, q = ⌊2n/3⌋ + 1. Two certified sets A ≠ A' have signer sets S, S' of size ≥ q among
n participants, so |S ∩ S'| ≥ 2q − n, and every site in the intersection signed two sets for one
round, which an honest hospital never does. Against the server alone a majority (⌊n/2⌋ + 1)
would already make that intersection non-empty; q = ⌊2n/3⌋ + 1 makes it hold more than n/3
sites (2q − n ≥ (n + 2)/3), so a server must also corrupt more than a third of the hospitals to
certify two stories. That keeps the sparse graph's analysis of colluding hospitals (γ = 10-20 %
corrupt in ``docs/privacy.md``) valid with the lying server added. The price is liveness: more
than two thirds of the session's participants must have sent their masked input and at least q of
them must sign; dropouts after signing (before or during unmasking) cost nothing more.
With one certified A, every honest hospital releases b-shares exactly for A and s-shares exactly
for the rest, so no honest holder helps to open both kinds for one site, and the survivors'
connectivity check (``graph``) sees the real survivors: an input surrounded by "dropped"
neighbours is isolated and the round is refused (``GraphDisconnected``).

The complete graph skips this round (no extra message; ``needs_certificate``). There the holders of
every site's shares are all n participants and 2t > n: a server that tells different stories
needs t honest holders of each kind for one site, the counting argument of ``session``; a
signature quorum q plays the same role as t, so the round would add nothing a higher
``secagg.threshold`` does not already give (raising t to ⌊2n/3⌋ + 1 makes both kinds need more
than n/3 corrupt hospitals too).

Signed payload: str("medsynth-secagg survivors v1") u64(run) u64(setup) u64(round) u64(|A|)
[str(site)]×|A| in sorted order; binding session and round means a signature from another round
or setup never verifies here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from common.secagg.encoding import Writer, check_u64
from common.secagg.errors import UncertifiedSurvivors
from common.secagg.graph import CommGraph
from common.secagg.identity import ED25519_SIG_BYTES, Roster
from common.secagg.session import MIN_THRESHOLD, Session

SURVIVORS_TAG = b"medsynth-secagg survivors v1"


def consistency_quorum(n: int) -> int:
    """⌊2n/3⌋ + 1 (never below 3): distinct signers a survivor set needs among n participants."""
    return max(MIN_THRESHOLD, 2 * n // 3 + 1)


def needs_certificate(graph: CommGraph) -> bool:
    """True on a sparse graph; the complete graph relies on the majority threshold (module docstring)."""
    return not graph.complete


def survivors_payload(session: Session, round: int, alive: Collection[str]) -> bytes:
    """The bytes a hospital signs for (session, round, A); ``alive`` in any order, without repeats."""
    check_u64("round", round)
    sites = sorted(set(alive))
    if len(sites) != len(alive):
        raise UncertifiedSurvivors(f"the alive set of round {round} names a site twice")
    w = Writer(SURVIVORS_TAG).put_u64(session.run_id).put_u64(session.setup_id).put_u64(round).put_u64(len(sites))
    for site in sites:
        w.put_str(site)
    return w.done()


def check_certificate(
    roster: Roster, session: Session, round: int, alive: Collection[str], signatures: Mapping[str, bytes],
    participants: Collection[str],
) -> None:
    """``UncertifiedSurvivors`` unless at least ``consistency_quorum(len(participants))`` members of
    ``alive`` signed (session, round, alive) with their key in ``roster``, and every signature given
    verifies (a forged, replayed or foreign one means the server lies: abort, do not skip it)."""
    payload = survivors_payload(session, round, alive)
    outsiders = sorted(set(signatures) - set(alive))
    if outsiders:
        raise UncertifiedSurvivors(
            f"signatures of {outsiders} on the survivors of round {round}, who are not among them; refusing"
        )
    bad = sorted(site for site, sig in signatures.items()
                 if len(sig) != ED25519_SIG_BYTES or not roster.signature_valid(site, payload, sig))
    if bad:
        raise UncertifiedSurvivors(
            f"the signatures of {bad} on the survivors of round {round} of {session} do not verify against this "
            "hospital's pinned roster (forged, from another round or setup, or by another key); refusing"
        )
    quorum = consistency_quorum(len(participants))
    if len(signatures) < quorum:
        raise UncertifiedSurvivors(
            f"the survivors of round {round} are signed by {len(signatures)} sites, need {quorum} of the "
            f"{len(participants)} participants: a set the hospitals did not agree on; refusing"
        )
