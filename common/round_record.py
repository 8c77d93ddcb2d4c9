"""The server's record of a run: one typed ``RoundRecord`` per round, kept in ``server_state.json``.

Three producers build these records (the server's plain loop, its secure-aggregation rounds, and
the in-process trainer of the simulation harness) and several readers use them (the round log
line, the run report, ``summary.json``, a checkpoint's provenance, the benchmarks, the server's
status). All of them go through this module: the dataclasses below, ``to_json``/``from_json``
for one record, and ``write_server_state``/``read_server_state`` for the file.

What a record holds, and nothing more: the round number; which hospitals trained, declined
(budget spent) or failed (one readable line each); each hospital's own privacy report (its
cumulative ε from its ledger, budget, δ and DP steps: the output of the DP accounting, public by
design); the mean local losses of the round's update (a DP-trained quantity, and only present when
the round produced an update); the payload sizes and digests of what each hospital sent (the
server sees these on the wire); and, for a secure round, the session and who survived it. Nothing
in a record comes from a hospital's data other than through its DP-SGD training.

JSON shape (``server_state.json``; keys in brackets are written only when present)::

    {"rounds": [ROUND, …], "finished": true, "secure_aggregation": true, ["run_id": 7],
     ["stopped_early": "round 3: …", "last_round_attempted": ROUND],
     ["final_model": {"round": 3, "content_sha256": "…", "kept": ["site-0", …], "failures": [],
                      "received": {"site-0": {"type": "query.final_model", …}, …}}],
     ["in_process": true, "wall_seconds": 12.3],
     ["initialisation": {"seed": 0} or {"public_sha256": "…", "public_file": "round-0005.safetensors"}]}
    ROUND = {"round": 1, "sites_trained": ["site-0", …], "sites_budget_exhausted": [],
             "failures": ["…"], "seconds": 4.2,
             "privacy": {"site-0": {"status": "ok", "epsilon": 1.2, "epsilon_budget": 10.0,
                                    "delta": 1e-05, "steps": 20}, …},
             ["loss_d_fake": 0.7, "loss_g": 0.8],
             ["costs": {"site-0": {"bytes_up": 1234.0,
                                   "received": [{"type": "train", "group": "1", "bytes": 1234,
                                                 "sha256": "…"}]}, …}],
             ["secure": {"session": 1, "alive": ["site-0", …], "dead": [], "attempts": 1}]}

Reading is strict: an unknown key, a missing key or a value of the wrong type is a
``RecordError`` that names the file. The file is strict JSON, so a non-finite float is written as
``null`` (``common.atomic.write_json_atomic``); it is read back as ``inf`` for a budget (an
in-process run without DP has none) and as ``nan`` for any other number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.atomic import write_json_atomic
from common.dp.warm_start import WARM_START_ROUND
from common.errors import UserError

RECORDS_FILE = "server_state.json"

PrivacyStatus = Literal["ok", "budget-exhausted"]
_STATUSES: tuple[PrivacyStatus, ...] = ("ok", "budget-exhausted")


class RecordError(UserError, ValueError):
    """A round record (or the records file) does not have the shape this module writes."""


# ---- strict field access -----------------------------------------------------------------------
class _Fields:
    """The keys of one JSON object, checked against what a record of ``what`` may hold."""

    def __init__(self, obj: object, what: str, source: str, required: set[str], optional: frozenset[str] = frozenset()):
        self.what, self.source = what, source
        if not isinstance(obj, dict):
            raise self.error(f"expected an object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - required - optional)
        if unknown:
            raise self.error(f"unknown key(s) {unknown}")
        missing = sorted(required - set(obj))
        if missing:
            raise self.error(f"missing key(s) {missing}")
        self.obj: dict[str, object] = obj

    def error(self, text: str) -> RecordError:
        return RecordError(f"{self.source}: {self.what}: {text}")

    def has(self, key: str) -> bool:
        return key in self.obj

    def int_(self, key: str) -> int:
        value = self.obj[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"'{key}' must be an integer, got {value!r}")
        return value

    def float_(self, key: str, null: float = math.nan) -> float:
        """A number; ``null`` stands for the non-finite value strict JSON could not hold."""
        value = self.obj[key]
        if value is None:
            return null
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(f"'{key}' must be a number, got {value!r}")
        return float(value)

    def bool_(self, key: str) -> bool:
        value = self.obj[key]
        if not isinstance(value, bool):
            raise self.error(f"'{key}' must be true or false, got {value!r}")
        return value

    def str_(self, key: str) -> str:
        value = self.obj[key]
        if not isinstance(value, str):
            raise self.error(f"'{key}' must be a string, got {value!r}")
        return value

    def strs(self, key: str) -> tuple[str, ...]:
        value = self.obj[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"'{key}' must be a list of strings, got {value!r}")
        return tuple(value)

    def list_(self, key: str) -> list[object]:
        value = self.obj[key]
        if not isinstance(value, list):
            raise self.error(f"'{key}' must be a list, got {value!r}")
        return value

    def dict_(self, key: str) -> dict[str, object]:
        value = self.obj[key]
        if not isinstance(value, dict):
            raise self.error(f"'{key}' must be an object, got {value!r}")
        return value


# ---- the parts of a round record ---------------------------------------------------------------
@dataclass(frozen=True)
class SitePrivacyReport:
    """What a hospital reported of its privacy after the round (cumulative, from its ledger)."""

    status: PrivacyStatus  # "budget-exhausted": it declined the round
    epsilon: float
    epsilon_budget: float  # inf: no budget (an in-process run without DP)
    delta: float
    steps: int  # DP steps in its ledger
    noise_multiplier: float | None = None  # σ of the round, when it trained or released (public: common.dp.plan)

    def to_json(self) -> dict[str, Any]:
        out = {"status": self.status, "epsilon": self.epsilon, "epsilon_budget": self.epsilon_budget,
               "delta": self.delta, "steps": self.steps}
        return out if self.noise_multiplier is None else {**out, "noise_multiplier": self.noise_multiplier}

    @classmethod
    def from_json(cls, obj: object, *, source: str, site: str = "") -> SitePrivacyReport:
        f = _Fields(obj, f"privacy of {site}", source, {"status", "epsilon", "epsilon_budget", "delta", "steps"},
                    optional=frozenset({"noise_multiplier"}))  # records written before σ was sent lack it
        status = f.str_("status")
        if status not in _STATUSES:
            raise f.error(f"'status' must be one of {list(_STATUSES)}, got {status!r}")
        sigma = f.float_("noise_multiplier") if f.has("noise_multiplier") else None
        return cls(status, f.float_("epsilon"), f.float_("epsilon_budget", null=math.inf),
                   f.float_("delta"), f.int_("steps"), sigma)


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the server received from a hospital: its type, group, size and payload digest
    (the same digest as the hospital's audit log line for that message)."""

    type: str
    group: str
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "group": self.group, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: object, *, source: str) -> ReceivedMessage:
        f = _Fields(obj, "received message", source, {"type", "group", "bytes", "sha256"})
        return cls(f.str_("type"), f.str_("group"), f.int_("bytes"), f.str_("sha256"))


@dataclass(frozen=True)
class SiteCost:
    """What one hospital sent in the round: payload bytes in all, and every message."""

    bytes_up: float
    received: tuple[ReceivedMessage, ...]

    @classmethod
    def of(cls, received: Sequence[ReceivedMessage]) -> SiteCost:
        """The cost of these messages: ``bytes_up`` is the sum of their payload bytes."""
        return cls(float(sum(m.bytes for m in received)), tuple(received))

    def to_json(self) -> dict[str, Any]:
        return {"bytes_up": self.bytes_up, "received": [m.to_json() for m in self.received]}

    @classmethod
    def from_json(cls, obj: object, *, source: str, site: str = "") -> SiteCost:
        f = _Fields(obj, f"costs of {site}", source, {"bytes_up", "received"})
        return cls(f.float_("bytes_up"),
                   tuple(ReceivedMessage.from_json(m, source=source) for m in f.list_("received")))


@dataclass(frozen=True)
class SecureStats:
    """A finished secure round: its session, who survived to the sum, who dropped, and tries."""

    session: int
    alive: tuple[str, ...]
    dead: tuple[str, ...]
    attempts: int

    def to_json(self) -> dict[str, Any]:
        return {"session": self.session, "alive": list(self.alive), "dead": list(self.dead),
                "attempts": self.attempts}

    @classmethod
    def from_json(cls, obj: object, *, source: str) -> SecureStats:
        f = _Fields(obj, "secure", source, {"session", "alive", "dead", "attempts"})
        return cls(f.int_("session"), f.strs("alive"), f.strs("dead"), f.int_("attempts"))


@dataclass(frozen=True)
class RoundMetrics:
    """The round's mean local losses on generated images (FedAvg's weighted means)."""

    loss_d_fake: float
    loss_g: float

    @classmethod
    def from_means(cls, means: Mapping[str, float]) -> RoundMetrics:
        """From ``common.weights.fedavg``'s metrics (``METRIC_NAMES``); any other set is refused."""
        if set(means) != {"loss_d_fake", "loss_g"}:
            raise RecordError(f"round metrics must be loss_d_fake and loss_g, got {sorted(means)}")
        return cls(float(means["loss_d_fake"]), float(means["loss_g"]))


_ROUND_KEYS = {"round", "sites_trained", "sites_budget_exhausted", "failures", "privacy", "seconds"}
_ROUND_OPTIONAL = frozenset({"loss_d_fake", "loss_g", "costs", "secure"})


@dataclass(frozen=True)
class RoundRecord:
    """One round as the server saw it; see the module docstring for the JSON shape."""

    round: int
    sites_trained: tuple[str, ...]  # sorted; the hospitals whose update is in the round's sum
    sites_budget_exhausted: tuple[str, ...]  # sorted; declined for lack of budget
    failures: tuple[str, ...]  # one readable line per failure (fixed texts from hospitals)
    privacy: Mapping[str, SitePrivacyReport]  # site → its report; every hospital that answered
    seconds: float  # wall time of the round at the server
    metrics: RoundMetrics | None = None  # None: the round produced no update
    costs: Mapping[str, SiteCost] | None = None  # None: an in-process run (no messages)
    secure: SecureStats | None = None  # None: plain aggregation, or no update

    def __post_init__(self) -> None:
        if self.round == WARM_START_ROUND:  # the release: contributions in the sum, but no training, no losses
            if self.metrics is not None:
                raise RecordError("round 0 is the warm-start release: it has no losses")
            if self.secure is not None and not self.sites_trained:
                raise RecordError("round 0: secure-aggregation stats without a release")
            return
        if (self.metrics is None) != (not self.sites_trained):
            raise RecordError(f"round {self.round}: losses are recorded exactly when a hospital trained "
                              f"(trained: {list(self.sites_trained)}, losses: {self.metrics})")
        if self.secure is not None and self.metrics is None:
            raise RecordError(f"round {self.round}: secure-aggregation stats without an update")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round": self.round,
            "sites_trained": list(self.sites_trained),
            "sites_budget_exhausted": list(self.sites_budget_exhausted),
            "failures": list(self.failures),
            "privacy": {site: p.to_json() for site, p in self.privacy.items()},
            "seconds": self.seconds,
        }
        if self.metrics is not None:
            out.update(loss_d_fake=self.metrics.loss_d_fake, loss_g=self.metrics.loss_g)
        if self.costs is not None:
            out["costs"] = {site: c.to_json() for site, c in self.costs.items()}
        if self.secure is not None:
            out["secure"] = self.secure.to_json()
        return out

    @classmethod
    def from_json(cls, obj: object, *, source: str | Path) -> RoundRecord:
        """Strict: unknown, missing or mistyped keys raise ``RecordError`` naming ``source``."""
        src = str(source)
        f = _Fields(obj, "round record", src, _ROUND_KEYS, _ROUND_OPTIONAL)
        f.what = f"round {f.obj['round']!r}"
        if f.has("loss_d_fake") != f.has("loss_g"):
            raise f.error("'loss_d_fake' and 'loss_g' come together")
        metrics = RoundMetrics(f.float_("loss_d_fake"), f.float_("loss_g")) if f.has("loss_g") else None
        try:
            return cls(
                round=f.int_("round"),
                sites_trained=f.strs("sites_trained"),
                sites_budget_exhausted=f.strs("sites_budget_exhausted"),
                failures=f.strs("failures"),
                privacy={site: SitePrivacyReport.from_json(p, source=src, site=site)
                         for site, p in f.dict_("privacy").items()},
                seconds=f.float_("seconds"),
                metrics=metrics,
                costs={site: SiteCost.from_json(c, source=src, site=site) for site, c in f.dict_("costs").items()}
                if f.has("costs") else None,
                secure=SecureStats.from_json(f.obj["secure"], source=src) if f.has("secure") else None,
            )
        except RecordError as exc:
            if str(exc).startswith(src):
                raise
            raise RecordError(f"{src}: {exc}") from exc


# ---- the records file --------------------------------------------------------------------------
@dataclass(frozen=True)
class StoppedEarly:
    """Why the run ended before its planned rounds, and the round that produced no update."""

    reason: str
    last_round_attempted: RoundRecord


@dataclass(frozen=True)
class InProcessRun:
    """Marks a run of the in-process trainer (no Flower run), with its wall time."""

    wall_seconds: float


@dataclass(frozen=True)
class FinalModel:
    """The final global model sent to the hospitals after the last round, and who kept it.

    ``received`` holds each hospital's answer (type, group, size, payload digest), which its own
    audit log holds too; the answer carries only its site id and the round.
    """

    round: int
    content_sha256: str  # common.checkpoint.content_hash of the model sent
    kept: tuple[str, ...]  # sorted; the hospitals that answered they kept it
    failures: tuple[str, ...]
    received: Mapping[str, ReceivedMessage]

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "content_sha256": self.content_sha256, "kept": list(self.kept),
                "failures": list(self.failures), "received": {s: m.to_json() for s, m in self.received.items()}}

    @classmethod
    def from_json(cls, obj: object, *, source: str) -> FinalModel:
        f = _Fields(obj, "final model", source, {"round", "content_sha256", "kept", "failures", "received"})
        return cls(f.int_("round"), f.str_("content_sha256"), f.strs("kept"), f.strs("failures"),
                   {site: ReceivedMessage.from_json(m, source=source) for site, m in f.dict_("received").items()})


@dataclass(frozen=True)
class Initialisation:
    """How the run's G and D started: the seeded random initialisation, or a public checkpoint.

    A public checkpoint (``--init-from``, run key ``init-from``) is named by its content hash
    (``common.checkpoint.content_hash``) and file name: public provenance, nothing of a hospital.
    Recorded in every checkpoint's metadata and in the records file; a file written before it was
    recorded has none, which means the seeded random initialisation with the seed not recorded.
    """

    seed: int | None = None  # the random initialisation's seed; None with a public checkpoint
    public_sha256: str | None = None
    public_file: str | None = None

    def __post_init__(self) -> None:
        if (self.public_sha256 is None) != (self.public_file is None) or (
                self.public_sha256 is not None and self.seed is not None):
            raise RecordError("an initialisation is either a seed or a public checkpoint's hash and file name")

    @classmethod
    def random(cls, seed: int) -> Initialisation:
        return cls(seed=seed)

    @classmethod
    def public(cls, sha256: str, file: str) -> Initialisation:
        return cls(public_sha256=sha256, public_file=file)

    def describe(self) -> str:
        """One phrase for the report, the logs and the export sidecar."""
        if self.public_sha256 is not None:
            return f"initialised from public checkpoint {self.public_sha256[:16]}… ({self.public_file})"
        return f"random initialisation (seed {'not recorded' if self.seed is None else self.seed})"

    def to_json(self) -> dict[str, Any]:
        if self.public_sha256 is not None:
            return {"public_sha256": self.public_sha256, "public_file": self.public_file}
        return {} if self.seed is None else {"seed": self.seed}

    @classmethod
    def from_json(cls, obj: object, *, source: str) -> Initialisation:
        f = _Fields(obj, "initialisation", source, set(), frozenset({"seed", "public_sha256", "public_file"}))
        if f.has("seed") and (f.has("public_sha256") or f.has("public_file")):
            raise f.error("either 'seed' or 'public_sha256' and 'public_file'")
        if f.has("public_sha256") != f.has("public_file"):
            raise f.error("'public_sha256' and 'public_file' come together")
        if f.has("public_sha256"):
            return cls.public(f.str_("public_sha256"), f.str_("public_file"))
        return cls(seed=f.int_("seed") if f.has("seed") else None)


#: What a file that records no initialisation means: every run before ``init-from`` existed.
NOT_RECORDED = Initialisation()

_STATE_KEYS = {"rounds", "finished", "secure_aggregation"}
_STATE_OPTIONAL = frozenset({"run_id", "stopped_early", "last_round_attempted", "in_process", "wall_seconds",
                             "final_model", "initialisation"})


@dataclass(frozen=True)
class ServerState:
    """The records file: every finished round, whether the run finished, and how it ran."""

    rounds: tuple[RoundRecord, ...]
    finished: bool
    secure_aggregation: bool
    run_id: int | None = None  # the Flower run; None for an in-process run
    stopped_early: StoppedEarly | None = None
    in_process: InProcessRun | None = None
    final_model: FinalModel | None = None  # None: not sent (yet), or an in-process run
    initialisation: Initialisation = NOT_RECORDED

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rounds": [r.to_json() for r in self.rounds], "finished": self.finished,
                               "secure_aggregation": self.secure_aggregation}
        if self.run_id is not None:
            out["run_id"] = self.run_id
        if self.stopped_early is not None:
            out.update(stopped_early=self.stopped_early.reason,
                       last_round_attempted=self.stopped_early.last_round_attempted.to_json())
        if self.in_process is not None:
            out.update(in_process=True, wall_seconds=self.in_process.wall_seconds)
        if self.final_model is not None:
            out["final_model"] = self.final_model.to_json()
        if self.initialisation != NOT_RECORDED:
            out["initialisation"] = self.initialisation.to_json()
        return out

    @classmethod
    def from_json(cls, obj: object, *, source: str | Path) -> ServerState:
        """Strict, like ``RoundRecord.from_json``."""
        src = str(source)
        f = _Fields(obj, "server state", src, _STATE_KEYS, _STATE_OPTIONAL)
        if f.has("stopped_early") != f.has("last_round_attempted"):
            raise f.error("'stopped_early' and 'last_round_attempted' come together")
        if f.has("in_process") != f.has("wall_seconds"):
            raise f.error("'in_process' and 'wall_seconds' come together")
        if f.has("in_process") and not f.bool_("in_process"):
            raise f.error("'in_process' is written only as true")
        stopped = StoppedEarly(f.str_("stopped_early"),
                               RoundRecord.from_json(f.obj["last_round_attempted"], source=src)) \
            if f.has("stopped_early") else None
        return cls(
            rounds=tuple(RoundRecord.from_json(r, source=src) for r in f.list_("rounds")),
            finished=f.bool_("finished"),
            secure_aggregation=f.bool_("secure_aggregation"),
            run_id=f.int_("run_id") if f.has("run_id") else None,
            stopped_early=stopped,
            in_process=InProcessRun(f.float_("wall_seconds")) if f.has("in_process") else None,
            final_model=FinalModel.from_json(f.obj["final_model"], source=src) if f.has("final_model") else None,
            initialisation=(Initialisation.from_json(f.obj["initialisation"], source=src)
                            if f.has("initialisation") else NOT_RECORDED),
        )


def write_server_state(path: Path, state: ServerState) -> None:
    """Write the records file atomically (a reader sees the old file or the new one, never half)."""
    write_json_atomic(path, state.to_json())


def read_server_state(path: Path) -> ServerState | None:
    """The records file at ``path``; None when there is none yet (a run that has not finished a
    round). Anything else that is not the shape written here raises ``RecordError``."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise RecordError(f"{path}: not JSON ({exc}); it is written atomically, so inspect it") from exc
    return ServerState.from_json(data, source=path)


def latest_privacy(history: Sequence[RoundRecord]) -> dict[str, SitePrivacyReport]:
    """The newest report of every hospital that trained in any round of ``history``: what the
    final model carries to every hospital (public values: ε is a function of σ, q and steps)."""
    trained = {s for r in history for s in r.sites_trained}
    return {site: p for record in history for site, p in record.privacy.items() if site in trained}


def reports_to_json(reports: Mapping[str, SitePrivacyReport]) -> str:
    """Per-hospital privacy reports as JSON text (the final model's record, a kept model's metadata)."""
    return json.dumps({site: p.to_json() for site, p in sorted(reports.items())})


def reports_from_json(text: str, *, source: str | Path) -> dict[str, SitePrivacyReport]:
    """The inverse of ``reports_to_json``, strict like ``SitePrivacyReport.from_json``."""
    data = _json_text(text, dict, what="privacy reports", source=source)
    return {str(site): SitePrivacyReport.from_json(p, source=str(source), site=str(site)) for site, p in data.items()}


def history_to_json(history: Sequence[RoundRecord]) -> str:
    """A round history as JSON text (a checkpoint's metadata; non-finite floats as JSON allows)."""
    return json.dumps([r.to_json() for r in history])


def history_from_json(text: str, *, source: str | Path) -> tuple[RoundRecord, ...]:
    """The inverse of ``history_to_json``, strict like ``RoundRecord.from_json``."""
    data = _json_text(text, list, what="round history", source=source)
    return tuple(RoundRecord.from_json(r, source=source) for r in data)


def _json_text(text: str, kind: type[list[Any]] | type[dict[str, Any]], *, what: str, source: str | Path) -> Any:
    """``text`` parsed as JSON, which must be a ``kind`` (list or object)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"{source}: {what}: not JSON ({exc})") from exc
    if not isinstance(data, kind):
        raise RecordError(f"{source}: {what} must be {'a list' if kind is list else 'an object'}, "
                          f"got {type(data).__name__}")
    return data
