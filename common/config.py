"""Typed, validated configuration, parsed once from Flower's run config and node config.

Defaults live in ``[tool.flwr.app.config]`` of ``pyproject.toml``; Flower flattens nested keys
(``dp.noise-multiplier``). Everything else in the code base receives these frozen dataclasses;
nothing else reads ``run_config`` or ``node_config``.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError

ConfigValue = bool | int | float | str


class ConfigError(UserError, ValueError):
    """A configuration value is missing or out of range; the message names the key and the fix."""


def _get(cfg: Mapping[str, ConfigValue], key: str, kind: type, default: ConfigValue | None = None) -> ConfigValue:
    if key not in cfg:
        if default is None:
            raise ConfigError(f"missing config key '{key}' (add it to [tool.flwr.app.config] or --run-config)")
        return default
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {kind.__name__}, got {value!r}")
    return value


def parse_class_names(text: str) -> tuple[str, ...]:
    """``"normal,lesion"`` → ("normal", "lesion"): the label folders, in class-index order.

    Every hospital maps its label folders through this one list, so class 1 means the same
    thing everywhere, even at a hospital that has no image of class 0.
    """
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"data.class-names must list distinct names separated by commas, got {text!r}")
    return names


@dataclass(frozen=True)
class ModelConfig:
    """DCGAN shape: image side 32 or 64, latent size, channel widths, class conditioning."""

    image_size: int = 32
    latent_dim: int = 64
    g_width: int = 64
    d_width: int = 8
    num_classes: int = 2
    conditional: bool = True
    aux_classifier: bool = True  # AC-GAN class head on D (needs conditional); see common/models.py

    def __post_init__(self) -> None:
        if self.image_size not in (32, 64):
            raise ConfigError(f"model.image-size must be 32 or 64, got {self.image_size}")
        if self.latent_dim < 1 or self.g_width < 4 or self.d_width < 4:
            raise ConfigError("model.latent-dim must be >= 1 and model.g-width/d-width >= 4")
        if self.d_width % 4:
            raise ConfigError(f"model.d-width must be a multiple of 4 (GroupNorm groups), got {self.d_width}")
        if self.num_classes < 1:
            raise ConfigError(f"model.num-classes must be >= 1, got {self.num_classes}")


@dataclass(frozen=True)
class TrainConfig:
    """One local round: ``local_steps`` private D steps, one G step every ``d_steps_per_g``."""

    local_steps: int = 20
    d_steps_per_g: int = 5
    batch_size: int = 32  # generated rows per D and G step; 2·B divides D's noisy gradient sum
    lr_d: float = 2e-4
    lr_g: float = 2e-4
    beta1: float = 0.5
    diversity_weight: float = 10.0  # λ of G's diversity term (common.dp.train.diversity_term); 0: off
    device: str = "auto"

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
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    sample_rate: float = 0.15  # public Poisson rate q over patients, the same at every hospital
    calibrate: bool = True
    epsilon_budget: float = 10.0
    delta: float = 1e-5
    accountant: str = "prv"

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
class FederationConfig:
    """Server-side round loop."""

    num_rounds: int = 3
    min_nodes: int = 3
    round_timeout_s: float = 900.0
    wait_nodes_timeout_s: float = 300.0
    seed: int = 0
    output_dir: str = ""
    sites_dir: str = ""  # simulation only: site-<partition-id>/ folders live here
    secure_aggregation: bool = True
    secagg_threshold: int = 0  # 0: default max(3, n // 2 + 1); never below 3
    secagg_max_retries: int = 2  # protocol restarts of one round after early dropouts
    deterministic_noise: bool = False  # simulation tests only: seeded DP noise, NOT private

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


@dataclass(frozen=True)
class RunConfig:
    """Everything a run shares across the federation (from ``[tool.flwr.app.config]``)."""

    model: ModelConfig
    train: TrainConfig
    privacy: PrivacyConfig
    federation: FederationConfig
    class_names: tuple[str, ...] = ("normal", "lesion")  # label folder names, in index order

    def __post_init__(self) -> None:
        if len(self.class_names) != self.model.num_classes:
            raise ConfigError(
                f"{len(self.class_names)} class names {self.class_names} but model has "
                f"{self.model.num_classes} classes"
            )

    @staticmethod
    def from_flower(cfg: Mapping[str, ConfigValue]) -> RunConfig:
        """Parse Flower's flattened run config; raises ``ConfigError`` naming the bad key."""
        class_names = parse_class_names(str(_get(cfg, "data.class-names", str, "normal,lesion")))
        model = ModelConfig(
            image_size=int(_get(cfg, "model.image-size", int, ModelConfig.image_size)),
            latent_dim=int(_get(cfg, "model.latent-dim", int, ModelConfig.latent_dim)),
            g_width=int(_get(cfg, "model.g-width", int, ModelConfig.g_width)),
            d_width=int(_get(cfg, "model.d-width", int, ModelConfig.d_width)),
            num_classes=len(class_names),
            conditional=bool(_get(cfg, "model.conditional", bool, ModelConfig.conditional)),
            aux_classifier=bool(_get(cfg, "model.aux-classifier", bool, ModelConfig.aux_classifier)),
        )
        train = TrainConfig(
            local_steps=int(_get(cfg, "train.local-steps", int, TrainConfig.local_steps)),
            d_steps_per_g=int(_get(cfg, "train.d-steps-per-g", int, TrainConfig.d_steps_per_g)),
            batch_size=int(_get(cfg, "train.batch-size", int, TrainConfig.batch_size)),
            lr_d=float(_get(cfg, "train.lr-d", float, TrainConfig.lr_d)),
            lr_g=float(_get(cfg, "train.lr-g", float, TrainConfig.lr_g)),
            beta1=float(_get(cfg, "train.beta1", float, TrainConfig.beta1)),
            diversity_weight=float(_get(cfg, "train.diversity-weight", float, TrainConfig.diversity_weight)),
            device=str(_get(cfg, "train.device", str, TrainConfig.device)),
        )
        privacy = PrivacyConfig(
            max_grad_norm=float(_get(cfg, "dp.max-grad-norm", float, PrivacyConfig.max_grad_norm)),
            noise_multiplier=float(_get(cfg, "dp.noise-multiplier", float, PrivacyConfig.noise_multiplier)),
            sample_rate=float(_get(cfg, "dp.sample-rate", float, PrivacyConfig.sample_rate)),
            calibrate=bool(_get(cfg, "dp.calibrate", bool, PrivacyConfig.calibrate)),
            epsilon_budget=float(_get(cfg, "dp.epsilon-budget", float, PrivacyConfig.epsilon_budget)),
            delta=float(_get(cfg, "dp.delta", float, PrivacyConfig.delta)),
            accountant=str(_get(cfg, "dp.accountant", str, PrivacyConfig.accountant)),
        )
        federation = FederationConfig(
            num_rounds=int(_get(cfg, "num-server-rounds", int, FederationConfig.num_rounds)),
            min_nodes=int(_get(cfg, "min-nodes", int, FederationConfig.min_nodes)),
            round_timeout_s=float(_get(cfg, "round-timeout", float, FederationConfig.round_timeout_s)),
            wait_nodes_timeout_s=float(
                _get(cfg, "wait-nodes-timeout", float, FederationConfig.wait_nodes_timeout_s)
            ),
            seed=int(_get(cfg, "seed", int, FederationConfig.seed)),
            output_dir=str(_get(cfg, "output-dir", str, FederationConfig.output_dir)),
            sites_dir=str(_get(cfg, "sim.sites-dir", str, FederationConfig.sites_dir)),
            secure_aggregation=bool(
                _get(cfg, "secure-aggregation", bool, FederationConfig.secure_aggregation)
            ),
            secagg_threshold=int(_get(cfg, "secagg.threshold", int, FederationConfig.secagg_threshold)),
            secagg_max_retries=int(_get(cfg, "secagg.max-retries", int, FederationConfig.secagg_max_retries)),
            deterministic_noise=bool(
                _get(cfg, "sim.deterministic-noise", bool, FederationConfig.deterministic_noise)
            ),
        )
        return RunConfig(
            model=model, train=train, privacy=privacy, federation=federation, class_names=class_names
        )


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


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's own settings (node config in deployment; derived in simulation).

    The privacy parameters are the hospital's, not the server's: ``epsilon_budget``, ``delta``
    and ``accountant`` come from the node config, and so do ``class_names`` (which of its label
    folders train), ``members`` (whom it agrees to be mixed with) and ``min_participants``. A
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
    delta: float = 1e-5
    accountant: str = "prv"
    class_names: tuple[str, ...] = ("normal", "lesion")
    min_participants: int = MIN_PARTICIPANTS
    simulated: bool = False
    allow_plain_aggregation: bool = False  # the hospital's own consent to send unmasked updates
    audit_path: Path | None = None  # JSON lines: every message that left the hospital (client.audit)
    model_dir: Path | None = None  # the newest global model received, for evaluation at the node

    def __post_init__(self) -> None:
        if not self.site_id:
            raise ConfigError("site-id must not be empty")
        if not (self.epsilon_budget > 0 and math.isfinite(self.epsilon_budget)):
            raise ConfigError(f"epsilon-budget must be a finite number > 0, got {self.epsilon_budget}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"accountant must be 'prv' or 'rdp', got {self.accountant!r}")
        if self.min_participants < MIN_PARTICIPANTS:
            raise ConfigError(
                f"min-participants must be >= {MIN_PARTICIPANTS} (a sum over two hospitals reveals each to the "
                f"other), got {self.min_participants}"
            )
        if self.site_id not in dict(self.members):
            raise ConfigError(f"the pinned consortium members {sorted(dict(self.members))} do not include this "
                              f"hospital ({self.site_id!r}); pin every member, this hospital included")

    @staticmethod
    def from_flower(node_cfg: Mapping[str, ConfigValue], run: RunConfig) -> SiteConfig:
        """Build from node config; in simulation (only ``partition-id``) from ``sim.sites-dir``.

        Deployment node config keys (``client.node_config`` writes them from ``node.toml``):
        ``site-id``, ``data-path``, ``state-path`` (cache, ledger, salt live there unless
        ``cache-path``/``ledger-path`` are given), ``epsilon-budget`` (required), ``delta``,
        ``accountant``, ``class-names`` (required), ``members`` (required, see
        :func:`parse_members`), ``min-participants``, ``signing-key`` and ``roster`` (default
        under ``state-path``), ``allow-plain-aggregation`` (default false), ``audit-log``
        (default ``state-path/audit.jsonl``). In simulation the harness writes each virtual
        hospital's pinned members to ``<site>/members.txt`` and the privacy settings are the run's.
        """
        if "data-path" in node_cfg:
            data = Path(str(_get(node_cfg, "data-path", str)))
            state = Path(str(_get(node_cfg, "state-path", str, str(data.parent / "medsynth-state"))))
            site_id = str(_get(node_cfg, "site-id", str, data.name))
            budget = float(_get(node_cfg, "epsilon-budget", float))
            delta = float(_get(node_cfg, "delta", float, 1e-5))
            accountant = str(_get(node_cfg, "accountant", str, "prv"))
            class_names = parse_class_names(str(_get(node_cfg, "class-names", str)))
            members = parse_members(str(_get(node_cfg, "members", str)))
            min_participants = int(_get(node_cfg, "min-participants", int, MIN_PARTICIPANTS))
            signing_key = Path(str(_get(node_cfg, "signing-key", str, str(state / "secagg_key.pem"))))
            roster = Path(str(_get(node_cfg, "roster", str, str(state / "roster.json"))))
            simulated = False
            allow_plain = bool(_get(node_cfg, "allow-plain-aggregation", bool, False))
            audit = Path(str(_get(node_cfg, "audit-log", str, str(state / "audit.jsonl"))))
        elif "partition-id" in node_cfg:
            if not run.federation.sites_dir:
                raise ConfigError("simulation needs run config 'sim.sites-dir' (set by `medsynth simulate`)")
            pid = int(_get(node_cfg, "partition-id", int))
            site_id = f"site-{pid}"
            state = Path(run.federation.sites_dir) / site_id
            data = state / "dicom"
            budget = run.privacy.epsilon_budget
            delta, accountant, class_names = run.privacy.delta, run.privacy.accountant, run.class_names
            try:
                members = parse_members((state / SIM_MEMBERS_FILE).read_text(encoding="utf-8"))
            except OSError as exc:
                raise ConfigError(f"virtual hospital {site_id} has no pinned members ({exc.strerror}); "
                                  "`medsynth simulate` writes them with the site keys") from exc
            min_participants = MIN_PARTICIPANTS
            signing_key = state / "secagg_key.pem"
            roster = Path(run.federation.sites_dir) / "roster.json"
            simulated = True
            allow_plain = True  # virtual hospitals follow the run's --plain-aggregation flag
            audit = state / "audit.jsonl"
        else:
            raise ConfigError("node config needs 'data-path' (deployment) or 'partition-id' (simulation)")
        return SiteConfig(
            site_id=site_id,
            data_dir=data,
            cache_dir=Path(str(_get(node_cfg, "cache-path", str, str(state / "cache")))),
            ledger_path=Path(str(_get(node_cfg, "ledger-path", str, str(state / "ledger.json")))),
            salt_path=state / "salt.bin",
            epsilon_budget=budget,
            signing_key_path=signing_key,
            roster_path=roster,
            members=members,
            released_path=state / RELEASED_FILE,
            delta=delta,
            accountant=accountant,
            class_names=class_names,
            min_participants=min_participants,
            simulated=simulated,
            allow_plain_aggregation=allow_plain,
            audit_path=audit,
            model_dir=state / GLOBAL_MODEL_DIR,
        )


SIM_MEMBERS_FILE = "members.txt"  # simulation: a virtual hospital's pinned members (parse_members format)
RELEASED_FILE = "released.json"  # under a site's state folder (client.release)
GLOBAL_MODEL_DIR = "global-model"  # under a site's state folder (``medsynth node evaluate`` reads it)


def read_toml(path: Path) -> dict[str, Any]:
    """A deployment TOML file (``server.toml``, ``node.toml``, ``pyproject.toml``) as a dict;
    ``ConfigError`` naming the file when it is missing or not valid TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
