"""Typed aborts of the secure-aggregation protocol.

Every way a round can be refused is its own exception, so the Flower bindings can log *why* a
round was abandoned and decide whether a fresh setup (new ``setup_id``) can recover. All derive
from ``SecAggAbort``; catching that one class is enough to abandon a round safely: no abort is
raised after a secret (share, mask seed) has been released.

The checks follow the abort conditions of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017 (Fig. 4, rounds 1-4): too few survivors,
signatures that do not verify, and a server asking for both kinds of shares of one user.
"""

from __future__ import annotations

from common.errors import UserError


class SecAggAbort(UserError):
    """Base of every protocol abort; ``reason`` is the human-readable cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeySwapDetected(SecAggAbort):
    """A key advert is not signed by the roster key of the site it names (MITM key substitution)."""


class MembershipMismatch(SecAggAbort):
    """The roster the operator distributed differs from the membership the hospital pinned itself
    (a site added, dropped or re-keyed: e.g. Sybil entries whose keys the operator holds)."""


class AlreadyReleased(SecAggAbort):
    """This (run, round) update already left the hospital masked in another session; re-masking it
    under new keys would let the server subtract two sums and read one hospital's update."""


class NothingToMask(SecAggAbort):
    """Asked to mask an update this hospital did not train (declined, or never asked to train)."""


class ActiveDeadOverlap(SecAggAbort):
    """The server asked for a site's self-mask shares *and* its mask-key shares (would unmask it)."""


class TooFewSurvivors(SecAggAbort):
    """Fewer than ``threshold`` (or fewer than 3) sites remain; the sum would expose too little mixing."""


class UnknownParticipant(SecAggAbort):
    """A site named in a request did not take part in the session's key setup."""


class ReplayDetected(SecAggAbort):
    """Material from another run, setup or round (advert, ciphertext, request) was presented."""


class ValueOutOfRange(SecAggAbort):
    """A value to quantize lies outside its declared bound or is not finite (never clipped silently)."""


class InconsistentShares(SecAggAbort):
    """Shares that do not agree: a reply carrying the wrong evaluation point, or a reconstructed
    mask key whose public key differs from the one advertised (a cheating or corrupted site)."""


class IncompleteSetup(SecAggAbort):
    """A participant's key shares are missing: its masks could not be removed if it dropped out."""


class OutOfOrder(SecAggAbort):
    """A protocol step was called before the step it depends on (e.g. ``mask`` before ``share_keys``)."""


class StateRejected(SecAggAbort):
    """Serialized client state failed authentication (other site's state, tampered or truncated)."""


class NeighbourhoodBelowThreshold(TooFewSurvivors):
    """On a sparse graph (``graph``): a surviving site, or a dropped one a survivor masked with, has
    fewer than t surviving holders of its shares among its k + 1, so the round cannot be unmasked."""


class GraphDisconnected(TooFewSurvivors):
    """The survivors' subgraph splits into parts; unmasking would reveal each part's sum separately."""


class GraphMismatch(SecAggAbort):
    """A message routes shares or masks inconsistently with the graph this site derived itself (a
    share from or for a non-neighbour, or a server that uses another graph)."""


class SparseGraphRefused(SecAggAbort):
    """The session's graph gives this hospital fewer neighbours than its ``min-neighbours`` accepts
    (by default only the complete graph); refused before any share is made."""


class InconsistentSurvivors(SecAggAbort):
    """On a sparse graph: the set of survivors of a round is not one set the hospitals agreed on
    (``consistency``: the consistency round of Bonawitz et al., CCS 2017, §4); base of the two below."""


class UncertifiedSurvivors(InconsistentSurvivors):
    """An unmask request's survivor set lacks a quorum of valid signatures from its members, or
    carries one that does not verify (forged, from another round or setup, or by a non-roster key)."""


class ConflictingSurvivors(InconsistentSurvivors):
    """Asked to sign, or to unmask for, another survivor set than the one this hospital already
    signed for the round, or alive/dead lists that are not that set and its complement."""
