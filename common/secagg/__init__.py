"""Secure aggregation for medsynth: the server learns only the sum of the hospitals' updates.

Pure protocol (no Flower): Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017, on a communication graph (``graph``): by default the complete graph
of participants, which is the k = n - 1 case of Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+); with a requested degree k < n - 1 their
sparse k-regular graph (a Harary graph on a ring order derived from the signed adverts), so a
site's per-round work is O(k) key agreements and PRG streams instead of O(n). For a consortium
of a handful of hospitals the sparse graph saves nothing worth its weaker guarantees (``graph``
says which), so a hospital accepts it only if it opted in. Modules:

* ``session``: Session (run_id, setup_id), threshold rules;
* ``graph``: the SecAgg+ communication graph, its derivation and survivor checks;
* ``consistency``: on a sparse graph, the one signed survivor set per round (the consistency
  round of Bonawitz et al.'s actively secure variant) that stops a server lying about dropouts;
* ``identity``: long-lived Ed25519 SiteIdentity, Roster, signed KeyAdvert;
* ``shamir``: t-of-n sharing over GF(2^521 - 1);
* ``primitives``: X25519, HKDF-SHA256, ChaCha20 PRG, ChaCha20-Poly1305 share encryption;
* ``client`` / ``server``: the protocol roles; ``messages``: what travels between them;
* ``quantize``: floats ↔ uint64 levels whose sum is exact mod 2^64;
* ``errors``: typed aborts (all ``SecAggAbort``).
"""

from common.secagg.client import SecAggClient
from common.secagg.consistency import consistency_quorum, needs_certificate, survivors_payload
from common.secagg.errors import (
    ActiveDeadOverlap,
    AlreadyReleased,
    ConflictingSurvivors,
    GraphDisconnected,
    GraphMismatch,
    IncompleteSetup,
    InconsistentShares,
    InconsistentSurvivors,
    KeySwapDetected,
    MembershipMismatch,
    NeighbourhoodBelowThreshold,
    NothingToMask,
    OutOfOrder,
    ReplayDetected,
    SecAggAbort,
    SparseGraphRefused,
    StateRejected,
    TooFewSurvivors,
    UncertifiedSurvivors,
    UnknownParticipant,
    ValueOutOfRange,
)
from common.secagg.graph import COMPLETE, MIN_DEGREE, CommGraph, effective_degree
from common.secagg.identity import KeyAdvert, Roster, SiteIdentity, fingerprint
from common.secagg.messages import MaskedInput, UnmaskReply
from common.secagg.quantize import Quantizer
from common.secagg.server import SecAggServer, UnmaskRequest
from common.secagg.session import Session, default_threshold
from common.secagg.shamir import Share

__all__ = [
    "COMPLETE",
    "MIN_DEGREE",
    "ActiveDeadOverlap",
    "AlreadyReleased",
    "CommGraph",
    "ConflictingSurvivors",
    "GraphDisconnected",
    "GraphMismatch",
    "IncompleteSetup",
    "InconsistentShares",
    "InconsistentSurvivors",
    "KeyAdvert",
    "KeySwapDetected",
    "MaskedInput",
    "MembershipMismatch",
    "NeighbourhoodBelowThreshold",
    "NothingToMask",
    "OutOfOrder",
    "Quantizer",
    "ReplayDetected",
    "Roster",
    "SecAggAbort",
    "SecAggClient",
    "SecAggServer",
    "Session",
    "Share",
    "SiteIdentity",
    "SparseGraphRefused",
    "StateRejected",
    "TooFewSurvivors",
    "UncertifiedSurvivors",
    "UnknownParticipant",
    "UnmaskReply",
    "UnmaskRequest",
    "ValueOutOfRange",
    "consistency_quorum",
    "default_threshold",
    "effective_degree",
    "fingerprint",
    "needs_certificate",
    "survivors_payload",
]
