"""Secure aggregation for medsynth: the server learns only the sum of the hospitals' updates.

Pure protocol (no Flower): Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017, on the complete graph of participants, which is the k = n - 1 case
of Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020
(SecAgg+): for a consortium of a handful of hospitals the sparse graph saves nothing worth its
extra failure analysis. Modules:

* ``session``: Session (run_id, setup_id), threshold rules;
* ``identity``: long-lived Ed25519 SiteIdentity, Roster, signed KeyAdvert;
* ``shamir``: t-of-n sharing over GF(2^521 - 1);
* ``primitives``: X25519, HKDF-SHA256, ChaCha20 PRG, ChaCha20-Poly1305 share encryption;
* ``client`` / ``server``: the protocol roles; ``messages``: what travels between them;
* ``quantize``: floats ↔ uint64 levels whose sum is exact mod 2^64;
* ``errors``: typed aborts (all ``SecAggAbort``).
"""

from common.secagg.client import SecAggClient
from common.secagg.errors import (
    ActiveDeadOverlap,
    AlreadyReleased,
    IncompleteSetup,
    InconsistentShares,
    KeySwapDetected,
    MembershipMismatch,
    NothingToMask,
    OutOfOrder,
    ReplayDetected,
    SecAggAbort,
    StateRejected,
    TooFewSurvivors,
    UnknownParticipant,
    ValueOutOfRange,
)
from common.secagg.identity import KeyAdvert, Roster, SiteIdentity, fingerprint
from common.secagg.messages import MaskedInput, UnmaskReply
from common.secagg.quantize import Quantizer
from common.secagg.server import SecAggServer, UnmaskRequest
from common.secagg.session import Session, default_threshold
from common.secagg.shamir import Share

__all__ = [
    "ActiveDeadOverlap",
    "AlreadyReleased",
    "IncompleteSetup",
    "InconsistentShares",
    "KeyAdvert",
    "KeySwapDetected",
    "MaskedInput",
    "MembershipMismatch",
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
    "StateRejected",
    "TooFewSurvivors",
    "UnknownParticipant",
    "UnmaskReply",
    "UnmaskRequest",
    "ValueOutOfRange",
    "default_threshold",
    "fingerprint",
]
