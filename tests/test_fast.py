"""The opt-in fast path against the fp32 reference path (same weights, same image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samkit.config import VARIANTS
from samkit.fast import CPU_PLAN, REFERENCE, Accelerated, fast_plan
from samkit.predictor import SamPredictor

from images import photo
from reference import TINY, random_sam


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _compare(config, device, image, points):
    reference = SamPredictor(random_sam(config, seed=3).to(device))
    fast = SamPredictor(random_sam(config, seed=3).to(device), fast=True)
    reference.set_image(image)
    fast.set_image(image)
    cos = torch.nn.functional.cosine_similarity(
        fast.features.flatten().float(), reference.features.flatten().float(), dim=0
    ).item()
    ious = []
    for point in points:
        kwargs = dict(point_coords=np.array([point]), point_labels=np.array([1]))
        want, _, _ = reference.predict(**kwargs)
        got, _, _ = fast.predict(**kwargs)
        ious += [_iou(g, w) for g, w in zip(got, want, strict=True)]
    return cos, ious


def test_plans():
    assert fast_plan(torch.device("cpu")) == CPU_PLAN
    assert REFERENCE.dtype == torch.float32 and REFERENCE.compile_mode is None


def test_fast_predictor_on_cpu_tracks_the_reference():
    image = photo(120, 180, seed=1)
    cos, ious = _compare(TINY, "cpu", image, [(60, 40), (150, 90), (20, 100)])
    # bf16 encoder (8-bit mantissa): issue 5's bar is cosine >= 0.999 for the embedding;
    # masks of a tiny random model sit close to the 0 threshold, so IoU is the looser check
    assert cos >= 0.999
    assert min(ious) >= 0.9, ious


def test_fast_keeps_decoder_in_fp32():
    model = random_sam(TINY)
    Accelerated(model)
    assert model.image_encoder.pos_embed.dtype == CPU_PLAN.dtype
    assert model.mask_decoder.iou_token.weight.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_predictor_on_cuda_meets_issue_5_accuracy():
    image = photo(600, 900, seed=2)
    cos, ious = _compare(VARIANTS["vit_b"], "cuda", image, [(300, 200), (700, 450), (100, 500)])
    assert cos >= 0.999  # bf16 embeddings
    assert np.mean(ious) >= 0.98, ious
