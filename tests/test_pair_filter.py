"""The consistency filter of pair models (common/pair_filter.py): per-pair Dice, best of K per slot, wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.checkpoint_model import LoadedGenerator
from common.config import run_config
from common.evaluation.segmentation import SmallUNet
from common.export import Provenance
from common.models import Generator, build_models, draw_images
from common.pair_filter import consistency_judge, draw_consistent_pairs, judge_pairs, mask_agreement

SIDE = 32


def _always_foreground_judge() -> SmallUNet:
    """A U-Net that predicts foreground everywhere: its output convolution is 0 with a bias of +10."""
    net = SmallUNet(4)
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.fill_(10.0)
    return net.eval()


def _pair_generator(conditional: bool = False) -> Generator:
    cfg = run_config({"model.pairs": True, "model.conditional": conditional, "model.aux-classifier": False,
                      "model.image-size": SIDE}).model
    netG, _ = build_models(cfg, seed=4)
    return netG.eval()


def _pairs_with_foreground(fractions: list[float]) -> torch.Tensor:
    """Pairs (m, 2, S, S): random images, masks whose first ⌊f·S²⌋ pixels (row-major) are foreground."""
    m = len(fractions)
    pairs = torch.rand(m, 2, SIDE, SIDE) * 2 - 1
    masks = -torch.ones(m, SIDE * SIDE)
    for i, f in enumerate(fractions):
        masks[i, : int(f * SIDE * SIDE)] = 1.0
    pairs[:, 1] = masks.view(m, SIDE, SIDE)
    return pairs


def test_a_pairs_score_is_the_dice_of_the_judges_mask_against_its_own() -> None:
    # prepare: a judge that marks every pixel, and masks covering none, a quarter, half and all of the image
    judge = _always_foreground_judge()
    pairs = _pairs_with_foreground([0.0, 0.25, 0.5, 1.0])
    # act
    score = mask_agreement(judge, pairs)
    # assert: Dice 2|M| / (S² + |M|): 0, 0.4, 2/3, 1
    assert torch.allclose(score, torch.tensor([0.0, 0.4, 2 / 3, 1.0], dtype=torch.float64), atol=1e-9)


def test_a_pair_without_foreground_that_the_judge_leaves_empty_agrees_fully() -> None:
    # prepare: a judge that marks nothing, an empty mask and a full one
    judge = _always_foreground_judge()
    with torch.no_grad():
        judge.out.bias.fill_(-10.0)
    # act
    score = mask_agreement(judge, _pairs_with_foreground([0.0, 1.0]))
    # assert
    assert score.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("conditional", [False, True])
def test_each_slot_keeps_its_best_candidate(conditional: bool) -> None:
    # prepare: a pair generator, a judge that prefers the largest mask, the same latents drawn unfiltered
    netG, judge, k, b = _pair_generator(conditional), _always_foreground_judge(), 3, 8
    labels = torch.arange(b) % 2 if conditional else torch.zeros(b, dtype=torch.int64)
    ys = labels.repeat(k) if conditional else None
    with torch.no_grad():
        z = 0.7 * torch.randn(k * b, netG.cfg.latent_dim, generator=torch.Generator().manual_seed(5))
        all_candidates = netG(z, ys).view(k, b, 2, SIDE, SIDE)  # candidate j of slot i at [j, i]
    # act
    kept = draw_consistent_pairs(netG, judge, labels, torch.Generator().manual_seed(5), latent_scale=0.7,
                                 candidates=k)
    # assert: each slot keeps the candidate with the most foreground (the judge's highest Dice)
    foreground = (all_candidates[:, :, 1] > 0).flatten(2).sum(2)  # (k, b)
    best = foreground.argmax(dim=0)
    assert kept.shape == (b, 2, SIDE, SIDE)
    assert torch.equal(kept, all_candidates[best, torch.arange(b)])


def test_one_candidate_is_the_unfiltered_draw() -> None:
    # prepare
    netG = _pair_generator()
    labels = torch.zeros(6, dtype=torch.int64)
    # act
    one = draw_consistent_pairs(netG, _always_foreground_judge(), labels, torch.Generator().manual_seed(2),
                                latent_scale=0.7, candidates=1)
    with torch.no_grad():
        plain = draw_images(netG, None, labels, torch.Generator().manual_seed(2), latent_scale=0.7, candidates=1)
    # assert
    assert torch.equal(one, plain)


def test_the_judge_is_refused_for_an_image_model() -> None:
    netG, _ = build_models(run_config({"model.image-size": SIDE}).model, seed=0)
    with pytest.raises(ValueError, match="pairs"):
        consistency_judge(netG, seed=0, latent_scale=0.7, pairs=8, epochs=1)


def test_a_pair_models_sample_is_filtered_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: a loaded pair model; the judge's training shortened (the function is what is tested, not its size)
    import common.pair_filter as pair_filter

    monkeypatch.setattr(pair_filter, "FILTER_PAIRS", (64, 64))
    monkeypatch.setattr(pair_filter, "FILTER_EPOCHS", 1)
    netG = _pair_generator()
    loaded = LoadedGenerator(generator=netG, cfg=netG.cfg, class_names=("head",),
                             provenance=Provenance(model_sha256="0" * 64, checkpoint="c", round=1, run_id=None,
                                                   model_config={}, class_names=("head",), sites={}))
    heard: list[str] = []
    labels = np.zeros(10, np.int64)
    # act
    filtered = loaded.sample(labels, seed=1, candidates=3, say=heard.append)
    unfiltered = loaded.sample(labels, seed=1, candidates=1, say=heard.append)
    # assert: three draws per kept pair, said once; the filtered pairs differ from the plain draw, which stays as it was
    assert loaded.candidates_drawn(3) == 3
    assert len(heard) == 1 and "best of 3" in heard[0]
    assert filtered.shape == unfiltered.shape == (10, 2, SIDE, SIDE)
    with torch.no_grad():
        plain = draw_images(netG, None, torch.from_numpy(labels), torch.Generator().manual_seed(1)).numpy()
    assert np.array_equal(unfiltered, plain)
    assert not np.array_equal(filtered, unfiltered)


def test_the_judge_trains_on_twice_the_request_within_bounds() -> None:
    assert [judge_pairs(n) for n in (1, 128, 300, 500, 10_000)] == [256, 256, 600, 1000, 1000]
