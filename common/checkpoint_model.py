"""A checkpoint → a ready generator, its model config and its provenance (for evaluate and sample),
or the public weights a run starts from (``init-from``, :func:`load_initial_model`).

A checkpoint (``common.checkpoint``) holds the tensors of G and D, the round history, a content
hash, the class names and the run id, but not the model config. The config is read back from
the tensor shapes (unambiguous for ``common.models``: the label embedding gives the classes
and latent size, the projection the top width, the number of transposed convolutions the image
side, D's first conv its width), then the generator is built and loaded *strictly*, so a
mismatch fails loudly. Class names come, in order, from the user (``--classes``), the checkpoint
metadata (``class_names``), the run's ``summary.json`` next to the
checkpoints folder, the caller (e.g. the reference data set), else ``class0, class1, …``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from common.atomic import read_json_object
from common.checkpoint import Checkpoint, CheckpointInvalid, latest_valid_checkpoint, load_checkpoint
from common.config import CANDIDATES, LATENT_SCALE, ModelConfig
from common.errors import UserError
from common.export import Provenance, privacy_from_history, privacy_from_reports
from common.models import Discriminator, Generator, build_models, class_filter_applies, draw_images
from common.pair_filter import filtered_pair_sampler
from common.round_record import RECORDS_FILE, Initialisation, read_server_state
from common.weights import UpdateLayoutError, load_model_arrays, model_arrays


class CheckpointUnusable(UserError, ValueError):
    """The checkpoint cannot be found, verified or turned into a generator; the message says why."""


@dataclass(frozen=True, eq=False)
class LoadedGenerator:
    """The generator of one checkpoint, in eval mode, with what it needs to sample and to be cited.

    ``discriminator``: the checkpoint's D when it can judge classes (``common.models.class_filter_applies``),
    for the class filter of :meth:`sample`; else None.
    """

    generator: Generator
    cfg: ModelConfig
    class_names: tuple[str, ...]
    provenance: Provenance
    discriminator: Discriminator | None = None

    @torch.no_grad()
    def sample(self, labels: np.ndarray, *, seed: int, latent_scale: float = LATENT_SCALE,
               candidates: int = CANDIDATES, batch_size: int = 512,
               say: Callable[[str], None] | None = None) -> np.ndarray:
        """Images (n, C, S, S) float32 in [-1, 1] for class labels (n,); latents N(0, latent_scale²·I) from
        ``seed``, each image the best of ``candidates`` draws by D's class head (``common.models.draw_images``).
        C = 2 for a pair model: channel 1 is the mask (``common.pairs.binary_masks``), and each pair is the
        best of ``candidates`` draws by the consistency filter (``common.pair_filter``; ``say`` hears that
        its U-Net trains)."""
        gen = torch.Generator().manual_seed(seed)
        self.generator.eval()
        draw_pairs = (filtered_pair_sampler(self.generator, labels.shape[0], seed=seed, latent_scale=latent_scale,
                                            candidates=candidates, say=say)
                      if self.cfg.pairs and candidates > 1 and labels.shape[0] > 0 else None)
        out = []
        for i in range(0, labels.shape[0], batch_size):
            y = torch.from_numpy(np.asarray(labels[i : i + batch_size], dtype=np.int64))
            out.append(draw_pairs(y, gen) if draw_pairs is not None else
                       draw_images(self.generator, self.discriminator, y, gen, latent_scale=latent_scale,
                                   candidates=candidates))  # (b, C, S, S)
        side = self.cfg.image_size
        return torch.cat(out).numpy() if out else np.zeros((0, self.cfg.channels, side, side), np.float32)

    def candidates_drawn(self, candidates: int) -> int:
        """The draws per kept image :meth:`sample` makes when asked for ``candidates``: 1 without a judge
        (neither a class-judging D nor, for a pair model, the consistency filter)."""
        return candidates if self.discriminator is not None or self.cfg.pairs else 1


def model_config_from_arrays(arrays: dict[str, np.ndarray], num_classes: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` that made these ``g.*``/``d.*`` tensors."""
    try:
        project = arrays["g.project.weight"]  # (top·16, latent·(2 if conditional))
        convs = [k for k, v in arrays.items() if k.startswith("g.body.") and k.endswith(".weight") and v.ndim == 4]
        d_width = int(arrays["d.body.0.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointUnusable(f"checkpoint lacks {exc}; it was not written by medsynth") from exc
    conditional = "g.label_embedding.weight" in arrays
    if conditional:
        classes, latent = (int(n) for n in arrays["g.label_embedding.weight"].shape)
    else:
        classes, latent = num_classes or 1, int(project.shape[1])
    stages = len(convs)
    upsample = "resize" if arrays[convs[0]].shape[-1] == 3 else "transposed"  # 3×3 conv or 4×4 transposed
    top = int(project.shape[0]) // 16
    return ModelConfig(image_size=4 * 2**stages, latent_dim=latent, g_width=top // 2 ** (stages - 1),
                       d_width=d_width, num_classes=classes, conditional=conditional,
                       aux_classifier="d.classify.weight" in arrays, upsample=upsample,
                       pairs=int(arrays["d.body.0.weight"].shape[1]) == 2)  # D's first conv: (width, channels, 4, 4)


def describe_model(cfg: ModelConfig) -> str:
    """A model's shape in words: what a mismatch message names for both sides."""
    return (f"{cfg.image_size}×{cfg.image_size} images, latent {cfg.latent_dim}, G width {cfg.g_width}, "
            f"D width {cfg.d_width}, {cfg.num_classes} classes"
            + ("" if cfg.conditional else ", unconditional") + ("" if cfg.aux_classifier else ", no aux classifier")
            + f", {cfg.upsample} upsampling" + (", image–mask pairs" if cfg.pairs else ""))


@dataclass(frozen=True, eq=False)
class InitialModel:
    """The public G and D a run starts from instead of the seeded random initialisation."""

    arrays: dict[str, np.ndarray]  # g.*/d.* exactly as the run's model lays them out
    initialisation: Initialisation  # the file's content hash and name: public provenance
    class_names: tuple[str, ...] | None  # as the public run recorded them


def load_initial_model(path: Path, model: ModelConfig, *, what: str = "--init-from") -> InitialModel:
    """Load and verify the checkpoint file ``path`` and check it has exactly the shapes of ``model``.

    Refused with :class:`CheckpointUnusable` (exit 2), naming ``what`` (the option or key that
    named the file): a missing file, one that fails its content hash, one medsynth did not write,
    and one whose tensors are not those of ``model`` (both shapes named).
    """
    if not path.is_file():
        raise CheckpointUnusable(f"{what} {path}: no such file; pass a round-NNNN.safetensors file of the public "
                                 "pre-training run (docs/configuration.md, 'Starting from a public model')")
    try:
        ckpt = load_checkpoint(path)
    except (CheckpointInvalid, OSError) as exc:
        raise CheckpointUnusable(f"{what} {path} is not a valid checkpoint: {exc}") from exc
    want = {k: (v.shape, v.dtype) for k, v in model_arrays(*build_models(model, seed=0)).items()}
    have = {k: (v.shape, v.dtype) for k, v in ckpt.arrays.items()}
    if have != want:
        try:
            theirs = describe_model(model_config_from_arrays(ckpt.arrays, model.num_classes))
        except UserError:
            theirs = "tensors that are not a medsynth model"
        raise CheckpointUnusable(f"{what} {path}: its model ({theirs}) does not match this run's "
                                 f"({describe_model(model)}); pre-train the public model with the run's model settings")
    return InitialModel(ckpt.arrays, Initialisation.public(ckpt.content_sha256, path.name), ckpt.class_names)


def resolve_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint file, or the newest valid one in a run folder or its ``checkpoints/``."""
    try:
        if path.is_file():
            return load_checkpoint(path)
        for folder in (path / "checkpoints", path):
            if folder.is_dir():
                found = latest_valid_checkpoint(folder)
                if found is not None:
                    return found
    except CheckpointInvalid as exc:
        raise CheckpointUnusable(f"checkpoint {path} is invalid: {exc}") from exc
    raise CheckpointUnusable(f"no valid checkpoint at {path}: pass a round-NNNN.safetensors file or a run folder")


def _run_file(ckpt: Checkpoint, name: str) -> dict[str, object]:
    """A JSON file of the run folder the checkpoint belongs to (``RUN/checkpoints/round-…``)."""
    return read_json_object(ckpt.path.parent.parent / name)


def load_generator(path: Path, *, class_names: tuple[str, ...] | None = None,
                   override_names: tuple[str, ...] | None = None) -> LoadedGenerator:
    """Load, verify and build the generator of ``path`` (file or run folder).

    ``class_names``: used when the run does not record them; ``override_names``: used always.
    """
    ckpt = resolve_checkpoint(path)
    summary = _run_file(ckpt, "summary.json")
    names = override_names or ckpt.class_names
    listed = summary.get("class_names")
    if names is None and isinstance(listed, list):
        names = tuple(str(n) for n in listed)
    cfg = model_config_from_arrays(ckpt.arrays, len(names or class_names or ()) or None)
    names = names or class_names or tuple(f"class{i}" for i in range(cfg.num_classes))
    if len(names) != cfg.num_classes:
        raise CheckpointUnusable(f"the model has {cfg.num_classes} classes but the class names are {list(names)}")
    netG, netD = build_models(cfg, seed=0)
    try:
        load_model_arrays(netG, netD, ckpt.arrays)
    except UpdateLayoutError as exc:
        raise CheckpointUnusable(f"{ckpt.path.name}: {exc}") from exc
    netG.eval()
    netD.eval()
    state = read_server_state(ckpt.path.parent.parent / RECORDS_FILE)
    run_id = ckpt.run_id if ckpt.run_id is not None else summary.get("run_id")
    provenance = Provenance(
        model_sha256=ckpt.content_sha256,
        checkpoint=ckpt.path.name,
        round=ckpt.round,
        run_id=int(run_id) if isinstance(run_id, int) else None,
        model_config=asdict(cfg),
        class_names=tuple(names),
        sites=privacy_from_history(ckpt.history) or privacy_from_reports(ckpt.site_privacy),
        secure_aggregation=state.secure_aggregation if state is not None else None,
        initialisation=ckpt.initialisation,
    )
    return LoadedGenerator(netG, cfg, tuple(names), provenance, netD if class_filter_applies(cfg) else None)
