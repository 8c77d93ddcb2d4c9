"""``medsynth node augment`` and ``train-classifier``: synthetic images beside (never in) the cache, with
provenance; the classifier arms share patients, seed and settings; the report holds numbers only.

The site folder is built by hand (a toy prepared cache, a tiny kept global model, a ledger with one
charge): no federation is trained here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord

from client.augment import SYNTHETIC_DIR
from client.ledger import PrivacyLedger
from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import CANDIDATES, CLASSIFIER_REPEATS, GLOBAL_MODEL_DIR, LATENT_SCALE
from common.dataset import CACHE_FILE, read_cache_fingerprint, save_cache
from common.dp.accounting import Charge
from common.evaluation.augment import (
    ARMS,
    AugmentError,
    AugmentSettings,
    Split,
    arm_training_set,
    compare_arms,
    oversample_picks,
    patient_split,
)
from common.evaluation.classifier import ClassifierConfig
from common.export import SIDECAR
from common.models import build_models
from common.protocol.messages import ProtocolError, decode_final_model, encode_final_model
from common.round_record import RoundMetrics, RoundRecord, SitePrivacyReport, latest_privacy
from common.weights import model_arrays
from medsynth.cli import main
from tests.helpers import app_model, toy_dataset

NAMES = ("normal", "lesion")


def _arrays() -> dict[str, np.ndarray]:
    return model_arrays(*build_models(app_model(g_width=8, d_width=8), seed=0))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site state folder: cache/ (40 patients, 2 images each), global-model/ (tiny G), ledger.json."""
    state = tmp_path / "site-0"
    ds = toy_dataset(num_patients=40, per_patient=2)
    save_cache(ds, state / "cache", "fp-test", np.array([f"{p:064x}" for p in range(40)]))
    save_checkpoint(state / GLOBAL_MODEL_DIR, 3, _arrays(), [], class_names=NAMES, run_id=7)
    ledger = PrivacyLedger.open(state / "ledger.json", site="site-0", accountant="prv", delta=1e-5, epsilon_budget=10)
    ledger.charge(Charge(1.1, 0.1, 30), run=7, round=1)
    return state


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_augment_writes_beside_the_cache_never_into_it(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # prepare
    before, fingerprint = _listing(site / "cache"), read_cache_fingerprint(site / "cache")
    # act
    code = main(["node", "augment", "--site-dir", str(site), "--class", "lesion", "--n", "12", "--seed", "3"])
    # assert
    assert code == 0, capsys.readouterr().err
    assert _listing(site / "cache") == before and read_cache_fingerprint(site / "cache") == fingerprint
    (export,) = (site / SYNTHETIC_DIR).iterdir()
    sidecar = json.loads((export / SIDECAR).read_text())
    with np.load(export / "synthetic.npz") as npz:
        assert npz["images"].shape == (12, 32, 32) and set(npz["labels"].tolist()) == {1}
    kept = load_checkpoint(next((site / GLOBAL_MODEL_DIR).glob("round-*.safetensors")))
    assert sidecar["synthetic"] is True and sidecar["count"] == 12 and sidecar["class_counts"] == {"normal": 0,
                                                                                                   "lesion": 12}
    assert sidecar["model"]["content_sha256"] == kept.content_sha256 and sidecar["model"]["round"] == 3
    eps = PrivacyLedger.read(site / "ledger.json").epsilon()
    assert sidecar["privacy"]["sites"]["site-0"]["epsilon"] == pytest.approx(eps) and eps > 0
    assert "other hospitals" in sidecar["sampling"]["privacy_note"]
    assert sidecar["sampling"]["latent_scale"] == LATENT_SCALE
    assert sidecar["sampling"]["candidates"] == CANDIDATES  # the app model has a class head: filtered


def test_a_run_checkpoint_lists_every_hospitals_epsilon(site: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # prepare: a run folder whose checkpoint carries the round history of two hospitals
    def report(eps: float) -> SitePrivacyReport:
        return SitePrivacyReport(status="ok", epsilon=eps, epsilon_budget=10.0, delta=1e-5, steps=50)

    history = [RoundRecord(round=1, sites_trained=("site-0", "site-1"), sites_budget_exhausted=(), failures=(),
                           privacy={"site-0": report(2.5), "site-1": report(3.25)}, seconds=1.0,
                           metrics=RoundMetrics(0.7, 1.2))]
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 1, _arrays(), history, class_names=NAMES)
    out = tmp_path / "export"
    # act
    code = main(["node", "augment", "--site-dir", str(site), "--class", "0", "--n", "4", "--checkpoint", str(run),
                 "--out", str(out), "--seed", "0"])
    # assert
    assert code == 0, capsys.readouterr().err
    sites = json.loads((out / SIDECAR).read_text())["privacy"]["sites"]
    assert {k: v["epsilon"] for k, v in sites.items()} == {"site-0": 2.5, "site-1": 3.25}


def test_the_final_model_brings_every_hospitals_epsilon(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # prepare: the server's final-model message after a round two hospitals trained in; this hospital
    # (site-0) keeps it as client.final_model does, with the reports it carried
    history = [RoundRecord(round=3, sites_trained=("site-0", "site-1"), sites_budget_exhausted=(), failures=(),
                           privacy={s: SitePrivacyReport("ok", e, 10.0, 1e-5, 50) for s, e in
                                    (("site-0", 9.0), ("site-1", 3.25))},
                           seconds=1.0, metrics=RoundMetrics(0.7, 1.2))]
    arrays, model_round, reports = decode_final_model(encode_final_model(_arrays(), 3, latest_privacy(history)))
    save_checkpoint(site / GLOBAL_MODEL_DIR, model_round, arrays, [], class_names=NAMES, run_id=7,
                    site_privacy=reports)
    out = site / "export"
    # act
    code = main(["node", "augment", "--site-dir", str(site), "--class", "1", "--n", "4", "--out", str(out)])
    # assert: the other hospital as relayed; this one from its own ledger (not the server's 9.0)
    assert code == 0, capsys.readouterr().err
    sidecar = json.loads((out / SIDECAR).read_text())
    own = PrivacyLedger.read(site / "ledger.json").epsilon()
    assert {k: v["epsilon"] for k, v in sidecar["privacy"]["sites"].items()} == {"site-0": own, "site-1": 3.25}
    assert "relayed" in sidecar["sampling"]["privacy_note"]


@pytest.mark.parametrize("reports", ["", "[]", '{"site-1": {"epsilon": 1.0}}',
                                     '{"site-1": {"status": "ok", "epsilon": "1", "epsilon_budget": 10, '
                                     '"delta": 1e-5, "steps": 5}}'])
def test_a_final_model_with_malformed_reports_is_refused(reports: str) -> None:
    # prepare: a final model whose privacy reports are not what the protocol says
    content = encode_final_model(_arrays(), 1, {})
    content["privacy-reports"] = ConfigRecord({"json": reports})
    # act / assert
    with pytest.raises(ProtocolError, match=r"privacy reports|privacy of site-1"):
        decode_final_model(content)


@pytest.mark.parametrize(("args", "message"), [
    (["--class", "lesion", "--n", "0"], "--n must be at least 1"),
    (["--class", "fracture", "--n", "4"], "unknown class 'fracture'"),
    (["--class", "lesion", "--n", "4", "--out", "{site}/cache/synthetic"], "lies in the prepared cache"),
])
def test_augment_refusals_exit_2(site: Path, args: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    # act
    code = main(["node", "augment", "--site-dir", str(site), *[a.format(site=site) for a in args]])
    # assert
    assert code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in (site / "cache").iterdir()) == [CACHE_FILE]


def test_augment_without_a_global_model_exits_2(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # prepare
    for f in (site / GLOBAL_MODEL_DIR).iterdir():
        f.unlink()
    # act
    code = main(["node", "augment", "--site-dir", str(site), "--class", "lesion", "--n", "4"])
    # assert
    assert code == 2 and "no global model" in capsys.readouterr().err


def test_patient_split_keeps_patients_whole_and_is_seeded() -> None:
    # prepare
    ds = toy_dataset(num_patients=50, per_patient=3)
    # act
    parts = patient_split(ds.labels, ds.patients, (0.6, 0.2, 0.2), seed=4)
    again = patient_split(ds.labels, ds.patients, (0.6, 0.2, 0.2), seed=4)
    # assert
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert sorted(np.concatenate(parts).tolist()) == list(range(150))
    owners = [set(ds.patients[p].tolist()) for p in parts]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    assert [len(o) for o in owners] == [30, 10, 10]  # 25 patients per label: 15/5/5 each


TINY = ClassifierConfig(width=4, epochs=2, batch_size=16, check_every=2, seed=3)


def _splits() -> tuple[Split, Split, Split]:
    rng = np.random.default_rng(0)

    def make(n: int, share_rare: float, offset: int) -> Split:
        y = (rng.random(n) >= share_rare).astype(np.int64)  # class 0 rare
        x = rng.normal(0, 0.3, (n, 1, 16, 16)).astype(np.float32)
        x[y == 1, :, 4:12, 4:12] += 0.6
        return Split(np.clip(x, -1, 1).astype(np.float32), y, np.arange(offset, offset + n, dtype=np.int64))

    return make(48, 0.25, 0), make(20, 0.25, 100), make(30, 0.5, 200)


def test_arms_share_patients_seed_and_settings() -> None:
    """(d) given exactly (c)'s repeated images scores exactly as (c), and (b) with every augmentation
    strength 0 exactly as (a): nothing but the added images differs between the arms."""
    # prepare
    train, val, test = _splits()
    settings = AugmentSettings(classifier=TINY, bootstrap=30, seed=5, flip=False, rotation_deg=0.0,
                               brightness=0.0, contrast=0.0)
    extra = 12
    copies = train.images[oversample_picks(train.labels, 0, extra, settings.seed)]
    # act
    result = compare_arms(train, val, test, 2, ("normal", "lesion"), synthetic={0: copies}, extra=extra,
                          settings=settings)
    # assert
    a, b, c, d = (result.arm(name) for name in ARMS)
    assert result.rare == 0 and result.test_images == 30 and result.val_images == 20
    assert c.train_counts == d.train_counts == (train.labels.tolist().count(0) + extra, train.labels.sum())
    assert c.to_json() | {"arm": ""} == d.to_json() | {"arm": ""}
    assert a.to_json() | {"arm": "", "delta_balanced_accuracy": None, "delta_rare_sensitivity": None} == \
        b.to_json() | {"arm": "", "delta_balanced_accuracy": None, "delta_rare_sensitivity": None}
    assert b.delta_rare_sensitivity is not None and b.delta_rare_sensitivity.value == 0.0


def test_repeats_score_the_mean_of_classifiers_seeded_apart() -> None:
    """With 2 repeats every arm's score is the mean of the two single classifiers seeded classifier.seed and
    classifier.seed + 10 (recomputed here one by one), and the paired Δ is the difference of those means."""
    # prepare
    train, val, test = _splits()
    base = AugmentSettings(classifier=TINY, bootstrap=0, seed=5, repeats=1)
    singles = [compare_arms(train, val, test, 2, ("normal", "lesion"), synthetic={}, extra=12,
                            arms=("real", "oversample"),
                            settings=replace(base, classifier=replace(TINY, seed=TINY.seed + 10 * j)))
               for j in (0, 1)]
    # act
    both = compare_arms(train, val, test, 2, ("normal", "lesion"), synthetic={}, extra=12,
                        arms=("real", "oversample"), settings=replace(base, repeats=2))
    # assert
    for arm in ("real", "oversample"):
        one = [r.arm(arm) for r in singles]
        got = both.arm(arm)
        assert got.balanced_accuracy.value == pytest.approx(np.mean([a.balanced_accuracy.value for a in one]))
        assert got.auc.value == pytest.approx(np.mean([a.auc.value for a in one]))
        assert got.rare_sensitivity_runs == tuple(a.sensitivity[0].value for a in one)
    delta = both.arm("oversample").delta_rare_sensitivity
    assert delta is not None and delta.value == pytest.approx(
        np.mean([r.arm("oversample").sensitivity[0].value - r.arm("real").sensitivity[0].value for r in singles]))
    assert both.to_json()["repeats"] == 2


def test_repeats_below_one_refused() -> None:
    with pytest.raises(AugmentError, match="repeats"):
        AugmentSettings(repeats=0)


def test_each_arm_adds_only_its_own_images() -> None:
    # prepare
    train, _, _ = _splits()
    synthetic = {0: np.full((20, 1, 16, 16), -0.5, np.float32), 1: np.full((20, 1, 16, 16), 0.5, np.float32)}
    # act
    sets = {arm: arm_training_set(arm, train, 0, 10, synthetic, seed=1) for arm in (*ARMS, "synthetic-all")}
    # assert
    for _, (x, y) in sets.items():
        assert np.array_equal(x[: train.size], train.images) and np.array_equal(y[: train.size], train.labels)
    assert sets["real"][0].shape[0] == sets["classic"][0].shape[0] == train.size
    assert (sets["synthetic"][0][train.size:] == -0.5).all() and sets["synthetic"][1][train.size:].tolist() == [0] * 10
    added = np.bincount(sets["synthetic-all"][1][train.size:], minlength=2)
    assert added.tolist() == [10, 10]


def test_train_classifier_prints_and_writes_numbers_only(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # prepare
    assert main(["node", "augment", "--site-dir", str(site), "--class", "lesion", "--n", "30", "--seed", "1"]) == 0
    settings_before = _listing(site / "cache")
    # act
    code = main(["node", "train-classifier", "--site-dir", str(site), "--class", "lesion", "--n", "8",
                 "--bootstrap", "20", "--epochs", "3"])
    # assert
    out = capsys.readouterr().out
    assert code == 0
    assert "(d) real + synthetic rare class" in out and "(c) real + minority oversampling" in out
    record = json.loads((site / "augment" / "comparison.json").read_text())
    assert [a["arm"] for a in record["arms"]] == list(ARMS) and record["rare"] == "lesion" and record["extra"] == 8

    def leaves(x: object) -> list[object]:
        if isinstance(x, dict):
            return [v for item in x.values() for v in leaves(item)]
        if isinstance(x, list):
            assert len(x) <= 10, "a long list could carry pixels"
            return [v for item in x for v in leaves(item)]
        return [x]

    assert all(v is None or isinstance(v, (int, float, str, bool)) for v in leaves(record))
    assert (site / "augment" / "comparison.json").stat().st_size < 20_000
    assert _listing(site / "cache") == settings_before


def test_cli_defaults_written_once() -> None:
    from client import cli

    assert (cli._LATENT_SCALE, cli._CANDIDATES, cli._CLASSIFIER_REPEATS, cli._SIDECAR) == \
        (LATENT_SCALE, CANDIDATES, CLASSIFIER_REPEATS, SIDECAR)


def test_benchmark_names_the_most_skewed_and_the_smallest_hospital() -> None:
    from common.dataset import LocalDataset
    from simulation.bench_augment import site_roles

    def site(normal: int, lesion: int) -> LocalDataset:
        n = normal + lesion
        return LocalDataset(images=np.zeros((n, 1, 8, 8), np.float32), labels=np.repeat([0, 1], [normal, lesion]),
                            patients=np.arange(n, dtype=np.int64), class_names=NAMES, patient_identity=False)

    # act
    roles = site_roles([site(10, 30), site(5, 95), site(3, 7), site(50, 50)])
    # assert
    assert roles == [(), ("most skewed",), ("smallest",), ()]


def test_benchmark_marks_a_hospital_whose_validation_holds_few_rare_images() -> None:
    """A row whose validation split holds fewer than FEW_VALIDATION_RARE rare images is marked (†) with the
    count, and the table says why; a row with enough is not."""
    from simulation.bench_augment import FEW_VALIDATION_RARE, SiteRow, format_summary

    # prepare
    train, val, test = _splits()
    comparison = compare_arms(train, val, test, 2, ("normal", "lesion"), synthetic={0: train.images[:12]}, extra=12,
                              settings=AugmentSettings(classifier=TINY, bootstrap=0, repeats=1))
    few, enough = (SiteRow(10.0, 0, i, 48, (12, 36), ("most skewed",), comparison, 0.0, 0.0, val_rare=v)
                   for i, v in ((1, FEW_VALIDATION_RARE - 1), (2, FEW_VALIDATION_RARE)))
    # act
    table = format_summary([few, enough])
    # assert
    lines = table.splitlines()
    assert f"site-1 (most skewed) † {FEW_VALIDATION_RARE - 1} rare in validation" in lines[2]
    assert "†" not in lines[3] and lines[-1].startswith("† fewer than")
