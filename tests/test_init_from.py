"""A federation that starts from a public checkpoint (``init-from``, ``medsynth simulate --init-from``).

What must hold: the first global model the hospitals receive is exactly the public checkpoint's
G and D; round 0's pre-training of G starts from those weights; the public file's content hash
is in every checkpoint of the run, in ``server_state.json``, the report and an export's sidecar;
a file that is missing, altered or of other shapes is refused (exit 2, one line) before anything
starts; a run never resumes under another initialisation than the one it started with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType

from common.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from common.checkpoint_model import CheckpointUnusable, load_generator, load_initial_model
from common.config import ConfigError, RunConfig
from common.dp.embedding import warm_start_generator
from common.dp.warm_start import EmbeddingSpec
from common.export import SIDECAR, export_images
from common.models import build_models
from common.protocol.messages import decode_train_request
from common.round_record import NOT_RECORDED, Initialisation, read_server_state
from common.weights import load_model_arrays, model_arrays
from medsynth.cli import main
from server.rounds import ServerPaths, WarmStartRelease, run_federation
from tests.helpers import RUN_ID, app_model, default_run_config, set_task_identity
from tests.inprocess import InProcessGrid, fresh_state, write_phantom_sites

pytestmark = pytest.mark.usefixtures("task_identity")

SMALL = {"train__local-steps": 2, "train__batch-size": 4, "model__g-width": 8, "model__d-width": 8,
         "num-server-rounds": 1, "dp__enabled": False, "warm-start__frequencies": 50,
         "warm-start__pretrain-steps": 5, "secure-aggregation": False, "wait-nodes-timeout": 5.0}
PUBLIC_SEED = 7  # another seed than the run's (0): the public weights differ from the seeded init


class RecordingGrid(InProcessGrid):
    """The in-process Grid, keeping every training request the server sent."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.train_requests: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.train_requests += [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        return super().push_messages(messages)


def _flip(blob: bytes, at: int) -> bytes:
    """``blob`` with the byte at ``at`` inverted (in the tensor data, past the header)."""
    data = bytearray(blob)
    data[at] ^= 0xFF
    return bytes(data)


def _public_checkpoint(folder: Path, cfg: dict[str, object]) -> Path:
    """A 'public pre-training run': the run's model shapes, other weights, round 3."""
    run = RunConfig.from_flower(cfg)
    netG, netD = build_models(run.model, seed=PUBLIC_SEED)
    return save_checkpoint(folder, 3, model_arrays(netG, netD), (), class_names=run.class_names)


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, RecordingGrid, dict[str, object]]:
    """One run (round 0's warm start and round 1) from a public checkpoint: (public file, output, grid, config)."""
    set_task_identity()  # the function-scoped fixture comes after this module-scoped one
    tmp = tmp_path_factory.mktemp("init-from")
    sites_dir = write_phantom_sites(tmp / "sites", 3)
    fresh_state(sites_dir)
    out = tmp / "out"
    public = _public_checkpoint(tmp / "public", default_run_config(**SMALL))
    cfg = default_run_config(**SMALL, **{"sim__sites-dir": str(sites_dir), "output-dir": str(out),
                                         "init-from": str(public)})
    grid = RecordingGrid(3, cfg, RUN_ID)
    run_federation(grid, RunConfig.from_flower(cfg), ServerPaths(out), RUN_ID)  # type: ignore[arg-type]
    return public, out, grid, cfg


def test_the_first_global_model_is_the_public_checkpoint(
        started: tuple[Path, Path, RecordingGrid, dict[str, object]]) -> None:
    # prepare
    public, _, grid, _ = started
    expected = load_checkpoint(public).arrays
    # act: the model of round 0 (the warm start's request), as a hospital decodes it
    arrays, server_round = decode_train_request(grid.train_requests[0].content)
    # assert: every tensor of G and D, exactly
    assert server_round == 0
    assert sorted(arrays) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)


def test_round_0_pretrains_g_from_the_public_weights_and_leaves_d_as_it_was(
        started: tuple[Path, Path, RecordingGrid, dict[str, object]]) -> None:
    # prepare: the same pre-training, recomputed from the public G and the stored summed release
    public, out, _, cfg = started
    run = RunConfig.from_flower(cfg)
    spec = EmbeddingSpec.of(run)
    stored = WarmStartRelease.read(ServerPaths(out).warm_start, spec.size)
    assert stored is not None
    netG, netD = build_models(run.model, seed=0)
    initial = load_initial_model(public, run.model)
    load_model_arrays(netG, netD, initial.arrays)
    warm_start_generator(netG, spec, stored.total, warm_start=run.warm_start, model=run.model, train=run.train,
                         seed=run.federation.seed, device=torch.device("cpu"))
    # act
    round0 = load_checkpoint(checkpoint_path(out / "checkpoints", 0)).arrays
    # assert: G is the public G pre-trained (not the seeded G), D the public D untouched
    recomputed = model_arrays(netG, netD)
    for name in round0:
        np.testing.assert_array_equal(round0[name], recomputed[name] if name.startswith("g.") else
                                      initial.arrays[name], err_msg=name)
    assert not np.array_equal(round0["g.project.weight"], initial.arrays["g.project.weight"])


def test_the_public_hash_is_in_every_checkpoint_the_records_the_report_and_the_export(
        started: tuple[Path, Path, RecordingGrid, dict[str, object]], tmp_path: Path) -> None:
    # prepare
    public, out, _, _ = started
    expected = Initialisation.public(load_checkpoint(public).content_sha256, "round-0003.safetensors")
    # act
    generator = load_generator(out)
    export_images(generator.sample(np.array([0, 1]), seed=0), np.array([0, 1]), tmp_path / "export", "npz",
                  generator.provenance)
    sidecar = json.loads((tmp_path / "export" / SIDECAR).read_text())
    # assert
    assert [load_checkpoint(checkpoint_path(out / "checkpoints", r)).initialisation for r in (0, 1)] == [expected] * 2
    state = read_server_state(out / "server_state.json")
    assert state is not None and state.initialisation == expected
    assert sidecar["model"]["initialisation"]["public_sha256"] == expected.public_sha256
    assert sidecar["model"]["initialisation"]["public_file"] == "round-0003.safetensors"
    shown = (expected.public_sha256 or "")[:16]
    assert f"initialised from public checkpoint {shown}" in (out / "report.html").read_text()


def test_a_run_never_resumes_under_another_initialisation(
        started: tuple[Path, Path, RecordingGrid, dict[str, object]], tmp_path: Path) -> None:
    # prepare: the finished run's output, resumed without init-from; a random-init run resumed with it
    public, out, _, cfg = started
    random_out = tmp_path / "random"
    save_checkpoint(random_out / "checkpoints", 1, load_checkpoint(public).arrays, (),
                    initialisation=Initialisation.random(0))
    without = RunConfig.from_flower({**cfg, "init-from": ""})
    with_it = RunConfig.from_flower({**cfg, "output-dir": str(random_out)})
    # act / assert: refused before any round (no message sent)
    grid = RecordingGrid(3, cfg, RUN_ID)
    with pytest.raises(ConfigError, match=r"began with 'initialised from public checkpoint .*', .* says no init-from"):
        run_federation(grid, without, ServerPaths(out), RUN_ID)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"began with 'random initialisation \(seed 0\)', .* says init-from = .*0003"):
        run_federation(grid, with_it, ServerPaths(random_out), RUN_ID)  # type: ignore[arg-type]
    assert grid.train_requests == []


def test_a_checkpoint_without_the_record_is_a_random_initialisation(tmp_path: Path) -> None:
    # prepare: one checkpoint as written before init-from existed, one of a seeded run
    netG, netD = build_models(app_model(), seed=0)
    old = save_checkpoint(tmp_path / "old", 1, model_arrays(netG, netD), ())
    seeded = save_checkpoint(tmp_path / "new", 1, model_arrays(netG, netD), (), initialisation=Initialisation.random(3))
    # act
    old_init, seeded_init = load_checkpoint(old).initialisation, load_checkpoint(seeded).initialisation
    # assert
    assert old_init == NOT_RECORDED and old_init.describe() == "random initialisation (seed not recorded)"
    assert seeded_init == Initialisation.random(3) and seeded_init.describe() == "random initialisation (seed 3)"
    assert load_generator(old).provenance.to_json()["model"]["initialisation"] == {
        "description": "random initialisation (seed not recorded)"}


def test_simulate_refuses_a_public_model_of_other_shapes_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # prepare: a public checkpoint with G width 8; the run's default G width is 16
    netG, netD = build_models(app_model(g_width=8), seed=0)
    public = save_checkpoint(tmp_path / "pub", 2, model_arrays(netG, netD), ())
    # act
    code = main(["simulate", "--out", str(tmp_path / "run"), "--init-from", str(public)])
    # assert: exit 2, one line naming both shapes; nothing was made
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "G width 8" in err and "G width 16" in err and "does not match this run's" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.unlink(), "no such file"),
    (lambda p: p.write_bytes(_flip(p.read_bytes(), -100)), "content hash mismatch"),
])
def test_simulate_refuses_a_missing_or_altered_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    damage: object, message: str) -> None:
    # prepare
    netG, netD = build_models(app_model(), seed=0)
    public = save_checkpoint(tmp_path / "pub", 2, model_arrays(netG, netD), ())
    damage(public)  # type: ignore[operator]
    # act
    code = main(["simulate", "--out", str(tmp_path / "run"), "--init-from", str(public)])
    # assert
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "--init-from" in err


def test_load_initial_model_refuses_with_a_user_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(CheckpointUnusable, match=r"^\[run\] init-from = .*: no such file"):
        load_initial_model(tmp_path / "none.safetensors", app_model(), what="[run] init-from =")


def test_simulate_resume_refuses_another_initialisation_before_flower_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # prepare: a run folder whose checkpoint says it began from a public checkpoint
    netG, netD = build_models(app_model(), seed=0)
    save_checkpoint(tmp_path / "run" / "checkpoints", 2, model_arrays(netG, netD), (),
                    initialisation=Initialisation.public("cd" * 32, "round-0004.safetensors"))
    # act: resumed without --init-from
    code = main(["simulate", "--out", str(tmp_path / "run"), "--resume"])
    # assert: exit 2, one line; no Flower home was made
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "says no init-from" in err
    assert not (tmp_path / "run" / ".flwr").exists()
