"""Run defaults are written once, in ``[tool.flwr.app.config]``; everything else reads them.

Parsing is strict (an unknown, missing or mistyped key is refused, naming the key), the code
holds no second copy of a default (no dataclass field defaults, the benchmarks and the simulation
start from the app defaults), named presets hold only overrides, and a hospital's settings have
one name from ``node.toml`` to the code.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.app import _audit_path
from common.config import (
    DERIVED_FIELDS,
    NODE_CONFIG_KEYS,
    RUN_KEYS,
    SECTION_TYPES,
    ConfigError,
    RunConfig,
    SiteConfig,
    app_defaults,
    check_overrides,
    run_config,
    site_paths,
)
from simulation.bench_dp_step import bench_model
from simulation.bench_quality import parse_args
from simulation.presets import load_preset
from simulation.runner import SimulateOptions

REPO = Path(__file__).resolve().parents[1]


def _pyproject_table() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` read here by hand, flattened as Flower does."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value

    walk("", table)
    return flat


def test_every_pyproject_key_is_a_field_and_every_field_a_key() -> None:
    # prepare
    table = _pyproject_table()
    # act
    run = RunConfig.from_flower(table)
    # assert: the keys are exactly RUN_KEYS, each section's fields exactly the keys' fields
    assert set(table) == set(RUN_KEYS)
    for section, cls in SECTION_TYPES.items():
        by_keys = {name for sec, name, _ in RUN_KEYS.values() if sec == section}
        by_fields = {f.name for f in fields(cls)} - {name for sec, name in DERIVED_FIELDS if sec == section}
        assert by_keys == by_fields, section
    assert run.to_flower() == {k: float(v) if RUN_KEYS[k][2] is float else v for k, v in table.items()}
    assert app_defaults() == run.to_flower() and run_config() == run


def test_the_run_dataclasses_hold_no_default_of_their_own() -> None:
    for cls in (*SECTION_TYPES.values(), RunConfig, SiteConfig):
        with_default = [f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING]
        assert with_default == [], cls.__name__


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update({"num-rounds": 3}), "'num-rounds' is unknown"),
        (lambda c: c.pop("model.g-width"), "'model.g-width' is missing.*pyproject.toml"),
        (lambda c: c.update({"train.local-steps": "50"}), r"train.local-steps = '50': expected a int"),
        (lambda c: c.update({"train.local-steps": 50.0}), "train.local-steps = 50.0: expected a int"),
        (lambda c: c.update({"secure-aggregation": 1}), "secure-aggregation = 1: expected a bool"),
        (lambda c: c.update({"dp.delta": True}), "dp.delta = True: expected a float"),
        (lambda c: c.update({"train.batch-size": 0}), "train.batch-size must be >= 1"),
    ],
)
def test_unknown_missing_or_mistyped_keys_are_refused_by_name(change: Any, message: str) -> None:
    cfg = _pyproject_table()
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower(cfg)


def test_an_int_is_accepted_for_a_float_and_nothing_else_is_converted() -> None:
    run = run_config({"round-timeout": 60, "dp.epsilon-budget": 3})
    assert run.federation.round_timeout_s == 60.0 and isinstance(run.privacy.epsilon_budget, float)


def test_overrides_apply_over_the_defaults_and_unknown_ones_are_refused() -> None:
    assert run_config({"model.g-width": 16}).model.g_width == 16
    assert check_overrides({"train.lr-d": 1}) == {"train.lr-d": 1.0}
    with pytest.raises(ConfigError, match=r"model\.g_width: unknown setting"):
        run_config({"model.g_width": 16})


def test_a_missing_pyproject_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        app_defaults(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app]\npublisher = 'x'\n")
    with pytest.raises(ConfigError, match=r"no \[tool.flwr.app.config\]"):
        app_defaults(tmp_path)


def test_bench_dp_step_times_the_apps_default_model() -> None:
    app_model = RunConfig.from_flower(_pyproject_table()).model
    assert bench_model() == app_model
    assert bench_model(64).image_size == 64 and bench_model(64).g_width == app_model.g_width


def test_the_simulation_and_the_quality_benchmark_start_from_the_app_defaults(tmp_path: Path) -> None:
    # act
    opts = SimulateOptions(out=tmp_path, sites=3)
    _, bench = parse_args([])
    # assert: only what they say differs from [tool.flwr.app.config]
    assert opts.run == run_config({"min-nodes": 3})
    assert SimulateOptions(out=tmp_path, sites=3, pretrain_steps=50).run == run_config(
        {"min-nodes": 3, "warm-start.pretrain-steps": 50})
    assert bench.run == run_config(load_preset("pneumoniamnist"))
    _, quick = parse_args(["--local-steps", "7", "--aux-classifier", "false"])
    assert quick.run.train.local_steps == 7 and quick.run.model.aux_classifier is False
    assert quick.run.train.batch_size == load_preset("pneumoniamnist")["train.batch-size"]


def test_the_quality_benchmarks_reference_row_differs_only_in_d_steps_rounds_and_features() -> None:
    # prepare
    _, bench = parse_args([])
    _, four = parse_args(["--nodp-rounds", "4"])
    # act
    dp_row, reference = bench.row_run(10.0), bench.row_run(None)
    # assert: the DP rows run the preset; the reference 1 D step per G step, 6 rounds, 2000 frequencies
    assert dp_row == bench.run and dp_row.federation.num_rounds == 3 and dp_row.warm_start.frequencies == 500
    assert reference.train.d_steps_per_g == 1 and reference.federation.num_rounds == 6
    assert reference.warm_start.frequencies == 2000
    assert replace(reference, train=bench.run.train, federation=bench.run.federation,
                   warm_start=bench.run.warm_start) == bench.run
    assert four.row_run(None).federation.num_rounds == 4 and four.row_run(1.0).federation.num_rounds == 3


def test_presets_hold_only_known_overrides_and_are_loaded_by_name(tmp_path: Path) -> None:
    # prepare: the tuned recipe, and a project copy with a preset that misspells a key
    recipe = load_preset("pneumoniamnist")
    project = tmp_path / "app"
    (project / "presets").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", project / "pyproject.toml")
    (project / "presets" / "typo.toml").write_text("[train]\nlocal_steps = 10\n")
    (project / "presets" / "wrong-type.toml").write_text("[train]\nlocal-steps = '10'\n")
    # assert
    assert recipe == {"num-server-rounds": 3, "train.batch-size": 128,
                      "dp.sample-rate": 0.11}
    assert all(app_defaults()[k] != v for k, v in recipe.items())  # nothing the app already says
    with pytest.raises(ConfigError, match=r"unknown preset 'pneumonia'.*pneumoniamnist"):
        load_preset("pneumonia")
    with pytest.raises(ConfigError, match=r"preset typo: train\.local_steps: unknown setting"):
        load_preset("typo", project)
    with pytest.raises(ConfigError, match=r"preset wrong-type: train\.local-steps = '10': expected a int"):
        load_preset("wrong-type", project)


def _node_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"site-id": "site-0", "data-dir": str(tmp_path / "dicom"), "epsilon-budget": 5.0,
            "class-names": "normal,lesion", "members": "site-0=" + "ab" * 32, **extra}


def test_site_paths_default_into_the_state_folder_from_one_function(tmp_path: Path) -> None:
    # act
    site = SiteConfig.from_flower(_node_config(tmp_path, **{"state-dir": str(tmp_path / "s")}), run_config())
    # assert
    paths = site_paths(tmp_path / "s")
    assert (site.cache_dir, site.ledger_path, site.salt_path, site.audit_path, site.signing_key_path,
            site.roster_path, site.released_path, site.model_dir) == (
        paths.cache_dir, paths.ledger_path, paths.salt_path, paths.audit_path, paths.signing_key_path,
        paths.roster_path, paths.released_path, paths.model_dir)


@pytest.mark.parametrize("node", [{"state-dir": "S"}, {"audit-path": "A/audit.jsonl"}, {}])
def test_the_clientapps_audit_fallback_agrees_with_the_site_config(tmp_path: Path, node: dict[str, str]) -> None:
    # prepare: a node config the ClientApp can parse, and the same without epsilon-budget (unparseable)
    cfg = _node_config(tmp_path, **{k: str(tmp_path / v) for k, v in node.items()})
    site = SiteConfig.from_flower(cfg, run_config())
    broken = {k: v for k, v in cfg.items() if k != "epsilon-budget"}
    context = Context(run_id=1, node_id=1, node_config=broken, state=RecordDict(), run_config={})
    # act / assert: an error reply is audited where the hospital's audit log is
    assert _audit_path(context, None) == site.audit_path


@pytest.mark.parametrize(
    ("old", "new"),
    [("data-path", "data-dir"), ("state-path", "state-dir"), ("cache-path", "cache-dir"),
     ("audit-log", "audit-path"), ("signing-key", "signing-key-path"), ("roster", "roster-path")],
)
def test_an_old_node_config_name_is_refused_with_its_new_one(tmp_path: Path, old: str, new: str) -> None:
    cfg = _node_config(tmp_path, **{old: str(tmp_path / "x")})
    if old == "data-path":
        cfg.pop("data-dir")
    with pytest.raises(ConfigError, match=f"'{old}' is now '{new}'"):
        SiteConfig.from_flower(cfg, run_config())


def test_an_unknown_node_config_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'ledger-dir' is unknown"):
        SiteConfig.from_flower(_node_config(tmp_path, **{"ledger-dir": "x"}), run_config())
    assert {k for k in NODE_CONFIG_KEYS if k.endswith(("-path", "-dir"))} == {
        "data-dir", "state-dir", "cache-dir", "ledger-path", "audit-path", "signing-key-path", "roster-path"}


def test_bench_expected_batch_sets_q_from_the_splits_size(tmp_path: Path) -> None:
    # prepare: a MedMNIST-shaped file with 200 training images (one patient each)
    data = tmp_path / "tiny.npz"
    split = {f"{part}_images": np.zeros((n, 28, 28), np.uint8) for part, n in (("train", 200), ("val", 4), ("test", 4))}
    labels = {f"{part}_labels": np.zeros((n, 1), np.uint8) for part, n in (("train", 200), ("val", 4), ("test", 4))}
    np.savez(data, **split, **labels)  # type: ignore[arg-type]
    # act
    _, four = parse_args(["--data", str(data), "--expected-batch", "10"])
    _, capped = parse_args(["--data", str(data), "--expected-batch", "100", "--sites", "3"])
    # assert: q = B / (200 / sites), at most 1; the preset's other keys kept
    assert four.run.privacy.sample_rate == 0.2 and capped.run.privacy.sample_rate == 1.0
    assert four.run.train.batch_size == load_preset("pneumoniamnist")["train.batch-size"]
    with pytest.raises(SystemExit):
        parse_args(["--data", str(data), "--expected-batch", "10", "--sample-rate", "0.5"])


def test_simulate_secagg_degree_auto_is_complete_for_small_and_logarithmic_for_large_consortia(
    tmp_path: Path,
) -> None:
    # prepare
    from simulation.run_options import AUTO_COMPLETE_UP_TO, secagg_degree_option

    # act
    small, large, huge = (secagg_degree_option("auto", n) for n in (AUTO_COMPLETE_UP_TO, 100, 500))
    opts = SimulateOptions(out=tmp_path, sites=100, secagg_degree=large)

    # assert: k = ceil(3 log2 n) above the bound, the run key set, and the app default left alone otherwise
    assert (small, large, huge) == (0, 20, 27)
    assert opts.run.federation.secagg_degree == 20
    assert SimulateOptions(out=tmp_path, sites=3).run.federation.secagg_degree == 0
    assert secagg_degree_option("12", 100) == 12 and secagg_degree_option(None, 100) is None


def test_a_simulation_windows_its_messages_by_the_ray_actors_it_has(tmp_path: Path) -> None:
    # prepare: 2 CPUs per virtual hospital; a cluster of a 4-CPU and a 3-CPU node (2 + 1 actors)
    from simulation.ray_cluster import RayCluster
    from simulation.runner import MESSAGES_PER_ACTOR, messages_in_flight, run_config_for

    opts = SimulateOptions(out=tmp_path, sites=3, cpus_per_site=2)
    cluster = RayCluster(address="h:1", ray_version="x", python_version="3.11", node_cpus=(4.0, 3.0))
    # act
    attached = messages_in_flight(opts, cluster)
    local = run_config_for(opts, ("a", "b"), tmp_path)
    # assert: a few per actor, set in the run config, and the app default (all at once) left alone
    assert attached == 3 * MESSAGES_PER_ACTOR
    assert local["sim.messages-in-flight"] == MESSAGES_PER_ACTOR * max(1, (os.cpu_count() or 1) // 2)
    assert run_config_for(opts, ("a", "b"), tmp_path, cluster)["sim.messages-in-flight"] == attached
    assert opts.run.federation.messages_in_flight == 0
