"""Parity with an independent implementation: transformers' SamModel on the same weights.

Both models get every tensor perturbed (tests/reference.py) and meet through samkit's key
table with strict key matching. fp32 tolerance: max |diff| <= 1e-4 x max |reference|.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from samkit.config import VARIANTS, SamConfig

from reference import TINY, assert_close_scaled, hf_reference, random_sam


@dataclass
class Pair:
    config: SamConfig
    ours: torch.nn.Module
    theirs: torch.nn.Module
    image: torch.Tensor  # 2 x 3 x S x S, already normalised
    ours_embedding: torch.Tensor
    theirs_embedding: torch.Tensor


def _pair(config: SamConfig, batch: int) -> Pair:
    ours = random_sam(config, seed=1)
    theirs = hf_reference(config, ours.state_dict())
    size = config.image_size
    image = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mine = ours.image_encoder(image)
        ref = theirs.vision_encoder(image).last_hidden_state
    return Pair(config, ours, theirs, image, mine, ref)


@pytest.fixture(scope="module")
def tiny() -> Pair:
    return _pair(TINY, batch=2)


@pytest.fixture(scope="module")
def vit_b() -> Pair:
    return _pair(VARIANTS["vit_b"], batch=1)


def _prompts(size: int) -> dict[str, dict]:
    """Prompt sets in the model input frame: (hf kwargs, our decode kwargs) built together."""
    gen = torch.Generator().manual_seed(3)
    s = float(size)
    three = torch.rand(1, 1, 3, 2, generator=gen) * s
    batch_points = torch.rand(1, 4, 2, 2, generator=gen) * s
    batch_labels = torch.tensor([[[1, 0], [1, 1], [0, 1], [1, -1]]])
    box = torch.tensor([[[0.1 * s, 0.2 * s, 0.7 * s, 0.9 * s]]])
    boxes = torch.tensor([[[0.1 * s, 0.2 * s, 0.7 * s, 0.9 * s], [0.0, 0.0, s - 1, s - 1]]])
    two_points = torch.rand(1, 2, 1, 2, generator=gen) * s
    mask = torch.randn(1, 1, 4 * size // 16, 4 * size // 16, generator=gen)
    one_point = torch.tensor([[[[0.3 * s, 0.6 * s]]]])
    fg = torch.ones(1, 1, 1, dtype=torch.long)
    return {
        "one point": dict(input_points=one_point, input_labels=fg),
        "points with negatives": dict(input_points=three, input_labels=torch.tensor([[[1, 0, 0]]])),
        "box": dict(input_boxes=box),
        "points and box": dict(
            input_points=three, input_labels=torch.tensor([[[1, 0, 1]]]), input_boxes=box
        ),
        "mask prompt": dict(input_points=one_point, input_labels=fg, input_masks=mask),
        "batch of point prompts": dict(input_points=batch_points, input_labels=batch_labels),
        "batch of boxes with points": dict(
            input_points=two_points,
            input_labels=torch.ones(1, 2, 1, dtype=torch.long),
            input_boxes=boxes,
        ),
    }


def _decode_both(pair: Pair, hf_kwargs: dict, multimask: bool):
    points = hf_kwargs.get("input_points")
    boxes = hf_kwargs.get("input_boxes")
    masks = hf_kwargs.get("input_masks")
    with torch.no_grad():
        logits, iou = pair.ours.decode(
            pair.ours_embedding[:1],
            point_coords=None if points is None else points[0],
            point_labels=None if points is None else hf_kwargs["input_labels"][0],
            boxes=None if boxes is None else boxes[0],
            mask_input=masks,
            multimask_output=multimask,
        )
        out = pair.theirs(
            image_embeddings=pair.theirs_embedding[:1], multimask_output=multimask, **hf_kwargs
        )
    return (logits, iou), (out.pred_masks[0], out.iou_scores[0])


def test_tiny_image_embeddings(tiny):
    assert tiny.ours_embedding.shape == (2, 32, 10, 10)
    assert_close_scaled(tiny.ours_embedding, tiny.theirs_embedding)


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", list(_prompts(160)))
def test_tiny_masks_and_iou(tiny, prompt, multimask):
    hf_kwargs = _prompts(tiny.config.image_size)[prompt]
    (logits, iou), (ref_logits, ref_iou) = _decode_both(tiny, hf_kwargs, multimask)
    assert logits.shape == ref_logits.shape and logits.shape[1] == (3 if multimask else 1)
    assert_close_scaled(logits, ref_logits)
    assert_close_scaled(iou, ref_iou)


@pytest.mark.slow
def test_vit_b_image_embedding(vit_b):
    assert vit_b.ours_embedding.shape == (1, 256, 64, 64)
    assert_close_scaled(vit_b.ours_embedding, vit_b.theirs_embedding)


@pytest.mark.slow
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", list(_prompts(1024)))
def test_vit_b_masks_and_iou(vit_b, prompt, multimask):
    hf_kwargs = _prompts(1024)[prompt]
    (logits, iou), (ref_logits, ref_iou) = _decode_both(vit_b, hf_kwargs, multimask)
    assert logits.shape[-2:] == (256, 256)
    assert_close_scaled(logits, ref_logits)
    assert_close_scaled(iou, ref_iou)
