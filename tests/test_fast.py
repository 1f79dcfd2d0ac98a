"""The opt-in fast path against the fp32 reference path (same weights, same image)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from samkit import SamAutomaticMaskGenerator
from samkit.config import VARIANTS
from samkit.fast import (
    COMPILE_DECODER_MIN_BATCH,
    COMPILED_BATCHES,
    CPU_PLAN,
    REFERENCE,
    Accelerated,
    batch_chunks,
    compile_batched,
    fast_plan,
)
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


def test_cuda_plan_compiles_a_bf16_decoder_copy_from_ampere_on(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    plan = fast_plan(cuda)
    assert plan.decoder_dtype == torch.bfloat16 and plan.decoder_compile_mode == "default"
    # no bf16 tensor cores before Ampere: the decoder stays fp32 and eager there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    plan = fast_plan(cuda)
    assert plan.decoder_dtype == torch.float32 and plan.decoder_compile_mode is None


def test_compile_batched_routes_only_large_inference_batches():
    model = random_sam(TINY)
    transformer = model.mask_decoder.transformer
    reference = random_sam(TINY).mask_decoder.transformer  # same seed: same weights
    calls = []

    def spy(fn):  # stands in for torch.compile (minutes on a CPU): counts what it is given
        def run(*args, **kwargs):
            calls.append(args[2].shape[0])
            return fn(*args, **kwargs)

        return run

    compile_batched(transformer, spy)
    c, h, w = TINY.prompt_encoder.embed_dim, 8, 8
    embedding = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))
    pe = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(1))
    side = transformer.prepare_image(embedding, pe)
    small, large = COMPILE_DECODER_MIN_BATCH - 1, COMPILE_DECODER_MIN_BATCH
    for batch in (1, small, large, 2 * large):
        tokens = torch.randn(batch, 7, c, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            got = transformer.forward_factored(side, pe, tokens, outputs=(0, 1))
            want = reference.forward_factored(side, pe, tokens, outputs=(0, 1))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same eager computation
    assert calls == [large, 2 * large]
    # training (autograd) and recorded factors (the CPU's folded upscaling) stay eager
    transformer.forward_factored(side, pe, torch.randn(large, 7, c))
    with torch.inference_mode():  # factors are recorded where the image side is factored:
        record = []  # 8 heads x 1 token < TINY's 16 internal channels
        transformer.forward_factored(side, pe, torch.randn(large, 1, c), record=record)
    assert len(record) == len(transformer.layers)
    assert calls == [large, 2 * large]


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


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_generator_on_cuda_tracks_the_exact_records():
    # every mask kept: 8 x 8 points x 3 masks, decoded 64 at a time (the compiled transformer)
    options = dict(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    image = photo(600, 900, seed=4)
    exact = SamAutomaticMaskGenerator(random_sam(VARIANTS["vit_b"], seed=3).cuda(), **options)
    fast = SamAutomaticMaskGenerator(
        random_sam(VARIANTS["vit_b"], seed=3).cuda(), fast=True, **options
    )
    assert fast.predictor.accelerated._low_decoder is not None  # the bf16 decoder copy runs
    want, got = exact.generate(image), fast.generate(image)
    assert len(got) == len(want) == 192
    by_point: dict[tuple, list[np.ndarray]] = {}
    for record in got:
        by_point.setdefault(tuple(record["point_coords"][0]), []).append(record["segmentation"])
    ious = [
        max(_iou(record["segmentation"], m) for m in by_point[tuple(record["point_coords"][0])])
        for record in want
    ]
    # issue 5's bar for fast paths; measured on an H100: min 0.988, mean 0.995 (vit_b, 16 x 16)
    assert np.mean(ious) >= 0.98, (min(ious), np.mean(ious))


@pytest.mark.parametrize("size, chunks", [(1, [1]), (8, [8]), (11, [8, 2, 1]), (20, [8, 8, 4])])
def test_batch_chunks_examples(size, chunks):
    assert batch_chunks(size) == chunks


def test_batch_chunks_cover_every_size_with_compiled_sizes_only():
    for size in range(1, 50):
        chunks = batch_chunks(size)
        assert sum(chunks) == size
        assert set(chunks) <= set(COMPILED_BATCHES)
        assert chunks == sorted(chunks, reverse=True)
        assert len(chunks) == size // 8 + bin(size % 8).count("1")  # the fewest such chunks


def test_compiled_encoder_sees_only_compiled_batch_sizes():
    model = random_sam(TINY)
    accelerated = Accelerated(model, replace(REFERENCE, dtype=torch.float32))
    # as if compiled (the CPU plan does not compile): record what the encoder is given
    accelerated.plan = replace(accelerated.plan, compile_mode="reduce-overhead")
    seen = []
    encoder = accelerated._encoder

    def recording(batch):
        seen.append(batch.shape[0])
        return encoder(batch)

    accelerated._encoder = recording
    size = TINY.image_encoder.img_size
    images = torch.randn(11, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = accelerated.encode(images)
        want = model.image_encoder(images)
    assert seen == [8, 2, 1]
    # the same images in the same order; fp32 sums may group differently per batch size
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
