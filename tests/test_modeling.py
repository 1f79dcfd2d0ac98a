"""The model on its own: sizes, attention paths, windows, prompts, gradients, dtypes."""

from __future__ import annotations

import pytest
import torch

from samkit.build import expected_state_dict
from samkit.config import VARIANTS
from samkit.modeling import Sam
from samkit.modeling.attention import attention
from samkit.modeling.image_encoder import Block, window_partition, window_unpartition

from reference import TINY, assert_close_scaled, perturb_, random_sam

# parameter and tensor counts of the official checkpoints (shared/sam-reference.md section 1)
OFFICIAL_SIZES = {
    "vit_b": (93_735_472, 314),
    "vit_l": (312_342_832, 482),
    "vit_h": (641_090_608, 594),
}


@pytest.mark.parametrize("name", list(OFFICIAL_SIZES))
def test_parameter_and_tensor_counts_equal_official(name):
    params, tensors = OFFICIAL_SIZES[name]
    with torch.device("meta"):  # vit_h is never allocated
        model = Sam(VARIANTS[name])
    assert sum(p.numel() for p in model.parameters()) == params
    state = expected_state_dict(VARIANTS[name])
    assert len(state) == tensors
    assert "image_encoder.pos_embed" in state
    assert "pixel_mean" not in state  # normalisation lives in the config, not the weights


def _qkv(batch, heads, size, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = size[0] * size[1]
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen) for _ in range(3))
    rel_h = 0.5 * torch.randn(2 * size[0] - 1, dim, generator=gen)
    rel_w = 0.5 * torch.randn(2 * size[1] - 1, dim, generator=gen)
    return q, k, v, (rel_h, rel_w)


def _naive_attention(q, k, v, rel_pos, size):
    """Loop-level definition: logit = q.k/sqrt(d) + q.Rh[qh-kh] + q.Rw[qw-kw]."""
    h, w = size
    rel_h, rel_w = rel_pos
    n, d = q.shape[-2:]
    rows = torch.arange(n) // w
    cols = torch.arange(n) % w
    table_h = rel_h[rows[:, None] - rows[None, :] + h - 1]  # N x N x d
    table_w = rel_w[cols[:, None] - cols[None, :] + w - 1]
    logits = q.double() @ k.double().transpose(-1, -2) / d**0.5
    logits = logits + torch.einsum("bhnd,nmd->bhnm", q.double(), (table_h + table_w).double())
    return (logits.softmax(-1) @ v.double()).float()


@pytest.mark.parametrize("size", [(4, 4), (5, 3), (14, 14)])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "fused", "flex"])
def test_attention_paths_equal_the_definition(size, backend):
    q, k, v, rel = _qkv(2, 3, size, 16)
    expected = _naive_attention(q, k, v, rel, size)
    out = attention(q, k, v, rel_pos=rel, size=size, backend=backend)
    # fp32 against a float64 definition: rounding only
    assert_close_scaled(out, expected, rel=1e-5)


def test_attention_without_rel_pos_matches_softmax():
    q, k, v, _ = _qkv(1, 2, (3, 5), 8)
    expected = ((q @ k.transpose(-1, -2)) / 8**0.5).softmax(-1) @ v
    for backend in ("reference", "sdpa", "fused"):
        assert_close_scaled(attention(q, k, v, backend=backend), expected, rel=1e-5)


def test_attention_rejects_wrong_table_size():
    q, k, v, rel = _qkv(1, 1, (4, 4), 8)
    with pytest.raises(ValueError, match="do not fit"):
        attention(q, k, v, rel_pos=rel, size=(5, 5))


def test_rel_pos_table_layout_from_a_qkv_view():
    """pixel_table (here its CPU path) against the definition: column r < rows holds q . Rh[r],
    column rows + r holds q . Rw[r], the columns between are zero; heads first."""
    from samkit.kernels.relpos_table import pixel_table

    gen = torch.Generator().manual_seed(7)
    batch, n, heads, d, rows = 2, 9, 3, 8, 8
    qkv = torch.randn(batch, n, 3 * heads * d, generator=gen, dtype=torch.float64)
    q = qkv[..., : heads * d].unflatten(-1, (heads, d))  # B x N x heads x d, rows 3C apart
    rel_h = torch.randn(7, d, generator=gen, dtype=torch.float64)
    rel_w = torch.randn(5, d, generator=gen, dtype=torch.float64)
    got = pixel_table(q, rel_h, rel_w, rows)
    expected = torch.zeros(batch, heads, n, 2 * rows, dtype=torch.float64)
    for b in range(batch):
        for head in range(heads):
            for i in range(n):
                for r in range(rel_h.shape[0]):
                    expected[b, head, i, r] = q[b, i, head] @ rel_h[r]
                for r in range(rel_w.shape[0]):
                    expected[b, head, i, rows + r] = q[b, i, head] @ rel_w[r]
    assert got.is_contiguous()
    assert_close_scaled(got, expected, rel=1e-12)  # float64 sums of 8 products


def test_whole_model_backends_agree():
    model = random_sam(TINY)
    image = torch.randn(2, 3, 160, 160)
    outputs = {}
    for backend in ("reference", "sdpa", "fused"):
        model.set_attention_backend(backend)
        with torch.no_grad():
            emb = model.image_encoder(image)
            outputs[backend] = (
                emb,
                *model.decode(emb[:1], torch.tensor([[[50.0, 60.0]]]), torch.tensor([[1]])),
            )
    for backend in ("sdpa", "fused"):
        for got, want in zip(outputs[backend], outputs["reference"], strict=True):
            assert_close_scaled(got, want, rel=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.set_attention_backend("flash9")


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 10, 7, 5)
    windows, padded = window_partition(x, 4)
    assert padded == (12, 8)
    assert windows.shape == (2 * 3 * 2, 4, 4, 5)
    # window 0 of image 0 is the top-left 4x4 block; padding is zero
    torch.testing.assert_close(windows[0], x[0, :4, :4])
    assert windows[1, :, 3:].abs().sum() == 0  # second window in row 0 covers columns 4..7
    back = window_unpartition(windows, 4, padded, (10, 7))
    torch.testing.assert_close(back, x, rtol=0, atol=0)


def test_official_window_geometry_pads_64_to_70():
    windows, padded = window_partition(torch.zeros(1, 64, 64, 2), 14)
    assert padded == (70, 70) and windows.shape[0] == 25


def test_prompt_token_counts():
    model = random_sam(TINY)
    pe = model.prompt_encoder
    one_point = (torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.long))
    three_points = (torch.zeros(1, 3, 2), torch.ones(1, 3, dtype=torch.long))
    box = torch.tensor([[1.0, 2.0, 30.0, 40.0]])
    assert pe(one_point, None, None)[0].shape[1] == 2  # + the padding point
    assert pe(None, box, None)[0].shape[1] == 2
    assert pe(three_points, box, None)[0].shape[1] == 5
    sparse, dense = pe(one_point, None, None)
    assert dense.shape == (1, 32, 10, 10)
    # the decoder sees 1 IoU + 4 mask tokens + 2 prompt tokens = 7 tokens for one point
    assert model.mask_decoder.num_mask_tokens + 1 + sparse.shape[1] == 7


def test_padding_point_gets_not_a_point_embedding():
    pe = random_sam(TINY).prompt_encoder
    coords = torch.tensor([[[10.0, 10.0], [99.0, 5.0]]])
    sparse, _ = pe((coords, torch.tensor([[1, -1]])), None, None)
    torch.testing.assert_close(sparse[0, 1], pe.not_a_point_embed.weight[0])
    torch.testing.assert_close(sparse[0, 2], pe.not_a_point_embed.weight[0])


def test_model_is_differentiable():
    model = random_sam(TINY).train()
    emb = model.image_encoder(torch.randn(1, 3, 160, 160))
    coords = torch.tensor([[[40.0, 50.0], [90.0, 20.0]]])
    labels = torch.tensor([[1, 0]])
    box = torch.tensor([[10.0, 10.0, 120.0, 100.0]])
    mask = torch.randn(1, 1, 40, 40)
    multi, iou_multi = model.decode(emb, coords, labels, box, mask, multimask_output=True)
    single, iou_single = model.decode(emb, coords, labels, multimask_output=False)
    (multi.mean() + single.mean() + iou_multi.mean() + iou_single.mean()).backward()
    # every parameter of the model is reached by a gradient: nothing runs under no_grad
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_grad


def test_batched_encoder_equals_one_by_one():
    model = random_sam(TINY)
    images = torch.randn(3, 3, 160, 160)
    with torch.no_grad():
        batched = model.image_encoder(images)
        single = torch.cat([model.image_encoder(images[i : i + 1]) for i in range(3)])
    assert_close_scaled(batched, single, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_tracks_fp32(dtype):
    model = random_sam(TINY)
    image = torch.randn(1, 3, 160, 160)
    point = (torch.tensor([[[40.0, 50.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        ref_emb = model.image_encoder(image)
        ref_logits, _ = model.decode(ref_emb, *point)
        low = random_sam(TINY).to(dtype)
        emb = low.image_encoder(image.to(dtype))
        logits, iou = low.decode(emb, point[0].to(dtype), point[1])
    assert emb.dtype == dtype and logits.dtype == dtype
    assert torch.isfinite(logits.float()).all() and torch.isfinite(iou.float()).all()
    # 8-bit (bf16) / 11-bit (fp16) mantissas through ~10 layers: direction preserved
    cos = torch.nn.functional.cosine_similarity(emb.float().flatten(), ref_emb.flatten(), dim=0)
    assert cos > 0.99
    cos = torch.nn.functional.cosine_similarity(
        logits.float().flatten(), ref_logits.flatten(), dim=0
    )
    assert cos > 0.98


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "padding", "bias"),
    [(7, 5, 1, 1, 0, False), (6, 4, 3, 1, 1, False), (1, 4, 2, 2, 0, True), (3, 8, 3, 2, 1, True)],
)
def test_conv2d_as_matmul_equals_the_convolution(cin, cout, kernel, stride, padding, bias):
    """The GEMM form that the fp32 CUDA path of samkit's Conv2d takes (run here on the CPU)."""
    from samkit.modeling.common import Conv2d, conv2d_as_matmul

    torch.manual_seed(0)
    conv = Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias).double()
    x = torch.randn(2, cin, 9, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(conv2d_as_matmul(conv, x), conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_cuda_path_is_fp32_with_pytorch_tf32_defaults():
    """With PyTorch's defaults (cuDNN may use TF32, matmuls may not), the image embedding and a
    mask prompt's dense embedding on CUDA stay within 2e-5 of the CPU's fp32 result: fp32
    reassociation gives ~1e-6; one TF32 convolution (10-bit mantissa) gives ~1e-4."""
    model = random_sam(TINY)
    image = torch.randn(2, 3, 160, 160)
    mask = torch.randn(2, 1, 4 * 10, 4 * 10)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    try:
        with torch.no_grad():
            cpu_emb = model.image_encoder(image)
            cpu_dense = model.prompt_encoder(None, None, mask)[1]
            gpu = model.cuda()
            gpu_emb = gpu.image_encoder(image.cuda()).cpu()
            gpu_dense = gpu.prompt_encoder(None, None, mask.cuda())[1].cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    assert_close_scaled(gpu_emb, cpu_emb, rel=2e-5)
    assert_close_scaled(gpu_dense, cpu_dense, rel=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_match_cpu_reference():
    model = random_sam(TINY)
    image = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        model.set_attention_backend("reference")
        expected = model.image_encoder(image)
        gpu = model.cuda()
        for backend in ("sdpa", "fused"):
            gpu.set_attention_backend(backend)
            # TF32 may be on for CUDA matmuls: 1e-3 of the scale
            assert_close_scaled(gpu.image_encoder(image.cuda()).cpu(), expected, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dim", [64, 80])
@pytest.mark.parametrize("size", [(64, 64), (14, 32), (5, 16)])
@pytest.mark.parametrize("qkv_view", [False, True])
def test_cuda_relpos_kernel_matches_reference_path(size, dim, qkv_view):
    from samkit.kernels import relpos_flash

    q, k, v, rel = _qkv(2, 3, size, dim, seed=4)
    q, k, v = (t.cuda().bfloat16() for t in (q, k, v))
    if qkv_view:  # as the encoder passes them: views of one (B, N, 3, heads, d) projection
        q, k, v = torch.stack([q, k, v], dim=1).permute(0, 3, 1, 2, 4).contiguous().unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rel = tuple((0.2 * t).cuda().bfloat16() for t in rel)
    with torch.inference_mode():
        assert relpos_flash.supported(q, size)
        out = attention(q, k, v, rel_pos=rel, size=size, backend="fused")
        # the same bf16 inputs through the float32 reference path
        expected = attention(q, k, v, rel_pos=rel, size=size, backend="reference")
    err = (out.float() - expected.float()).abs().max().item()
    print(f"relpos kernel {size} d={dim}: max abs err {err:.3g}")
    # flash-style rounding: probabilities cast to bf16 before P.V (8-bit mantissa): 1e-2
    assert_close_scaled(out.float(), expected.float(), rel=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("batch", "n", "heads", "dim", "rows"), [(2, 1000, 3, 64, 32), (1, 130, 2, 80, 128)]
)
def test_cuda_table_kernel_matches_matmul(batch, n, heads, dim, rows):
    """The Triton rel-pos table of q read from a qkv-like view, against the fp32 matmul."""
    from samkit.kernels.relpos_table import pixel_table, rel_pos_table

    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(batch, n, 3 * heads * dim, generator=gen).cuda().bfloat16()
    q = qkv[..., : heads * dim].unflatten(-1, (heads, dim))  # B x N x heads x d, rows 3C apart
    rel_h = 0.5 * torch.randn(rows - 1, dim, generator=gen).cuda().bfloat16()
    rel_w = 0.5 * torch.randn(rows - 3, dim, generator=gen).cuda().bfloat16()
    with torch.inference_mode():
        got = pixel_table(q, rel_h, rel_w, rows)
        expected = rel_pos_table(q.float().transpose(1, 2), rel_h.float(), rel_w.float(), rows)
    assert got.shape == (batch, heads, n, 2 * rows) and got.is_contiguous()
    # bf16 products accumulated in fp32, the result rounded to bf16 (8-bit mantissa): 1e-2
    assert_close_scaled(got.float(), expected, rel=1e-2)
    assert torch.count_nonzero(got[..., rows - 1]) == 0  # the zero column between the terms


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("size", "window", "dim", "heads"),
    [
        ((64, 64), 14, 1280, 16),
        ((64, 64), 14, 768, 12),
        ((20, 23), 7, 128, 2),
        ((16, 16), 16, 64, 1),
    ],
)
def test_cuda_window_kernel_matches_partition_path(size, window, dim, heads):
    """The in-kernel windowing (keys of the padding = the qkv biases) against pad + partition."""

    block = Block(
        dim=dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True, use_rel_pos=True,
        window_size=window, grid_size=size[0],
    )  # fmt: skip
    perturb_(block, seed=5)
    block = block.cuda().bfloat16()
    x = torch.randn(2, *size, dim, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        xn = block.norm1(x)
        block.attn.backend = "reference"
        windows, padded = window_partition(xn, window)
        expected = window_unpartition(block.attn(windows), window, padded, size)
        block.attn.backend = "fused"
        assert block.attn.windows_in_kernel(xn, window)
        got = block.attn(xn, window)
    err = (got.float() - expected.float()).abs().max().item()
    print(f"window kernel {size} w={window} dim={dim}: max abs err {err:.3g}")
    # bf16 inputs both ways; the kernel rounds probabilities to bf16 before P.V: 1e-2
    assert_close_scaled(got.float(), expected.float(), rel=1e-2)


def test_shared_image_path_equals_per_prompt_copies():
    """Without a mask prompt the decoder shares the image side across prompts; the result must
    equal giving every prompt its own copy of the image and dense embedding."""
    model = random_sam(TINY)
    with torch.no_grad():
        emb = model.image_encoder(torch.randn(1, 3, 160, 160))
        coords = torch.rand(5, 2, 2) * 160
        labels = torch.tensor([[1, 0], [1, 1], [0, 1], [1, -1], [1, 0]])
        sparse, dense = model.prompt_encoder((coords, labels), None, None)
        assert dense.stride(0) == 0  # the broadcast no-mask embedding
        args = (model.prompt_encoder.get_dense_pe(), sparse)
        shared = model.mask_decoder(emb, *args, dense, multimask_output=True)
        copies = model.mask_decoder(
            emb.expand(5, -1, -1, -1).contiguous(), *args, dense.contiguous(), True
        )
    for got, want in zip(shared, copies, strict=True):
        assert_close_scaled(got, want, rel=1e-5)
