"""``medsynth sample``: exported images read back, carry the synthetic markers and the privacy sidecar.

The checkpoint comes from a real (tiny) federation in one process: the server's round loop and
the hospitals' code (prepare, ledger, DP training) with ``tests.inprocess.InProcessGrid`` as the
transport, so the sidecar's ε can be checked against the hospitals' own ledgers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import SecondaryCaptureImageStorage

from client.ledger import PrivacyLedger
from common.config import RunConfig
from common.export import SERIES_DESCRIPTION, SIDECAR
from medsynth.cli import main
from server.rounds import ServerPaths, run_federation
from tests.helpers import RUN_ID, default_run_config, set_task_identity
from tests.inprocess import InProcessGrid, write_phantom_sites

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder with checkpoints, sites folder with DICOM and ledgers) after 2 tiny rounds."""
    set_task_identity()
    sites = write_phantom_sites(tmp_path_factory.mktemp("sites"), 3)
    out = tmp_path_factory.mktemp("run")
    cfg = default_run_config(**{
        "sim__sites-dir": str(sites), "output-dir": str(out), "num-server-rounds": 2, "train__local-steps": 2,
        "train__batch-size": 4, "model__g-width": 8, "model__d-width": 8, "dp__calibrate": False,
        "dp__noise-multiplier": 1.3, "wait-nodes-timeout": 5.0, "secure-aggregation": False,
        "warm-start__budget-share": 0.0,
    })
    run_federation(InProcessGrid(3, cfg, RUN_ID), RunConfig.from_flower(cfg), ServerPaths(out), RUN_ID)  # type: ignore[arg-type]
    return out, sites


def _identifiers(ds: pydicom.Dataset) -> set[str]:
    """Values of identifying kinds (UIDs, names, IDs, dates), less the standard's own UIDs (SOP classes)."""
    return {str(e.value) for e in ds.iterall() if e.VR in ("UI", "LO", "PN", "SH", "DA") and e.value
            and not str(e.value).startswith("1.2.840.10008.")}


def _training_identifiers(sites: Path) -> set[str]:
    """Every patient attribute and instance UID in the hospitals' DICOM files."""
    return set().union(*(_identifiers(pydicom.dcmread(p)) for p in sites.glob("site-*/dicom/*/*.dcm")))


def test_dicom_export_reads_back_marked_synthetic_without_patient_data(trained: tuple[Path, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # prepare
    run, sites = trained
    out = tmp_path / "dicom"
    # act
    code = main(["sample", "--checkpoint", str(run), "--n", "6", "--format", "dicom", "--out", str(out), "--seed", "1"])
    # assert
    assert code == 0, capsys.readouterr().err
    files = sorted(out.glob("*/*.dcm"))
    assert len(files) == 6 and {f.parent.name for f in files} == {"normal", "lesion"}  # an image model: no SEG
    training = _training_identifiers(sites)
    assert len(training) > 96  # the source did carry identifiers: Patient IDs and UIDs of 96 files
    uids = set()
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
        assert ds.ConversionType == "SYN"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "SYNTHETIC"]
        assert ds.SeriesDescription == SERIES_DESCRIPTION and "SYNTHETIC" in ds.SeriesDescription
        assert ds.PatientID == "SYNTHETIC" and ds.PatientName.family_name == "SYNTHETIC"
        assert ds.pixel_array.shape == (32, 32) and ds.pixel_array.dtype == np.uint8
        assert f.parent.name in ds.ImageComments
        assert not _identifiers(ds) & training  # no patient attribute or UID of any training file
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == 6  # every instance its own new UID


def test_sidecar_epsilon_matches_the_ledgers(trained: tuple[Path, Path], tmp_path: Path) -> None:
    # prepare
    run, sites = trained
    # act
    code = main(["sample", "--checkpoint", str(run), "--n", "4", "--format", "png", "--out", str(tmp_path)])
    sidecar = json.loads((tmp_path / SIDECAR).read_text())
    # assert
    assert code == 0
    assert sidecar["synthetic"] is True and sidecar["count"] == 4
    assert sidecar["model"]["round"] == 2 and len(sidecar["model"]["content_sha256"]) == 64
    assert sidecar["model"]["config"]["g_width"] == 8
    assert sidecar["model"]["class_names"] == ["normal", "lesion"]  # from the checkpoint's metadata
    assert sidecar["run"]["run_id"] == RUN_ID
    assert set(sidecar["privacy"]["sites"]) == {"site-0", "site-1", "site-2"}
    for site, p in sidecar["privacy"]["sites"].items():
        ledger = PrivacyLedger.read(sites / site / "ledger.json")
        assert p["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9)
        assert p["delta"] == ledger.delta and p["steps"] == ledger.total_steps == 4
    for name in sidecar["files"]:
        assert Image.open(tmp_path / name).size == (32, 32)


def test_npz_export_of_one_class_and_refusals(trained: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # prepare
    run, _ = trained
    args = ["sample", "--checkpoint", str(run), "--n", "5", "--class", "lesion", "--format", "npz", "--seed", "3"]
    # act
    first = main([*args, "--out", str(tmp_path / "a")])
    again = main([*args, "--out", str(tmp_path / "a")])  # the folder already holds an export
    unknown = main(["sample", "--checkpoint", str(run), "--n", "1", "--class", "tumour", "--out", str(tmp_path / "b")])
    # assert
    assert first == 0 and again == 2 and unknown == 2
    err = capsys.readouterr().err
    assert "already holds an export" in err and "unknown class 'tumour'" in err and "Traceback" not in err
    with np.load(tmp_path / "a" / "synthetic.npz") as npz:
        assert npz["images"].shape == (5, 32, 32) and npz["images"].dtype == np.uint8
        assert npz["labels"].tolist() == [1] * 5 and npz["class_names"].tolist() == ["normal", "lesion"]


def test_latent_scale_draws_the_same_latents_narrowed(trained: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # prepare: the generator by hand, fed the seed's N(0, I) latents scaled by 1 and by the default
    import torch

    from common.checkpoint_model import load_generator
    from common.config import LATENT_SCALE

    run, _ = trained
    loaded = load_generator(run)
    z = torch.randn(6, loaded.cfg.latent_dim, generator=torch.Generator().manual_seed(5))  # (6, latent)
    labels = torch.arange(6) % 2
    with torch.no_grad():
        by_hand = {s: loaded.generator(s * z, labels).numpy() for s in (1.0, LATENT_SCALE)}
    # act
    drawn = {s: loaded.sample(labels.numpy(), seed=5, latent_scale=s, candidates=1) for s in (1.0, LATENT_SCALE)}
    default = loaded.sample(labels.numpy(), seed=5, candidates=1)
    args = ["sample", "--checkpoint", str(run), "--n", "2", "--latent-scale"]
    code = main([*args, "1", "--out", str(tmp_path / "a")])
    refused = main([*args, "0", "--out", str(tmp_path / "b")])
    # assert
    assert LATENT_SCALE == 0.7
    for s in (1.0, LATENT_SCALE):
        np.testing.assert_allclose(drawn[s], by_hand[s], atol=1e-6)
    np.testing.assert_array_equal(default, drawn[LATENT_SCALE])
    assert not np.allclose(drawn[1.0], drawn[LATENT_SCALE], atol=1e-3)  # the scale changes the images
    assert code == 0 and json.loads((tmp_path / "a" / SIDECAR).read_text())["sampling"]["latent_scale"] == 1.0
    assert refused == 2 and "--latent-scale must be in (0, 1]" in capsys.readouterr().err
