"""``medsynth simulate``: N virtual hospitals through Flower's Simulation Engine, end to end.

Steps, each visible to the user:
1. source data: the built-in DICOM phantom generator (default) or a MedMNIST ``.npz``;
2. split by patient (IID or Dirichlet label skew; a patient is never split across sites);
3. write each hospital's share as real DICOM files, then ``prepare`` it exactly as a hospital
   node would (same code), so the simulation exercises the real hospital path;
4. start a private SuperLink (own FLWR_HOME and port), ``flwr run`` this app on it with
   ``num-supernodes = sites``, follow the server's round lines, stop the SuperLink by PID; with
   ``--ray-address`` the Simulation Engine joins that Ray cluster (``simulation.ray_cluster``, checked
   before step 1) instead of starting a private Ray;
5. with ``--reference``: evaluate the last checkpoint against real images (``common.evaluation.evaluate``);
6. write ``summary.json`` (each site's epsilon recomputed from its ledger; the evaluation) and
   ``report.html`` (plots and tables, one offline file), and print the summary.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.prepare.pipeline import load_or_create_salt, prepare_site
from common.config import SIM_MEMBERS_FILE, ConfigError, ConfigValue, RunConfig, format_members, run_config, site_paths
from common.flower import RunConfigValue, app_dir, run_app
from common.report.html import write_report
from common.secagg import Roster, SiteIdentity
from simulation.partition import (
    SourceData,
    load_medmnist_npz,
    parse_partition,
    split_by_patient,
    write_site_dicom,
)
from simulation.phantoms import phantom_population
from simulation.ray_cluster import RayCluster, parse_ray_address, probe_ray_cluster
from simulation.report import build_summary, format_summary
from simulation.run_options import RUN_OPTIONS
from simulation.sites import SiteBuild, prepare_sites
from simulation.superlink import LocalSuperLink

ROUND_LINE = re.compile(r"round (\d+)/(\d+): .*|round 0 \(warm start\): .*")


@dataclass(frozen=True)
class SimulateOptions:
    """Everything ``medsynth simulate`` can be told.

    The simulation's own settings (sites, data, partition, …) have their defaults here; a run
    setting left ``None`` is the app default (``[tool.flwr.app.config]``, :data:`RUN_OPTIONS`
    names its key). ``extra_config`` overrides any run key, after the named fields. The resolved
    run is :attr:`run`.
    """

    out: Path
    sites: int = 3
    rounds: int | None = None
    epsilon: float | None = None  # each virtual hospital's budget (dp.epsilon-budget)
    delta: float | None = None
    noise_multiplier: float | None = None  # None: the app's dp.calibrate / dp.noise-multiplier (calibrated)
    seed: int | None = None  # also seeds the data, the split and the evaluation
    dataset: Path | None = None  # MedMNIST .npz; None: phantoms
    partition: str = "iid"
    patients_per_site: int = 200
    images_per_patient: int = 2
    max_images: int | None = None  # subsample a large dataset (MedMNIST) for a quick run
    image_size: int | None = None
    local_steps: int | None = None
    batch_size: int | None = None
    sample_rate: float | None = None
    d_steps_per_g: int | None = None
    cpus_per_site: int = 1
    device: str | None = None
    timeout_s: float = 3600.0
    resume: bool = False
    secure_aggregation: bool | None = None
    secagg_degree: int | None = None  # SecAgg+ neighbours per hospital (secagg.degree; 0: complete graph)
    warm_start_share: float | None = None
    pretrain_steps: int | None = None  # the server's pre-training steps of G on round 0's release
    pairs: bool | None = None  # True: image–mask pairs (model.pairs; phantoms' lesion masks); None: the app default
    dp: bool | None = None  # False: no DP at all (--no-dp, a non-private reference); None: the app default
    extra_config: tuple[tuple[str, RunConfigValue], ...] = ()
    reference: Path | None = None  # real images to evaluate the final model against (.npz or prepared cache)
    evaluation: bool = True  # False: no final evaluation (--no-evaluation)
    eval_images: int | None = None  # synthetic images for the evaluation's TSTR; None: evaluate's default
    init_from: Path | None = None  # a public checkpoint G and D start from (run key init-from); None: seeded init
    ray_address: str | None = None  # HOST:PORT of a running Ray cluster to run the hospitals on; None: a private Ray
    run: RunConfig = field(init=False, repr=False, compare=False)  # the app defaults with overrides()

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise ConfigError("--sites must be >= 1")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError("--noise-multiplier must be > 0")
        if self.dp is False and (self.epsilon is not None or self.noise_multiplier is not None):
            raise ConfigError("--no-dp trains without privacy: drop --epsilon / --noise-multiplier")
        parse_partition(self.partition)
        if self.ray_address is not None:
            object.__setattr__(self, "ray_address", parse_ray_address(self.ray_address))
        object.__setattr__(self, "run", run_config(self.overrides()))  # a bad override is refused now
        if self.eval_images is not None and self.eval_images < 10:
            raise ConfigError("--eval-images must be at least 10")
        if not self.evaluation and (self.reference is not None or self.eval_images is not None):
            raise ConfigError("--no-evaluation evaluates nothing: leave out --reference and --eval-images")
        if self.reference is not None and not self.reference.exists():  # found out now, not after training
            raise ConfigError(f"--reference {self.reference} not found: pass a MedMNIST .npz or a prepared cache")
        if self.dataset is not None and not self.dataset.is_file():
            raise ConfigError(f"--dataset {self.dataset} not found: pass a MedMNIST v2 .npz (e.g. "
                              "../shared/data/medmnist/pneumoniamnist.npz), or leave it out for the built-in phantoms")
        if self.init_from is not None:
            self.check_init_from(self.init_from)

    def check_init_from(self, path: Path) -> None:
        """The public checkpoint verifies, has this run's model shapes, and survives the run's clean-up."""
        from common.checkpoint_model import load_initial_model

        load_initial_model(path, self.run.model)
        if not self.resume and path.resolve().is_relative_to((self.out / "checkpoints").resolve()):
            raise ConfigError(f"--init-from {path} lies in --out's checkpoints, which a new run deletes first; "
                              "copy it elsewhere, or choose another --out")

    def overrides(self) -> dict[str, ConfigValue]:
        """The run config keys these options set (everything else is the app default)."""
        cfg: dict[str, ConfigValue] = {"min-nodes": self.sites}
        for name, key in RUN_OPTIONS.items():
            value = getattr(self, name)
            if value is not None:
                cfg[key] = value
        if self.noise_multiplier is not None:
            cfg.update({"dp.calibrate": False, "dp.noise-multiplier": float(self.noise_multiplier)})
        if self.init_from is not None:  # absolute: the ServerApp runs in another folder
            cfg["init-from"] = str(self.init_from.resolve())
        cfg.update(dict(self.extra_config))
        return cfg



def project_dir() -> Path:
    """The Flower App directory (this repository: pyproject.toml with [tool.flwr.app])."""
    return app_dir()


def check_out_dir(out: Path) -> None:
    """Refuse an output folder inside the app folder unless git ignores it (``medsynth-output/``).

    ``flwr run`` packs the app folder and walks everything in it that is not git-ignored; our
    Flower home and site data below OUT would make it fail (or bundle patient-like data).
    """
    root = project_dir()
    resolved = out.resolve()
    if resolved.is_relative_to(root) and not resolved.is_relative_to(root / "medsynth-output"):
        raise ConfigError(
            f"--out {out} is inside the project folder {root}; use a folder outside it "
            "or under medsynth-output/"
        )


def load_source(opts: SimulateOptions) -> SourceData:
    """Phantoms (default) or a MedMNIST split, optionally subsampled with the run's seed."""
    seed = opts.run.federation.seed
    if opts.dataset is None:
        return phantom_population(
            opts.sites * opts.patients_per_site, opts.images_per_patient, image_size=64, seed=seed
        )
    source = load_medmnist_npz(opts.dataset, "train")
    if opts.max_images is not None and opts.max_images < source.labels.size:
        keep = np.sort(np.random.default_rng(seed).choice(source.labels.size, opts.max_images, replace=False))
        source = source.subset(keep)
    return source


def make_site_keys(sites_dir: Path, site_ids: list[str]) -> Path:
    """Each virtual hospital's Ed25519 signing key (0600, in its own folder), the roster, and each
    hospital's pinned membership (``members.txt``: every site's key fingerprint).

    In deployment every hospital makes its key on its own machine and only public keys are
    collected into the roster; here one process plays all hospitals.
    """
    keys: dict[str, bytes] = {}
    for site in site_ids:
        path = site_paths(sites_dir / site).signing_key_path
        identity = SiteIdentity.load(path, site) if path.exists() else SiteIdentity.generate(site)
        if not path.exists():
            identity.save(path)
        keys[site] = identity.public_key()
    roster_path = site_paths(sites_dir).roster_path  # one roster for the simulated consortium
    roster = Roster(keys)
    roster.save(roster_path)
    pins = format_members(roster.fingerprints())  # what each hospital pins after checking out of band
    for site in site_ids:
        (sites_dir / site / SIM_MEMBERS_FILE).write_text(pins, encoding="utf-8")
    return roster_path


def deployed_node_config(
    sites_dir: Path, site: str, class_names: tuple[str, ...], epsilon_budget: float
) -> dict[str, str | float | bool]:
    """A virtual hospital's node config as a deployed node carries it (``client.node_config``
    writes the same keys from a real ``node.toml``): its folders, keys, pinned members, classes and
    budget, and consent to plain aggregation (the benchmark and tests compare both modes). No cap on
    σ: the harness measures what a run at any ε is worth (a hospital's node.toml caps it at 10)."""
    return {
        "site-id": site,
        "data-dir": str(sites_dir / site / "dicom"),
        "state-dir": str(sites_dir / site),
        "epsilon-budget": epsilon_budget,
        "class-names": ",".join(class_names),
        "members": (sites_dir / site / SIM_MEMBERS_FILE).read_text(encoding="utf-8"),
        "signing-key-path": str(site_paths(sites_dir / site).signing_key_path),
        "roster-path": str(site_paths(sites_dir).roster_path),
        "allow-plain-aggregation": True,
        "max-noise-multiplier": math.inf,  # as in-process virtual hospitals: a run at small ε still trains
    }


def forget_privacy_history(ledger: Path) -> None:
    """Delete a *virtual* hospital's ledger, the audit log and the release record beside it (a new
    simulated consortium).

    Both go: deleting only the ledger is refused at the next round (``client.ledger.LedgerMissing``),
    because the audit log (in the site's state folder, ``common.config.site_paths``) shows the
    privacy already spent. Only for simulated sites whose state folder holds both files.
    """
    paths = site_paths(ledger.parent)
    ledger.unlink(missing_ok=True)
    paths.audit_path.unlink(missing_ok=True)
    paths.released_path.unlink(missing_ok=True)


def site_shares(opts: SimulateOptions, source: SourceData) -> dict[str, np.ndarray]:
    """Site id → the indices of its images: the split by patient that a simulation trains on and
    that ``medsynth simulate --write-sites`` writes for a rehearsal (same options, same split)."""
    parts = split_by_patient(source, opts.sites, opts.partition, opts.run.federation.seed)
    return {f"site-{i}": indices for i, indices in enumerate(parts)}


def build_sites(opts: SimulateOptions, source: SourceData, say: Callable[[str], None],
                parallel: int | None = None) -> dict[str, Path]:
    """Write and prepare every site, several at once, make their keys; returns site id → ledger path.

    ``parallel`` sites (default: one per core, at most the site count) are prepared at the same
    time (``simulation.sites.prepare_sites``). Each site's result is what a one-at-a-time build
    gives (its files, salt and cache depend on the site alone); lines are said in site order.
    """
    shares = site_shares(opts, source)
    cores = os.cpu_count() or 1
    parallel = min(len(shares), cores) if parallel is None else max(1, min(parallel, len(shares)))
    build = SiteBuild(out=opts.out, seed=opts.run.federation.seed, image_size=opts.run.model.image_size,
                      pairs=opts.run.model.pairs, resume=opts.resume)
    reports = prepare_sites(build, source, shares, parallel)
    ledgers: dict[str, Path] = {}
    for site in shares:
        report = reports[site]
        say(f"{site}: {report.images_kept} images of {report.patients} patients {dict(report.label_counts)}")
        if not report.patient_identity:
            say(f"{site}: the data has no patient identity (no Patient ID): privacy is per study or per "
                "file, not per patient")
        ledgers[site] = site_paths(opts.out / "sites" / site).ledger_path
    make_site_keys(opts.out / "sites", list(ledgers))
    return ledgers


MESSAGES_PER_ACTOR = 4  # a stage's messages in flight per Ray actor: each has the next ones queued


def messages_in_flight(opts: SimulateOptions, cluster: RayCluster | None = None) -> int:
    """``sim.messages-in-flight`` for this simulation (why a window: ``server.exchange``): a few per
    Ray actor of Flower's pool, ``floor(CPUs / cpus-per-site)`` per Ray node (this machine's
    CPUs on a private Ray, ``cluster``'s live nodes when attached)."""
    cpus = cluster.node_cpus if cluster is not None else (float(os.cpu_count() or 1),)
    actors = sum(int(c // opts.cpus_per_site) for c in cpus)
    return MESSAGES_PER_ACTOR * max(1, actors)


def run_config_for(opts: SimulateOptions, class_names: tuple[str, ...], sites_dir: Path,
                   cluster: RayCluster | None = None) -> dict[str, RunConfigValue]:
    """The ``--run-config`` overrides: the options' and the run's folders, classes and message
    window (every key exists in [tool.flwr.app.config]; checked by parsing them over the app
    defaults). An explicit option wins."""
    cfg: dict[str, RunConfigValue] = {
        "output-dir": str(opts.out.resolve()),
        "sim.sites-dir": str(sites_dir.resolve()),
        "data.class-names": ",".join(class_names),
        "sim.messages-in-flight": messages_in_flight(opts, cluster),
        **opts.overrides(),
    }
    run_config(cfg)
    return cfg


def check_resume_initialisation(opts: SimulateOptions) -> None:
    """``--resume`` names the same public checkpoint (or none) as the run began with; refused now
    (exit 2), not after Flower has started, as the ServerApp would refuse it."""
    from common.checkpoint import latest_valid_checkpoint
    from server.rounds import check_resumed_initialisation, initial_model

    ckpt = latest_valid_checkpoint(opts.out / "checkpoints")
    if ckpt is not None:
        check_resumed_initialisation(ckpt, opts.run, initial_model(opts.run))


def simulate(opts: SimulateOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole simulation; returns the summary dict (also written to summary.json)."""
    t0 = time.monotonic()
    check_out_dir(opts.out)
    cluster = None
    if opts.ray_address is not None:  # before anything is written or started
        cluster = probe_ray_cluster(opts.ray_address, cpus_per_site=opts.cpus_per_site)
        say(cluster.describe() + ": the virtual hospitals run there; OUT must be at the same path on every node")
    if opts.resume:
        check_resume_initialisation(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    if not opts.resume:
        for stale in ("checkpoints", "samples", "server_state.json", "summary.json", "report.html", "evaluation",
                      "warm_start.json"):
            path = opts.out / stale
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for ledger in (opts.out / "sites").glob("*/ledger.json"):
            forget_privacy_history(ledger)  # a fresh simulation starts with fresh (virtual) hospitals
    source = load_source(opts)
    say(f"data: {'phantoms' if opts.dataset is None else opts.dataset} — {source.labels.size} images, "
        f"classes {list(source.class_names)}, partition {opts.partition}, {opts.sites} sites")
    ledgers = build_sites(opts, source, say)
    overrides = run_config_for(opts, source.class_names, opts.out / "sites", cluster)
    run = opts.run

    def on_line(line: str) -> None:
        match = ROUND_LINE.search(line)
        if match:
            say(match.group(0))

    engine = "a private Ray" if opts.ray_address is None else f"the Ray cluster at {opts.ray_address}"
    say(f"starting a private Flower SuperLink and the Simulation Engine on {engine} (round 1 includes start-up)")
    privacy = (f"budget ε={run.privacy.epsilon_budget:g} per hospital at δ={run.privacy.delta:g}"
               + ("" if run.privacy.calibrate else f", fixed σ={run.privacy.noise_multiplier:g}")
               if run.privacy.enabled else "NO DIFFERENTIAL PRIVACY (--no-dp: a non-private reference, never deployed)")
    say(f"federation: {run.federation.num_rounds} rounds, "
        f"{'secure' if run.federation.secure_aggregation else 'PLAIN'} aggregation, {privacy}")
    if opts.init_from is not None:
        say(f"model: starts from the public checkpoint {opts.init_from} (its sha256 is in every checkpoint)")
    with LocalSuperLink(opts.out / ".flwr", ray_address=opts.ray_address) as link:
        result = run_app(
            project_dir(),
            link,
            run_config=overrides,
            num_supernodes=opts.sites,
            num_cpus_per_node=opts.cpus_per_site,
            log_path=opts.out / "flower.log",
            timeout_s=opts.timeout_s,
            on_line=on_line,
        )
    extra = {"run_id": result.run_id, "wall_seconds": round(time.monotonic() - t0, 1),
             "class_names": list(source.class_names), "differential_privacy": run.privacy.enabled}
    evaluation = evaluate_run(opts, say)
    summary = build_summary(opts.out, ledgers, extra=extra, evaluation=evaluation)
    write_report(opts.out, closest_pairs=opts.out / "evaluation" / "closest_pairs.png")
    say(format_summary(summary, opts.out))
    return summary


REFERENCE_SEED_OFFSET = 1_000_003  # the phantom reference's seed: never the training population's
REFERENCE_PATIENTS = 1000  # 2000 images: 400 real test images, enough for AUC to compare runs
# Pair mode: the U-Nets of the segmentation evaluation train on CPU; a simulation's evaluation of a pair
# model is a smoke check (100 reference patients, 10 epochs: the augmented U-Net of 3 epochs still
# predicted no lesion at all); `make bench-segmentation` measures.
PAIR_REFERENCE_PATIENTS = 100
PAIR_UNET_EPOCHS = 10


def phantom_reference(opts: SimulateOptions, say: Callable[[str], None]) -> Path:
    """A phantom population no hospital trained on (another seed), prepared like a site: the
    yardstick of a phantom run. Phantoms are synthetic, so comparing them with the model's
    images in the report reveals nothing about anyone."""
    root = opts.out / "reference"
    pairs = opts.run.model.pairs
    patients = PAIR_REFERENCE_PATIENTS if pairs else REFERENCE_PATIENTS
    source = phantom_population(patients, opts.images_per_patient, image_size=64,
                                seed=opts.run.federation.seed + REFERENCE_SEED_OFFSET)
    if not (root / "dicom").exists():
        write_site_dicom(source, np.arange(source.labels.size), root / "dicom", site_name="reference",
                         seed=opts.run.federation.seed + REFERENCE_SEED_OFFSET, masks=pairs)
    prepare_site(root / "dicom", root / "cache", image_size=opts.run.model.image_size,
                 salt=load_or_create_salt(root / "salt"), class_names=source.class_names, progress=False,
                 pairs=pairs)
    say(f"reference: {source.labels.size} phantom images of {patients} patients no hospital holds")
    return root / "cache"


def evaluate_run(opts: SimulateOptions, say: Callable[[str], None]) -> dict[str, Any] | None:
    """The evaluation of the run's newest checkpoint against ``opts.reference`` or, for phantoms,
    against a fresh phantom population (None for a data set without ``--reference``)."""
    if not opts.evaluation:
        say("evaluation skipped (--no-evaluation)")
        return None
    if opts.reference is None and opts.dataset is not None:
        return None
    from common.evaluation.evaluate import EvaluateOptions, evaluate  # torch: only when evaluating

    if not any((opts.out / "checkpoints").glob("round-*.safetensors")):
        say("evaluation skipped: the run produced no checkpoint")
        return None
    reference = opts.reference if opts.reference is not None else phantom_reference(opts, say)
    say(f"evaluating the final model against {reference}")
    return evaluate(EvaluateOptions(checkpoint=opts.out, reference=reference, seed=opts.run.federation.seed,
                                    n_synthetic=opts.eval_images, unet_epochs=PAIR_UNET_EPOCHS), say=say)
