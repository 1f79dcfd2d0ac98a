"""The decoder's fast formulations against the plain modules that define the model.

`MaskDecoder.factored` (the two-way transformer's image side factored through the prompt
tokens) and `MaskDecoder.gemm_upscaling` (transposed convs as matmuls) only reassociate fp32
sums. Tolerance: 1e-5 of the output's scale. A reassociated sum of K terms of size ~s differs
by a few ulps of s times sqrt(K) at most in practice (fp32 ulp 1.2e-7, K <= 4096 here: ~1e-6
observed, ~5e-7 typical); 1e-5 leaves margin while any algebra slip (a dropped bias, a wrong
head order, a softmax over the wrong axis) changes the outputs at the 1e-1 level.

The TINY model's decoder is too narrow for the factored form to pay (8 heads x 7 tokens > 16
internal dims) so it mostly falls back to the modules; WIDE has SAM's real decoder width (256,
8 heads, 128 internal dims) on a small image grid, where every factored branch runs.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from samkit.config import MaskDecoderConfig, PromptEncoderConfig
from samkit.fast import Accelerated
from samkit.modeling.transformer import factored_pays, select_tokens

from reference import TINY, assert_close_scaled, random_sam

WIDE = dataclasses.replace(
    TINY,
    image_encoder=dataclasses.replace(TINY.image_encoder, out_chans=256),
    prompt_encoder=PromptEncoderConfig(embed_dim=256, mask_in_chans=8),
    mask_decoder=MaskDecoderConfig(
        transformer_dim=256, num_heads=8, mlp_dim=64, iou_head_hidden_dim=32
    ),
)
REL = 1e-5


@pytest.fixture(scope="module")
def wide():
    model = random_sam(WIDE, seed=5)
    with torch.no_grad():
        emb = model.image_encoder(torch.randn(2, 3, 160, 160, generator=_gen(1)))
    return model, emb


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plain(model, fn):
    """fn() with the decoder running its plain modules."""
    dec = model.mask_decoder
    dec.factored = dec.gemm_upscaling = False
    try:
        return fn()
    finally:
        dec.factored = dec.gemm_upscaling = True


# B prompts of T tokens (5 output tokens + prompt tokens); shared: one image for all prompts
@pytest.mark.parametrize(
    "batch, tokens, shared",
    [(1, 7, True), (1, 7, False), (3, 8, True), (3, 8, False), (2, 15, True), (2, 20, True)],
)
def test_factored_transformer_equals_module(wide, batch, tokens, shared):
    model, _ = wide
    transformer = model.mask_decoder.transformer
    g = _gen(batch * 100 + tokens)
    image = torch.randn(1 if shared else batch, 256, 10, 10, generator=g)
    pe = torch.randn(1, 256, 10, 10, generator=g)
    points = torch.randn(batch, tokens, 256, generator=g)
    attn = transformer.layers[1].cross_attn_token_to_image
    assert factored_pays(attn, tokens) == (tokens < 16)
    with torch.no_grad():
        want = transformer(image, pe, points)
        got = [transformer.forward_factored(image, pe, points)]
        if shared:
            side = transformer.prepare_image(image, pe)
            got.append(transformer.forward_factored(side, pe, points))
    for result in got:
        for g_, w_ in zip(result, want, strict=True):
            assert_close_scaled(g_, w_.expand_as(g_), rel=REL)
    # only some tokens' outputs (the mask decoder's IoU token and multimask or single masks)
    for outputs in [(0, 2, 3, 4), (0, 1), (1,)]:
        with torch.no_grad():
            tokens, keys = transformer.forward_factored(image, pe, points, outputs=outputs)
        assert tokens.shape == (batch, len(outputs), 256)
        assert_close_scaled(tokens, want[0][:, list(outputs)], rel=REL)
        assert_close_scaled(keys, want[1].expand_as(keys), rel=REL)


@pytest.mark.parametrize("ids", [(0,), (0, 1), (0, 2, 3, 4), (1, 3, 4, 6), tuple(range(7))])
def test_select_tokens(ids):
    x = torch.randn(2, 7, 5)
    assert torch.equal(select_tokens(x, ids), x[:, list(ids)])  # a copy: exact


def _prompts(kind: str, g: torch.Generator, n: int = 3):
    coords = torch.rand(n, 2, 2, generator=g) * 160
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [1, -1]])[:n]
    xy = torch.rand(n, 2, 2, generator=g) * 160
    boxes = torch.cat([xy.amin(1), xy.amax(1)], dim=1)
    masks = torch.randn(n, 1, 40, 40, generator=g)
    return {
        "one point": (coords[:1, :1], labels[:1, :1], None, None),
        "points": (coords, labels, None, None),
        "box": (None, None, boxes, None),
        "points and box": (coords, labels, boxes, None),
        "mask": (coords, labels, None, masks),
        "box and mask": (None, None, boxes, masks),
    }[kind]


@pytest.mark.parametrize("config", [WIDE, TINY], ids=["wide", "tiny"])
@pytest.mark.parametrize(
    "kind", ["one point", "points", "box", "points and box", "mask", "box and mask"]
)
@pytest.mark.parametrize("multimask", [True, False, None])  # None: all 4 masks
def test_decode_equals_plain_modules(config, kind, multimask):
    model = random_sam(config, seed=6)
    g = _gen(7)
    with torch.no_grad():
        emb = model.image_encoder(torch.randn(1, 3, 160, 160, generator=g))
        prompts = _prompts(kind, g)
        want = _plain(model, lambda: model.decode(emb, *prompts, multimask))
        got = model.decode(emb, *prompts, multimask)
        side = model.prepare_decode(emb)
        cached = model.decode(emb, *prompts, multimask, image_side=side)
        # one embedding per prompt instead of a shared one
        per_prompt = emb.expand(want[0].shape[0], -1, -1, -1).contiguous()
        copies = model.decode(per_prompt, *prompts, multimask)
    for result in (got, cached, copies):
        for g_, w_ in zip(result, want, strict=True):
            assert_close_scaled(g_, w_, rel=REL)


def test_decode_masks_of_selected_prompts(wide):
    """Masks of a subset of prompts (segment everything upscales only prompts it keeps) equal
    the same rows of the full decode."""
    model, emb = wide
    coords, labels, _, _ = _prompts("points", _gen(8), n=4)
    with torch.no_grad():
        low_res, iou = model.decode(emb[:1], coords, labels)
        for image in (emb[:1], emb[:1].expand(4, -1, -1, -1).contiguous()):
            tokens = model.decode_tokens(image, coords, labels)
            keep = torch.tensor([2, 0])
            masks = model.mask_decoder.decode_masks(tokens, keep)
            assert_close_scaled(tokens.iou_pred, iou, rel=REL)
            assert_close_scaled(masks, low_res[keep], rel=REL)


def test_gemm_upscaling_equals_transposed_convs(wide):
    model, emb = wide
    dec = model.mask_decoder
    coords, labels, _, _ = _prompts("points", _gen(9))
    with torch.no_grad():
        tokens = model.decode_tokens(emb[:1], coords, labels, multimask_output=None)
        got = dec.decode_masks(tokens)
        dec.gemm_upscaling = False
        try:
            want = dec.decode_masks(tokens)
        finally:
            dec.gemm_upscaling = True
    assert got.shape == (3, 4, 40, 40)
    assert_close_scaled(got, want, rel=REL)


def test_prepare_decode_needs_one_image(wide):
    model, emb = wide
    with pytest.raises(ValueError, match="one image embedding"):
        model.prepare_decode(emb)


def test_predictor_caches_the_image_side_per_image(wide):
    """The predictor prepares the image side on the first prompt and reuses it; a new image
    or embedding replaces it. Results equal the plain modules on each image."""
    from samkit.embedding import ImageEmbedding
    from samkit.predictor import SamPredictor

    model, emb = wide
    predictor = SamPredictor(model)
    coords, labels, box, _ = _prompts("points and box", _gen(10), n=1)
    for i in range(2):  # two images one after the other
        predictor.set_embedding(ImageEmbedding(emb[i : i + 1], (160, 160), (160, 160), None))
        with torch.no_grad():
            want = _plain(model, lambda i=i: model.decode(emb[i : i + 1], coords, labels, box))
        for _ in range(2):
            _, iou, low_res = predictor.predict_torch(coords, labels, box, return_logits=True)
            assert_close_scaled(low_res, want[0], rel=REL)
            assert_close_scaled(iou, want[1], rel=REL)
        cached_for, side = predictor._image_side
        assert cached_for is predictor.features
        predictor.predict_torch(coords, labels, box)
        assert predictor._image_side[1] is side  # reused, not recomputed
    predictor.reset_image()
    assert predictor._image_side is None


def test_generator_upscales_only_kept_prompts_with_the_same_records():
    """With pred_iou_thresh > 0 only prompts with a mask passing it are upscaled; the records
    equal those of decoding every prompt in full (the pre-split path)."""
    from types import SimpleNamespace

    from samkit import SamAutomaticMaskGenerator

    from images import photo

    model = random_sam(TINY, seed=11)
    image = photo(96, 128, seed=3)
    options = dict(points_per_side=6, points_per_batch=8, stability_score_thresh=0.0)
    probe = SamAutomaticMaskGenerator(model, pred_iou_thresh=0.0, box_nms_thresh=1.0, **options)
    ious = torch.tensor([r.predicted_iou for r in probe.generate_records(image)])
    thresh = float(ious.quantile(0.85))  # some prompts pass, most do not

    split = SamAutomaticMaskGenerator(model, pred_iou_thresh=thresh, **options)
    full = SamAutomaticMaskGenerator(model, pred_iou_thresh=thresh, **options)
    calls = []

    def full_decode(*args):
        low_res, iou = full.predictor._decode(*args)
        return SimpleNamespace(low_res=low_res, iou_pred=iou)

    def masks(tokens, prompts):
        calls.append(len(prompts))
        return tokens.low_res[prompts]

    full.predictor._decode_tokens, full.predictor._decode_masks = full_decode, masks
    got, want = split.generate_records(image), full.generate_records(image)
    assert 0 < sum(calls) < 36  # some prompts, not all, had a passing mask
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert (g.mask() == w.mask()).all()
        assert (g.bbox, g.point_coords, g.crop_box) == (w.bbox, w.point_coords, w.crop_box)
        assert abs(g.predicted_iou - w.predicted_iou) <= 1e-6
        assert abs(g.stability_score - w.stability_score) <= 1e-6


@pytest.mark.parametrize(
    "shape, input_size, original_size",
    [
        ((3, 1, 40, 40), (107, 160), (1000, 1500)),
        ((1, 3, 40, 40), (160, 120), (1500, 1125)),
        ((2, 3, 40, 40), (160, 160), (77, 77)),
        ((1, 3, 40, 40), (1, 160), (2, 240)),
    ],
)
def test_postprocess_upsamples_only_the_kept_crop(shape, input_size, original_size):
    """The definition: bilinear to the padded input side, crop, bilinear to the original size.
    fp32 on the CPU runs the composed banded maps (tests/test_resample.py); other dtypes and
    devices compute only the cropped pixels, one mask at a time: the same formula per pixel,
    but torch's CPU kernels for C = 3 and C = 1 (and for 1 or 2 threads) round the weights
    differently, by about an ulp. Either way 1e-6 of the scale (observed <= 2.2e-7)."""
    model = random_sam(TINY)
    masks = torch.randn(*shape, generator=_gen(12))
    size = TINY.image_size
    full = torch.nn.functional.interpolate(masks, (size, size), mode="bilinear")
    crop = full[..., : input_size[0], : input_size[1]]
    want = torch.nn.functional.interpolate(crop, original_size, mode="bilinear")
    got = model.postprocess_masks(masks, input_size, original_size)
    assert_close_scaled(got, want, rel=1e-6)
    # the crop alone changes nothing: one mask per image, as the kernel path runs it (fp64 on
    # the CPU takes that path)
    masks = masks.double()
    got = model.postprocess_masks(masks, input_size, original_size)
    single = masks.flatten(0, 1)[:, None]
    full = torch.nn.functional.interpolate(single, (size, size), mode="bilinear")
    crop = full[..., : input_size[0], : input_size[1]]
    want = torch.nn.functional.interpolate(crop, original_size, mode="bilinear")
    torch.testing.assert_close(got.flatten(0, 1)[:, None], want, rtol=0, atol=0)


def test_bf16_decoder_copy_tracks_fp32(wide):
    """The CPU plan's bf16 decoder copy (samkit.fast): logits within a bf16 tolerance of fp32
    and the thresholded masks nearly identical (issue 5's bar for bf16 paths: IoU >= 0.98)."""
    from samkit.embedding import ImageEmbedding
    from samkit.fast import SpeedPlan
    from samkit.predictor import SamPredictor

    model, emb = wide
    reference = SamPredictor(model)
    fast = SamPredictor(random_sam(WIDE, seed=5))
    fast.accelerated = Accelerated(fast.model, SpeedPlan(decoder_dtype=torch.bfloat16))
    assert fast.model.mask_decoder.iou_token.weight.dtype == torch.float32  # a copy is bf16
    embedding = ImageEmbedding(emb[:1], (300, 300), (160, 160), None)
    ious = []
    for predictor in (reference, fast):
        predictor.set_embedding(embedding)
    g = _gen(13)
    for kind in ("one point", "points", "box", "points and box", "mask"):
        prompts = _prompts(kind, g)
        want = reference.predict_torch(*prompts, return_logits=True)
        got = fast.predict_torch(*prompts, return_logits=True)
        assert got[0].dtype == got[1].dtype == torch.float32
        # bf16 keeps 8 mantissa bits (4e-3 relative) per op; two transformer layers, the
        # upscaling and the hypernetworks compound to ~1-2e-2 of the logits' scale
        assert_close_scaled(got[2], want[2], rel=5e-2)
        assert_close_scaled(got[1], want[1], rel=5e-2)
        for a, b in zip(got[0].flatten(0, 1) > 0, want[0].flatten(0, 1) > 0, strict=True):
            union = (a | b).sum()
            ious.append(float((a & b).sum() / union) if union else 1.0)
    print(f"bf16 decoder mask IoU: mean {sum(ious) / len(ious):.4f}, min {min(ious):.4f}")
    assert sum(ious) / len(ious) >= 0.98, ious


def test_cpu_prompt_chunks_equal_one_pass(wide):
    """On the CPU the decoder runs a prepared image's prompts a few at a time (9 = 4 + 4 + 1
    here); the result equals the plain modules on all prompts at once."""
    model, emb = wide
    g = _gen(14)
    coords = torch.rand(9, 1, 2, generator=g) * 160
    labels = torch.ones(9, 1, dtype=torch.int)
    assert model.mask_decoder.cpu_prompt_chunk < 9
    with torch.no_grad():
        want = _plain(model, lambda: model.decode(emb[:1], coords, labels))
        got = model.decode(emb[:1], coords, labels, image_side=model.prepare_decode(emb[:1]))
    for g_, w_ in zip(got, want, strict=True):
        assert_close_scaled(g_, w_, rel=REL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layer_norm_pe_kernel_equals_layer_norm_then_add():
    from samkit.kernels import layer_norm_pe as kernel

    g = _gen(7)
    norm = torch.nn.LayerNorm(256).cuda()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256, generator=g))
        norm.bias.copy_(torch.randn(256, generator=g))
    for batch, n in ((3, 4096), (1, 37)):  # 37 rows: a ragged last program
        x = (torch.randn(batch, n, 256, generator=g) * 4 + 2).cuda()
        pe = torch.randn(1, n, 256, generator=g).cuda()
        with torch.inference_mode():
            assert kernel.supported(x)
            got = kernel.layer_norm_pe(x, norm, pe)
            want = kernel.reference(x, norm, pe)
        for g_, w_ in zip(got, want, strict=True):
            assert_close_scaled(g_, w_, rel=1e-5)  # fp32, reductions in another order


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 64])
def test_factored_transformer_on_cuda_equals_module(wide, batch):
    """The CUDA-only pieces (matmul attention, split-K products, the LayerNorm kernel)."""
    model, _ = wide
    transformer = model.mask_decoder.transformer
    g = _gen(batch)
    image = torch.randn(1, 256, 64, 64, generator=g)
    pe = torch.randn(1, 256, 64, 64, generator=g)
    points = torch.randn(batch, 7, 256, generator=g)
    with torch.inference_mode():
        want = transformer(image, pe, points)
        cuda = transformer.cuda()
        try:
            side = cuda.prepare_image(image.cuda(), pe.cuda())
            got = cuda.forward_factored(side, pe.cuda(), points.cuda())
        finally:
            transformer.cpu()
    for g_, w_ in zip(got, want, strict=True):
        assert_close_scaled(g_.cpu(), w_.expand_as(g_), rel=REL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_masks_of_no_prompts(wide, dtype):
    """Segment everything may keep no prompt of a batch: masks of none are (0, K, 4h, 4w)."""
    model, emb = wide
    decoder = copy.deepcopy(model.mask_decoder).to(dtype)
    with torch.no_grad():
        points = torch.rand(2, 1, 2) * WIDE.image_size, torch.ones(2, 1, dtype=torch.int)
        tokens = model.decode_tokens(emb[:1], *points, mask_decoder=decoder)
        masks = decoder.decode_masks(tokens, torch.zeros(0, dtype=torch.long))
    h, w = emb.shape[-2:]
    assert masks.shape == (0, 3, 4 * h, 4 * w)


def _decoder_inputs(batch: int, grid: tuple[int, int], seed: int):
    g = _gen(seed)
    image = torch.randn(1, 256, *grid, generator=g)
    pe = torch.randn(1, 256, *grid, generator=g)
    dense = torch.randn(1, 256, 1, 1, generator=g).expand(1, 256, *grid)
    sparse = torch.randn(batch, 2, 256, generator=g)
    return image, pe, dense, sparse


def _plain_conv_masks(dec, *args, **kwargs):
    """decode_tokens + decode_masks with the folded upscaling switched off: the plain first
    conv on the transformer's final image tokens."""
    dec.fold_upscaling = False
    try:
        tokens = dec.decode_tokens(*args, **kwargs)
        assert tokens.folded is None and tokens.image_tokens is not None
        return dec.decode_masks(tokens)
    finally:
        dec.fold_upscaling = True


@pytest.mark.parametrize("grid", [(10, 10), (7, 9)])
@pytest.mark.parametrize("batch, chunk", [(1, 4), (3, 2)])
@pytest.mark.parametrize("multimask", [True, None])
def test_folded_upscaling_equals_the_plain_conv(wide, grid, batch, chunk, multimask):
    """`MaskDecoder.fold_upscaling`: the first upscaling conv from the transformer's factors
    (random LayerNorm weights and biases, odd grids, prompts in chunks, a subset of prompts)
    against the conv on the final image tokens. fp32: the same sums reassociated and the
    LayerNorm means subtracted after the product (REL of the scale; ~5e-7 observed)."""
    model, _ = wide
    dec = copy.deepcopy(model.mask_decoder)
    dec.cpu_prompt_chunk = chunk
    image, pe, dense, sparse = _decoder_inputs(batch, grid, seed=15)
    with torch.no_grad():
        side = dec.prepare_image(image, pe, dense)
        assert side.upscale.shape == (1, grid[0] * grid[1], 256)
        tokens = dec.decode_tokens(image, pe, sparse, dense, multimask, image_side=side)
        assert tokens.folded is not None
        assert tokens.image_tokens is None  # the factors stand for them: not gathered
        got = dec.decode_masks(tokens)
        want = _plain_conv_masks(dec, image, pe, sparse, dense, multimask, image_side=side)
        keep = torch.tensor([batch - 1, 0])
        subset = dec.decode_masks(tokens, keep)
    assert_close_scaled(got, want, rel=REL)
    assert_close_scaled(subset, want[keep], rel=REL)


def test_folded_upscaling_bf16_tracks_fp32(wide):
    """The bf16 decoder copy folded: X H, the factors and the LayerNorm statistics are
    rounded to bf16 (~1.5e-2 of the scale observed, as the plain bf16 conv); the bar for bf16
    paths is masks at IoU >= 0.98 with fp32's."""
    model, _ = wide
    dec = model.mask_decoder
    low = copy.deepcopy(dec).to(torch.bfloat16)
    image, pe, dense, sparse = _decoder_inputs(3, (10, 10), seed=16)
    with torch.no_grad():
        want = dec.decode_masks(dec.decode_tokens(image, pe, sparse, dense, None))
        args = (x.bfloat16() for x in (image, pe, dense))
        image16, pe16, dense16 = args
        side = low.prepare_image(image16, pe16, dense16)
        tokens = low.decode_tokens(image16, pe16, sparse.bfloat16(), dense16, None, image_side=side)
        assert tokens.folded is not None
        got = low.decode_masks(tokens).float()
        plain = _plain_conv_masks(
            low, image16, pe16, sparse.bfloat16(), dense16, None, image_side=side
        ).float()
    assert_close_scaled(got, want, rel=5e-2)
    ious = []
    for a, b in zip(got.flatten(0, 1) > 0, want.flatten(0, 1) > 0, strict=True):
        union = (a | b).sum()
        ious.append(float((a & b).sum() / union) if union else 1.0)
    assert min(ious) >= 0.98, ious
    # no worse than twice the plain bf16 conv's distance to fp32
    assert (got - want).abs().max() <= 2 * (plain - want).abs().max()


def test_folded_upscaling_only_where_it_applies(wide):
    """Not under autograd (the LayerNorm statistics carry no gradient), not when switched off,
    and the cached folded weights follow in-place weight changes."""
    model, _ = wide
    dec = copy.deepcopy(model.mask_decoder)
    image, pe, dense, sparse = _decoder_inputs(1, (10, 10), seed=17)
    side = dec.prepare_image(image, pe, dense)
    tokens = dec.decode_tokens(image, pe, sparse, dense, True, image_side=side)
    assert tokens.folded is None  # grad enabled
    with torch.no_grad():
        assert dec.decode_tokens(image, pe, sparse, dense, True, image_side=side).folded
        dec.fold_upscaling = False
        assert dec.decode_tokens(image, pe, sparse, dense, True, image_side=side).folded is None
        dec.fold_upscaling = True
        dec.decode_masks(dec.decode_tokens(image, pe, sparse, dense, True, image_side=side))
        for layer in dec.transformer.layers:
            layer.norm4.weight.mul_(1.5)  # the cache must notice
        dec.output_upscaling[0].bias.add_(0.3)
        side = dec.prepare_image(image, pe, dense)
        tokens = dec.decode_tokens(image, pe, sparse, dense, True, image_side=side)
        got = dec.decode_masks(tokens)
        want = _plain_conv_masks(dec, image, pe, sparse, dense, True, image_side=side)
    assert_close_scaled(got, want, rel=REL)


@pytest.mark.parametrize("ids", [range(1, 4), range(0, 4), range(0, 1)])
def test_batched_hypernetworks_equal_the_mlps(wide, ids):
    """On the CPU the kept masks' hypernetwork MLPs run as batched products over stacked
    weights (the same dot products: REL); the stack is cached, follows in-place weight
    changes, and under autograd is rebuilt so gradients reach every MLP."""
    model, _ = wide
    dec = copy.deepcopy(model.mask_decoder)
    x = torch.randn(3, len(ids), 256, generator=_gen(18))

    def want() -> torch.Tensor:
        mlps = dec.output_hypernetworks_mlps
        return torch.stack([mlps[m](x[:, i]) for i, m in enumerate(ids)], dim=1)

    with torch.no_grad():
        assert_close_scaled(dec._hypernetworks(x, ids), want(), rel=REL)
        dec.output_hypernetworks_mlps[ids[-1]].layers[1].weight.mul_(-2.0)
        assert_close_scaled(dec._hypernetworks(x, ids), want(), rel=REL)
    dec._hypernetworks(x, ids).square().sum().backward()
    for m in ids:
        assert dec.output_hypernetworks_mlps[m].layers[0].weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch, shared, n", [(1, True, 4096), (64, True, 4096), (5, False, 999)])
@pytest.mark.parametrize("tokens", [7, 5])
def test_image_to_token_kernel_equals_float64(batch, shared, n, tokens):
    """The fused image->token + LayerNorm + PE kernel against the same maths in float64.

    Tolerance 2e-5 of the output scale: tf32x3 products carry ~1e-6 relative error per
    product (two TF32 parts per operand, the low x low term dropped), summed over 256 channels;
    a softmax over the wrong axis, a head mix-up or a padded token let through is a 1e-1
    error. 999 rows: a ragged last program; 5 tokens: 3 padded per head.
    """
    from samkit.kernels import decoder_attention as kernel

    g = _gen(batch + tokens)
    c, heads = 256, 8
    f64 = {"generator": g, "dtype": torch.float64}
    image = torch.randn(1 if shared else batch, n, c, **f64)
    residual = torch.randn(1 if shared else batch, n, c, **f64)
    kx = torch.randn(batch, heads, tokens, c, **f64) * 0.1
    bias = torch.randn(batch, heads, tokens, **f64)
    vo = torch.randn(batch, heads, tokens, c, **f64)
    pe = torch.randn(1, n, c, **f64)
    norm = torch.nn.LayerNorm(c, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g))
        norm.bias.copy_(torch.randn(c, generator=g))
        scores = torch.einsum("bnc,bhtc->bhtn", image.expand(batch, -1, -1), kx)
        probs = (scores + bias[..., None]).softmax(2)  # over each head's tokens
        y = norm(residual + torch.einsum("bhtn,bhtc->bnc", probs, vo))
    cuda = [t.float().cuda() for t in (image, kx, bias, vo, residual)]
    with torch.inference_mode():
        assert kernel.supported(cuda[0], tokens)
        got = kernel.image_to_token_norm(*cuda, norm.float().cuda(), pe.float().cuda())
    for g_, w_ in zip(got, (y, y + pe), strict=True):
        assert_close_scaled(g_.cpu().double(), w_, rel=2e-5)
