"""Typed, validated configuration, parsed once from Flower's run config and node config.

Run defaults are written in one place: ``[tool.flwr.app.config]`` of the app's ``pyproject.toml``.
Flower flattens nested keys (``dp.noise-multiplier``) and hands the ServerApp and every ClientApp
exactly those keys, overridden where ``--run-config`` says so. Parsing is strict: every key of
:data:`RUN_KEYS` must be there with its type and no other key is accepted, so no setting can fall
back to a second default written in code. Tools that build a run themselves (the simulation, the
benchmarks, the tests) start from :func:`app_defaults` and apply overrides (:func:`run_config`).
Everything else in the code base receives these frozen dataclasses; nothing else reads
``run_config`` or ``node_config``.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.secagg.graph import COMPLETE, MIN_DEGREE

ConfigValue = bool | int | float | str


class ConfigError(UserError, ValueError):
    """A configuration value is missing or out of range; the message names the key and the fix."""


_EXAMPLE = {bool: "true", int: "5", float: "0.5", str: '"text"'}


def _typed(key: str, value: object, kind: type, where: str = "") -> ConfigValue:
    """``value`` as ``kind``, else ``ConfigError`` naming ``where`` + ``key`` and the type expected.

    An int is accepted for a float (TOML writes ``900`` for 900 seconds); nothing else is
    converted: ``"3"``, ``3.0`` for an int and ``1`` for a bool are refused.
    """
    checked: ConfigValue | None = None
    if isinstance(value, bool):
        checked = value if kind is bool else None
    elif (kind is int and isinstance(value, int)) or (kind is str and isinstance(value, str)):
        checked = value
    elif kind is float and isinstance(value, int | float):
        checked = float(value)
    if checked is None:
        raise ConfigError(f"{where}{key} = {value!r}: expected a {kind.__name__}, e.g. {key} = {_EXAMPLE[kind]}")
    return checked


def _get(cfg: Mapping[str, ConfigValue], key: str, kind: type, default: ConfigValue | None = None) -> ConfigValue:
    """A node-config value, ``default`` when absent (if there is one); ``ConfigError`` naming the key."""
    if key not in cfg:
        if default is None:
            raise ConfigError(f"missing node config key '{key}' (`medsynth node start` writes it from node.toml)")
        return default
    return _typed(key, cfg[key], kind, "node config ")

def parse_class_names(text: str) -> tuple[str, ...]:
    """``"normal,lesion"`` → ("normal", "lesion"): the label folders, in class-index order.

    Every hospital maps its label folders through this one list, so class 1 means the same
    thing everywhere, even at a hospital that has no image of class 0.
    """
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"data.class-names must list distinct names separated by commas, got {text!r}")
    return names


UPSAMPLE_KINDS = ("resize", "transposed")  # model.upsample: see common/models.py
LATENT_SCALE = 0.7  # sampling spread of the latents, z ~ N(0, 0.7² I): see common/models.py
CANDIDATES = 3  # each synthetic image is the best of 3 draws by D's class head: see common/models.py
CLASSIFIER_REPEATS = 3  # a hospital's augment comparison: classifiers per arm: see common/evaluation/augment.py


@dataclass(frozen=True)
class ModelConfig:
    """DCGAN shape: image side 32 or 64, latent size, channel widths, class conditioning, and
    ``pairs``: G draws (image, mask) pairs as two channels and D judges the pair (``common.pairs``)."""

    image_size: int
    latent_dim: int
    g_width: int
    d_width: int
    num_classes: int
    conditional: bool
    aux_classifier: bool  # AC-GAN class head on D (needs conditional); see common/models.py
    upsample: str  # G's upsampling: "resize" (nearest, then 3×3 conv) or "transposed"
    pairs: bool  # image–mask pairs: 2 channels (image, mask) in G's output and D's input

    @property
    def channels(self) -> int:
        """Channels of a model row: 1 (image), or 2 (image, mask) in pair mode."""
        return 2 if self.pairs else 1

    def __post_init__(self) -> None:
        if self.image_size not in (32, 64):
            raise ConfigError(f"model.image-size must be 32 or 64, got {self.image_size}")
        if self.latent_dim < 1 or self.g_width < 4 or self.d_width < 4:
            raise ConfigError("model.latent-dim must be >= 1 and model.g-width/d-width >= 4")
        if self.d_width % 4:
            raise ConfigError(f"model.d-width must be a multiple of 4 (GroupNorm groups), got {self.d_width}")
        if self.num_classes < 1:
            raise ConfigError(f"model.num-classes must be >= 1, got {self.num_classes}")
        if self.upsample not in UPSAMPLE_KINDS:
            raise ConfigError(f"model.upsample must be one of {', '.join(UPSAMPLE_KINDS)}, got {self.upsample!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One local round: ``local_steps`` private D steps, one G step every ``d_steps_per_g``."""

    local_steps: int
    d_steps_per_g: int
    batch_size: int  # generated rows per D and G step; 2·B divides D's noisy gradient sum
    lr_d: float
    lr_g: float
    beta1: float
    diversity_weight: float  # λ of G's diversity term (common.dp.train.diversity_term); 0: off
    device: str

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ConfigError(f"train.local-steps must be >= 1, got {self.local_steps}")
        if self.d_steps_per_g < 1:
            raise ConfigError(f"train.d-steps-per-g must be >= 1, got {self.d_steps_per_g}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch-size must be >= 1, got {self.batch_size}")
        if not (self.lr_d > 0 and self.lr_g > 0):
            raise ConfigError("train.lr-d and train.lr-g must be > 0")
        if not (self.diversity_weight >= 0 and math.isfinite(self.diversity_weight)):
            raise ConfigError(f"train.diversity-weight must be a finite number >= 0, got {self.diversity_weight}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD on the discriminator, patient level.

    ``calibrate``: choose the noise multiplier so that the planned rounds end at, never above,
    each hospital's budget (given what its ledger already spent). Otherwise ``noise_multiplier``
    is used as is and a hospital stops training once its next round would exceed its budget.

    ``enabled = false`` trains without DP (no clipping, no noise, nothing charged): the
    non-private reference of ``medsynth simulate --no-dp`` only. A deployed hospital refuses such
    a run before it reads anything (``client.policy.check_run_allowed``).
    """

    enabled: bool
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float  # public Poisson rate q over patients, the same at every hospital
    calibrate: bool
    epsilon_budget: float
    delta: float
    accountant: str

    def __post_init__(self) -> None:
        if not self.max_grad_norm > 0:
            raise ConfigError(f"dp.max-grad-norm must be > 0, got {self.max_grad_norm}")
        if not self.noise_multiplier > 0:
            raise ConfigError(f"dp.noise-multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"dp.sample-rate must be in (0, 1], got {self.sample_rate}")
        if not (self.epsilon_budget > 0 and math.isfinite(self.epsilon_budget)):
            raise ConfigError(f"dp.epsilon-budget must be a finite number > 0, got {self.epsilon_budget}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"dp.accountant must be 'prv' or 'rdp', got {self.accountant!r}")


@dataclass(frozen=True)
class WarmStartConfig:
    """The private class-conditional mean embedding that starts and anchors G (``common.dp.embedding``).

    ``budget_share`` of each hospital's ε goes to one release of its summed embedding (0: no
    release, pure DP-GAN); the server pre-trains G on the sum for ``pretrain_steps`` steps and
    every G step adds ``anchor_weight`` × the embedding loss.
    """

    budget_share: float
    frequencies: int
    pretrain_steps: int
    anchor_weight: float

    def __post_init__(self) -> None:
        if not 0 <= self.budget_share < 1:
            raise ConfigError(f"warm-start.budget-share must be in [0, 1), got {self.budget_share}")
        if self.frequencies < 1 or self.pretrain_steps < 0:
            raise ConfigError("warm-start.frequencies must be >= 1 and warm-start.pretrain-steps >= 0")
        if not (self.anchor_weight >= 0 and math.isfinite(self.anchor_weight)):
            raise ConfigError(f"warm-start.anchor-weight must be a finite number >= 0, got {self.anchor_weight}")

    @property
    def enabled(self) -> bool:
        return self.budget_share > 0


@dataclass(frozen=True)
class FederationConfig:
    """Server-side round loop."""

    num_rounds: int
    min_nodes: int
    round_timeout_s: float
    wait_nodes_timeout_s: float
    seed: int
    output_dir: str
    init_from: str  # a public checkpoint G and D start from (server's file); "": the seeded random init
    sites_dir: str  # simulation only: site-<partition-id>/ folders live here
    secure_aggregation: bool
    secagg_threshold: int  # 0: default max(3, n // 2 + 1); never below 3
    secagg_max_retries: int  # protocol restarts of one round after early dropouts
    secagg_degree: int  # 0: the complete graph; else SecAgg+ neighbours per hospital (common.secagg.graph)
    deterministic_noise: bool  # simulation tests only: seeded DP noise, NOT private
    messages_in_flight: int  # simulation: a stage's messages pushed at most this many unanswered at a time; 0: all

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"num-server-rounds must be >= 1, got {self.num_rounds}")
        if self.min_nodes < 1:
            raise ConfigError(f"min-nodes must be >= 1, got {self.min_nodes}")
        if not (self.round_timeout_s > 0 and self.wait_nodes_timeout_s > 0):
            raise ConfigError("round-timeout and wait-nodes-timeout must be > 0 seconds")
        if self.secagg_threshold and self.secagg_threshold < 3:
            raise ConfigError(f"secagg.threshold must be 0 (default) or >= 3, got {self.secagg_threshold}")
        if self.secagg_max_retries < 0:
            raise ConfigError(f"secagg.max-retries must be >= 0, got {self.secagg_max_retries}")
        if self.messages_in_flight < 0:
            raise ConfigError(f"sim.messages-in-flight must be 0 (all at once) or >= 1, got {self.messages_in_flight}")
        if not (self.secagg_degree == COMPLETE or self.secagg_degree >= MIN_DEGREE):
            raise ConfigError(f"secagg.degree must be 0 (the complete graph) or >= {MIN_DEGREE} (SecAgg+ neighbours "
                              f"per hospital), got {self.secagg_degree}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run shares across the federation (from ``[tool.flwr.app.config]``)."""

    model: ModelConfig
    train: TrainConfig
    privacy: PrivacyConfig
    federation: FederationConfig
    class_names: tuple[str, ...]  # label folder names, in index order
    warm_start: WarmStartConfig

    def __post_init__(self) -> None:
        if len(self.class_names) != self.model.num_classes:
            raise ConfigError(
                f"{len(self.class_names)} class names {self.class_names} but model has "
                f"{self.model.num_classes} classes"
            )

    @staticmethod
    def from_flower(cfg: Mapping[str, object]) -> RunConfig:
        """Parse Flower's flattened run config: every key of :data:`RUN_KEYS`, nothing else.

        Raises ``ConfigError`` naming the unknown, missing or mistyped key and the fix.
        """
        unknown = sorted(set(cfg) - set(RUN_KEYS))
        if unknown:
            raise ConfigError(
                f"run config key {unknown[0]!r} is unknown: not a setting of this app; remove it (known: "
                f"{', '.join(sorted(RUN_KEYS))}), or add the setting to [tool.flwr.app.config] and RUN_KEYS"
            )
        missing = sorted(set(RUN_KEYS) - set(cfg))
        if missing:
            raise ConfigError(
                f"run config key {missing[0]!r} is missing: its default belongs in [tool.flwr.app.config] "
                "of the app's pyproject.toml (Flower passes every key written there)"
            )
        sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "privacy": {}, "federation": {},
                                               "warm_start": {}}
        for key, (section, name, kind) in RUN_KEYS.items():
            value = _typed(key, cfg[key], kind, "run config ")
            if section in sections:
                sections[section][name] = value
        class_names = parse_class_names(str(cfg["data.class-names"]))
        return RunConfig(
            model=ModelConfig(**sections["model"], num_classes=len(class_names)),
            train=TrainConfig(**sections["train"]),
            privacy=PrivacyConfig(**sections["privacy"]),
            federation=FederationConfig(**sections["federation"]),
            class_names=class_names,
            warm_start=WarmStartConfig(**sections["warm_start"]),
        )

    def to_flower(self) -> dict[str, ConfigValue]:
        """The flattened run config this was parsed from (inverse of :meth:`from_flower`)."""
        flat: dict[str, ConfigValue] = {}
        for key, (section, name, _) in RUN_KEYS.items():
            flat[key] = ",".join(self.class_names) if section == "run" else getattr(getattr(self, section), name)
        return flat


RUN_KEYS: dict[str, tuple[str, str, type]] = {
    # flattened key of [tool.flwr.app.config] → (RunConfig section, field, type); "run": RunConfig itself.
    # ModelConfig.num_classes is not a key: it is the number of data.class-names.
    "num-server-rounds": ("federation", "num_rounds", int),
    "min-nodes": ("federation", "min_nodes", int),
    "round-timeout": ("federation", "round_timeout_s", float),
    "wait-nodes-timeout": ("federation", "wait_nodes_timeout_s", float),
    "seed": ("federation", "seed", int),
    "output-dir": ("federation", "output_dir", str),
    "init-from": ("federation", "init_from", str),
    "secure-aggregation": ("federation", "secure_aggregation", bool),
    "secagg.threshold": ("federation", "secagg_threshold", int),
    "secagg.max-retries": ("federation", "secagg_max_retries", int),
    "secagg.degree": ("federation", "secagg_degree", int),
    "sim.sites-dir": ("federation", "sites_dir", str),
    "sim.deterministic-noise": ("federation", "deterministic_noise", bool),
    "sim.messages-in-flight": ("federation", "messages_in_flight", int),
    "data.class-names": ("run", "class_names", str),
    "model.image-size": ("model", "image_size", int),
    "model.latent-dim": ("model", "latent_dim", int),
    "model.g-width": ("model", "g_width", int),
    "model.d-width": ("model", "d_width", int),
    "model.conditional": ("model", "conditional", bool),
    "model.aux-classifier": ("model", "aux_classifier", bool),
    "model.upsample": ("model", "upsample", str),
    "model.pairs": ("model", "pairs", bool),
    "train.local-steps": ("train", "local_steps", int),
    "train.d-steps-per-g": ("train", "d_steps_per_g", int),
    "train.batch-size": ("train", "batch_size", int),
    "train.lr-d": ("train", "lr_d", float),
    "train.lr-g": ("train", "lr_g", float),
    "train.beta1": ("train", "beta1", float),
    "train.diversity-weight": ("train", "diversity_weight", float),
    "train.device": ("train", "device", str),
    "dp.enabled": ("privacy", "enabled", bool),
    "dp.max-grad-norm": ("privacy", "max_grad_norm", float),
    "dp.noise-multiplier": ("privacy", "noise_multiplier", float),
    "dp.sample-rate": ("privacy", "sample_rate", float),
    "dp.calibrate": ("privacy", "calibrate", bool),
    "dp.epsilon-budget": ("privacy", "epsilon_budget", float),
    "dp.delta": ("privacy", "delta", float),
    "dp.accountant": ("privacy", "accountant", str),
    "warm-start.budget-share": ("warm_start", "budget_share", float),
    "warm-start.frequencies": ("warm_start", "frequencies", int),
    "warm-start.pretrain-steps": ("warm_start", "pretrain_steps", int),
    "warm-start.anchor-weight": ("warm_start", "anchor_weight", float),
}

SECTION_TYPES: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "privacy": PrivacyConfig,
                                  "federation": FederationConfig, "warm_start": WarmStartConfig}
DERIVED_FIELDS = frozenset({("model", "num_classes")})  # fields of a section that no key sets


def flatten_table(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A TOML table flattened the way Flower flattens run config: ``{"dp": {"delta": x}}`` → ``{"dp.delta": x}``."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(flatten_table(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def project_root() -> Path:
    """The app folder: the nearest folder above this package holding a ``pyproject.toml`` with
    ``[tool.flwr.app]`` (the repository, an editable install, or an unpacked app bundle)."""
    here = Path(__file__).resolve().parent
    for folder in here.parents:
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and "[tool.flwr.app" in candidate.read_text(encoding="utf-8", errors="replace"):
            return folder
    raise ConfigError(
        f"cannot find the app's pyproject.toml (with [tool.flwr.app.config], the run defaults) above {here}; "
        "run medsynth from its repository or an editable install (`make install`)"
    )


@lru_cache(maxsize=8)
def _defaults_of(pyproject: Path) -> tuple[tuple[str, ConfigValue], ...]:
    doc = read_toml(pyproject)
    try:
        table = doc["tool"]["flwr"]["app"]["config"]
    except (KeyError, TypeError):
        raise ConfigError(f"{pyproject} has no [tool.flwr.app.config] table (the app's run defaults)") from None
    flat = flatten_table(table)
    RunConfig.from_flower(flat)  # every key known, none missing, each of its type
    return tuple((key, _typed(key, value, RUN_KEYS[key][2], f"{pyproject} ")) for key, value in flat.items())


def app_defaults(project: Path | None = None) -> dict[str, ConfigValue]:
    """The run defaults: ``[tool.flwr.app.config]`` of the app's ``pyproject.toml``, flattened as
    Flower flattens it and checked. ``project``: the app folder (default :func:`project_root`)."""
    return dict(_defaults_of((project or project_root()).resolve() / "pyproject.toml"))


def check_overrides(
    overrides: Mapping[str, object], project: Path | None = None, *, where: str = ""
) -> dict[str, ConfigValue]:
    """``overrides`` with known keys and their types (an int accepted for a float), validated by
    parsing them over the app defaults; ``ConfigError`` names ``where`` + the key."""
    checked: dict[str, ConfigValue] = {}
    for key, value in overrides.items():
        if key not in RUN_KEYS:
            raise ConfigError(f"{where}{key}: unknown setting; known: {', '.join(sorted(RUN_KEYS))}")
        checked[key] = _typed(key, value, RUN_KEYS[key][2], where)
    RunConfig.from_flower({**app_defaults(project), **checked})
    return checked


def run_config_values(overrides: Mapping[str, object] | None = None, project: Path | None = None,
                      ) -> dict[str, ConfigValue]:
    """The app defaults with ``overrides`` applied: a complete, checked, flattened run config."""
    return {**app_defaults(project), **check_overrides(overrides or {}, project)}


def run_config(overrides: Mapping[str, object] | None = None, project: Path | None = None) -> RunConfig:
    """The :class:`RunConfig` of the app defaults with ``overrides`` (unknown keys refused)."""
    return RunConfig.from_flower(run_config_values(overrides, project))


MIN_PARTICIPANTS = 3  # a sum over two hospitals reveals each to the other


def parse_members(text: str) -> tuple[tuple[str, str], ...]:
    """``"site-0=<sha256 hex>,site-1=<sha256 hex>"`` → sorted (site id, fingerprint) pairs.

    The consortium membership a hospital pinned itself: every member's site id and the SHA-256
    of its Ed25519 signing key (``medsynth certs fingerprint``), checked out of band.
    """
    pairs: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        site, sep, fingerprint = item.partition("=")
        site, fingerprint = site.strip(), fingerprint.strip().lower().removeprefix("sha256:")
        if not sep or not site or len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
            raise ConfigError(
                f"consortium member {item!r}: expected site-id = <64 hex digits> (the SHA-256 fingerprint "
                "`medsynth certs fingerprint` prints for that hospital's signing key)"
            )
        if site in pairs:
            raise ConfigError(f"consortium member {site!r} is pinned twice")
        pairs[site] = fingerprint
    return tuple(sorted(pairs.items()))


def format_members(members: Mapping[str, str]) -> str:
    """Inverse of :func:`parse_members` (the node-config string)."""
    return ",".join(f"{site}={fp}" for site, fp in sorted(members.items()))


DENOISE_CHOICES = ("none", "median3", "median5")  # prepare's optional step (common.denoise)

NODE_DEFAULTS: dict[str, ConfigValue] = {
    # a hospital's optional settings when its node.toml (and so its node config) leaves them out
    "delta": 1e-5,
    "accountant": "prv",
    "min-participants": MIN_PARTICIPANTS,
    # [consortium] min-neighbours: the fewest SecAgg+ neighbours a hospital accepts; 0: only the complete graph
    "min-neighbours": COMPLETE,
    "allow-plain-aggregation": False,
    "denoise": "none",  # [prepare] denoise: no filter (common.denoise)
    # the largest DP-SGD noise multiplier the hospital trains at: a round that would need more is
    # refused before anything is charged (at σ ≫ 1 the update is noise; node.example.toml says more)
    "max-noise-multiplier": 10.0,
    # "max-epsilon-per-run" has no entry: by default one run may spend the whole budget
}

NODE_CONFIG_KEYS: dict[str, type] = {
    # the deployment node config ``client.node_config`` writes (``flower-supernode --node-config``)
    "site-id": str,
    "data-dir": str,  # the DICOM export
    "state-dir": str,  # the hospital's state folder; the paths below default into it (site_paths)
    "cache-dir": str,
    "ledger-path": str,
    "audit-path": str,
    "signing-key-path": str,
    "roster-path": str,
    "epsilon-budget": float,
    "max-epsilon-per-run": float,  # default: epsilon-budget
    "max-noise-multiplier": float,
    "delta": float,
    "accountant": str,
    "class-names": str,
    "denoise": str,  # [prepare] denoise: common.denoise's step, applied by prepare (default none)
    "members": str,
    "min-participants": int,
    "min-neighbours": int,
    "allow-plain-aggregation": bool,
}

RENAMED_NODE_KEYS = {
    # old name → the one name a setting has from node.toml to the code (refused, with the new name)
    "data-path": "data-dir", "state-path": "state-dir", "cache-path": "cache-dir", "audit-log": "audit-path",
    "signing-key": "signing-key-path", "roster": "roster-path", "secagg-private-key": "signing-key-path",
}

SIM_MEMBERS_FILE = "members.txt"  # simulation: a virtual hospital's pinned members (parse_members format)
RELEASED_FILE = "released.json"  # under a site's state folder (client.release)
GLOBAL_MODEL_DIR = "global-model"  # under a site's state folder (``medsynth node evaluate`` reads it)


@dataclass(frozen=True)
class SitePaths:
    """Where a hospital keeps what it owns, all in its state folder unless its config says otherwise."""

    cache_dir: Path  # the prepared dataset
    ledger_path: Path  # the privacy ledger (client.ledger)
    salt_path: Path  # the secret salt of patient hashes
    audit_path: Path  # JSON lines: every message that left the hospital (client.audit)
    signing_key_path: Path  # Ed25519 key that signs this site's secure-aggregation adverts
    roster_path: Path  # every site's Ed25519 public key, from the operator
    released_path: Path  # which (run, round) update left masked in which session (client.release)
    model_dir: Path  # the newest global model received, for evaluation at the node


def site_paths(state_dir: Path) -> SitePaths:
    """The one place a hospital's default file and folder names are written (under ``state_dir``)."""
    return SitePaths(
        cache_dir=state_dir / "cache",
        ledger_path=state_dir / "ledger.json",
        salt_path=state_dir / "salt.bin",
        audit_path=state_dir / "audit.jsonl",
        signing_key_path=state_dir / "secagg_key.pem",
        roster_path=state_dir / "roster.json",
        released_path=state_dir / RELEASED_FILE,
        model_dir=state_dir / GLOBAL_MODEL_DIR,
    )


def default_state_dir(data_dir: Path) -> Path:
    """The state folder of a node config without ``state-dir``: beside the DICOM export."""
    return data_dir.parent / "medsynth-state"


def check_node_config_keys(node_cfg: Mapping[str, object]) -> None:
    """Refuse a deployment node config key that is not a setting (an old name says its new one)."""
    for key in node_cfg:
        if key in RENAMED_NODE_KEYS:
            raise ConfigError(f"node config key '{key}' is now '{RENAMED_NODE_KEYS[key]}' (one name from "
                              "node.toml to the code); rename it")
        if key not in NODE_CONFIG_KEYS:
            raise ConfigError(f"node config key '{key}' is unknown; known: {', '.join(sorted(NODE_CONFIG_KEYS))}")


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's own settings (node config in deployment; derived in simulation).

    The privacy parameters are the hospital's, not the server's: ``epsilon_budget``, ``delta``
    and ``accountant`` come from the node config, and so do ``class_names`` (which of its label
    folders train), ``members`` (whom it agrees to be mixed with), ``min_participants`` and
    ``min_neighbours`` (the sparsest secure-aggregation graph it accepts, ``common.secagg.graph``). A
    run that asks for anything else is refused before anything is charged or sent
    (``client.policy``). In simulation the harness plays every hospital and derives them from
    the run (``medsynth simulate --epsilon``).
    """

    site_id: str
    data_dir: Path
    cache_dir: Path
    ledger_path: Path
    salt_path: Path
    epsilon_budget: float
    signing_key_path: Path  # Ed25519 key that signs this site's secure-aggregation adverts
    roster_path: Path  # every site's Ed25519 public key, from the operator; checked against ``members``
    members: tuple[tuple[str, str], ...]  # pinned (site id, SHA-256 of its signing key), sorted
    released_path: Path  # which (run, round) update left masked in which session (client.release)
    delta: float
    accountant: str
    class_names: tuple[str, ...]
    min_participants: int
    min_neighbours: int  # 0: only the complete graph; else the fewest SecAgg+ neighbours accepted (>= 4)
    simulated: bool
    allow_plain_aggregation: bool  # the hospital's own consent to send unmasked updates
    audit_path: Path  # JSON lines: every message that left the hospital (client.audit)
    model_dir: Path  # the newest global model received, for evaluation at the node
    max_epsilon_per_run: float  # the most ε one run may add to the ledger (common.dp.plan.run_target)
    max_noise_multiplier: float  # a training round that needs a larger σ is refused (inf: no cap)
    denoise: str  # prepare's optional step (common.denoise); part of the cache fingerprint

    def __post_init__(self) -> None:
        if not self.site_id:
            raise ConfigError("site-id must not be empty")
        if not (self.epsilon_budget > 0 and math.isfinite(self.epsilon_budget)):
            raise ConfigError(f"epsilon-budget must be a finite number > 0, got {self.epsilon_budget}")
        if not self.max_epsilon_per_run > 0:
            raise ConfigError(f"max-epsilon-per-run must be a number > 0, got {self.max_epsilon_per_run}")
        if not self.max_noise_multiplier > 0:
            raise ConfigError(f"max-noise-multiplier must be a number > 0, got {self.max_noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"accountant must be 'prv' or 'rdp', got {self.accountant!r}")
        if self.min_participants < MIN_PARTICIPANTS:
            raise ConfigError(
                f"min-participants must be >= {MIN_PARTICIPANTS} (a sum over two hospitals reveals each to the "
                f"other), got {self.min_participants}"
            )
        if not (self.min_neighbours == COMPLETE or self.min_neighbours >= MIN_DEGREE):
            raise ConfigError(f"min-neighbours must be 0 (only the complete graph) or >= {MIN_DEGREE}, "
                              f"got {self.min_neighbours}")
        if self.denoise not in DENOISE_CHOICES:
            raise ConfigError(f"denoise = {self.denoise!r}: one of {', '.join(DENOISE_CHOICES)}")
        if self.site_id not in dict(self.members):
            raise ConfigError(f"the pinned consortium members {sorted(dict(self.members))} do not include this "
                              f"hospital ({self.site_id!r}); pin every member, this hospital included")

    @staticmethod
    def from_flower(node_cfg: Mapping[str, ConfigValue], run: RunConfig) -> SiteConfig:
        """Build from node config; in simulation (only ``partition-id``) from ``sim.sites-dir``.

        Deployment node config keys (:data:`NODE_CONFIG_KEYS`; ``client.node_config`` writes them
        from ``node.toml``): ``site-id``, ``data-dir``, ``state-dir`` (cache, ledger, salt, keys and
        audit log live there unless ``cache-dir``, ``ledger-path``, ``signing-key-path``,
        ``roster-path``, ``audit-path`` say otherwise: :func:`site_paths`), ``epsilon-budget``,
        ``class-names`` and ``members`` (required, see :func:`parse_members`), ``delta``,
        ``accountant``, ``min-participants``, ``min-neighbours``, ``allow-plain-aggregation``, ``max-noise-multiplier``
        (:data:`NODE_DEFAULTS`) and ``max-epsilon-per-run`` (by default ``epsilon-budget``).
        Any other key is refused. In simulation the harness writes each virtual hospital's pinned
        members to ``<site>/members.txt`` and the privacy settings are the run's.
        """
        if "partition-id" in node_cfg:
            return SiteConfig._simulated(node_cfg, run)
        if "data-dir" not in node_cfg and not any(k in RENAMED_NODE_KEYS for k in node_cfg):
            raise ConfigError("node config needs 'data-dir' (deployment) or 'partition-id' (simulation)")
        check_node_config_keys(node_cfg)
        data = Path(str(_get(node_cfg, "data-dir", str)))
        state = Path(str(_get(node_cfg, "state-dir", str, str(default_state_dir(data)))))
        paths = site_paths(state)
        return SiteConfig(
            site_id=str(_get(node_cfg, "site-id", str, data.name)),
            data_dir=data,
            cache_dir=Path(str(_get(node_cfg, "cache-dir", str, str(paths.cache_dir)))),
            ledger_path=Path(str(_get(node_cfg, "ledger-path", str, str(paths.ledger_path)))),
            salt_path=paths.salt_path,
            epsilon_budget=float(_get(node_cfg, "epsilon-budget", float)),
            signing_key_path=Path(str(_get(node_cfg, "signing-key-path", str, str(paths.signing_key_path)))),
            roster_path=Path(str(_get(node_cfg, "roster-path", str, str(paths.roster_path)))),
            members=parse_members(str(_get(node_cfg, "members", str))),
            released_path=paths.released_path,
            delta=float(_get(node_cfg, "delta", float, NODE_DEFAULTS["delta"])),
            accountant=str(_get(node_cfg, "accountant", str, NODE_DEFAULTS["accountant"])),
            class_names=parse_class_names(str(_get(node_cfg, "class-names", str))),
            min_participants=int(_get(node_cfg, "min-participants", int, NODE_DEFAULTS["min-participants"])),
            min_neighbours=int(_get(node_cfg, "min-neighbours", int, NODE_DEFAULTS["min-neighbours"])),
            simulated=False,
            allow_plain_aggregation=bool(
                _get(node_cfg, "allow-plain-aggregation", bool, NODE_DEFAULTS["allow-plain-aggregation"])
            ),
            audit_path=Path(str(_get(node_cfg, "audit-path", str, str(paths.audit_path)))),
            model_dir=paths.model_dir,
            max_epsilon_per_run=float(_get(node_cfg, "max-epsilon-per-run", float,
                                           _get(node_cfg, "epsilon-budget", float))),
            max_noise_multiplier=float(_get(node_cfg, "max-noise-multiplier", float,
                                            NODE_DEFAULTS["max-noise-multiplier"])),
            denoise=str(_get(node_cfg, "denoise", str, NODE_DEFAULTS["denoise"])),
        )

    @staticmethod
    def _simulated(node_cfg: Mapping[str, ConfigValue], run: RunConfig) -> SiteConfig:
        """A virtual hospital of ``medsynth simulate``: ``site-<partition-id>`` under ``sim.sites-dir``."""
        if not run.federation.sites_dir:
            raise ConfigError("simulation needs run config 'sim.sites-dir' (set by `medsynth simulate`)")
        site_id = f"site-{int(_get(node_cfg, 'partition-id', int))}"
        sites = Path(run.federation.sites_dir)
        state = sites / site_id
        paths = site_paths(state)
        try:
            members = parse_members((state / SIM_MEMBERS_FILE).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"virtual hospital {site_id} has no pinned members ({exc.strerror}); "
                              "`medsynth simulate` writes them with the site keys") from exc
        return SiteConfig(
            site_id=site_id,
            data_dir=state / "dicom",
            cache_dir=paths.cache_dir,
            ledger_path=paths.ledger_path,
            salt_path=paths.salt_path,
            epsilon_budget=run.privacy.epsilon_budget,
            signing_key_path=paths.signing_key_path,
            roster_path=site_paths(sites).roster_path,  # one roster for the whole simulated consortium
            members=members,
            released_path=paths.released_path,
            delta=run.privacy.delta,
            accountant=run.privacy.accountant,
            class_names=run.class_names,
            min_participants=MIN_PARTICIPANTS,
            min_neighbours=MIN_DEGREE,  # virtual hospitals follow the run's secagg.degree
            simulated=True,
            allow_plain_aggregation=True,  # virtual hospitals follow the run's --plain-aggregation flag
            audit_path=paths.audit_path,
            model_dir=paths.model_dir,
            # the harness plays every hospital: no cap beyond the run's budget, so a simulation at
            # a small ε still trains (and shows what such a run is worth)
            max_epsilon_per_run=run.privacy.epsilon_budget,
            max_noise_multiplier=math.inf,
            denoise=str(NODE_DEFAULTS["denoise"]),  # the harness writes clean DICOM folders
        )


def read_toml(path: Path) -> dict[str, Any]:
    """A deployment TOML file (``server.toml``, ``node.toml``, ``pyproject.toml``) as a dict;
    ``ConfigError`` naming the file when it is missing or not valid TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
