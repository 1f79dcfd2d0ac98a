"""Segment everything: seconds per image for samkit and the official package, same weights.

Random weights (no download needed), a 1000x1500 photo-like image made here, output mode
binary_mask (the official default). Prints the median seconds per image over --runs runs after
a warm-up (CUDA synchronized), the encoder-only time (predictor.set_image), the number of masks
from each generator and whether their records agree.

    python benchmarks/amg_benchmark.py --device cuda --model-type vit_h --official
    python benchmarks/amg_benchmark.py --device cuda --model-type vit_b --worst-case --official
    python benchmarks/amg_benchmark.py --device cpu --model-type vit_b --points-per-side 4 --runs 1

--worst-case sets pred_iou_thresh 0, stability_score_thresh 0 and box_nms_thresh 1.0: every
mask is kept, the worst case for post-processing. --official needs `segment_anything` (and
torchvision) importable; its model is built with `sam_model_registry` and loaded with our
state_dict (the keys are identical).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch

from samkit import SamAutomaticMaskGenerator, build_sam
from samkit.build import resolve_device
from samkit.config import (
    ImageEncoderConfig,
    MaskDecoderConfig,
    PromptEncoderConfig,
    SamConfig,
    variant_config,
)

from implementations import vit_encoder_kwargs  # benchmarks/, beside this script

# --tiny: a few-layer model for smoke tests (any input side works for the generator)
TINY = SamConfig(
    image_encoder=ImageEncoderConfig(
        img_size=160,
        embed_dim=32,
        depth=2,
        num_heads=2,
        out_chans=32,
        window_size=4,
        global_attn_indexes=(1,),
    ),
    prompt_encoder=PromptEncoderConfig(embed_dim=32, mask_in_chans=8),
    mask_decoder=MaskDecoderConfig(
        transformer_dim=32, num_heads=2, mlp_dim=64, iou_head_hidden_dim=32
    ),
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = TINY if args.tiny else variant_config(args.model_type)
    model = build_sam(config, device=device)
    image = photo_like(args.height, args.width)
    options = generator_options(args)
    print(
        f"{'tiny' if args.tiny else args.model_type} on {device}, image {args.height}x"
        f"{args.width}, {options}" + (", samkit fast=True" if args.fast else ""),
        flush=True,
    )

    ours_model = model
    if args.fast:  # fast=True converts the encoder in place: keep `model` fp32 for the official
        ours_model = build_sam(config, device=device)
        ours_model.load_state_dict(model.state_dict())
    ours = SamAutomaticMaskGenerator(ours_model, fast=args.fast, **options)
    encoder_s = median_seconds(lambda: ours.predictor.set_image(image), device, args.runs, 1)
    ours_s, ours_records, ours_peak = measure(ours.generate, image, device, args.runs, 1)
    result: dict[str, Any] = {
        "model": "tiny" if args.tiny else args.model_type,
        "device": str(device),
        "image": [args.height, args.width],
        "options": options,
        "fast": args.fast,
        "encoder_s": encoder_s,
        "samkit_s": ours_s,
        "samkit_masks": len(ours_records),
        "samkit_peak_bytes": ours_peak,
    }
    if args.official:
        official = official_generator(model, config, args, options)
        off_s, off_records, off_peak = measure(
            official.generate, image, device, args.official_runs, 0
        )
        result |= {
            "official_s": off_s,
            "official_masks": len(off_records),
            "official_peak_bytes": off_peak,
            "speedup": off_s / ours_s,
            "agreement": compare_records(ours_records, off_records),
        }
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for smoke tests")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--worst-case", action="store_true", help="keep every mask")
    parser.add_argument("--official", action="store_true", help="also time segment_anything")
    parser.add_argument("--fast", action="store_true", help="samkit with fast=True (samkit.fast)")
    parser.add_argument("--runs", type=int, default=3, help="timed samkit runs (median)")
    parser.add_argument("--official-runs", type=int, default=1, help="timed official runs")
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def generator_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch,
    }
    if args.worst_case:
        options |= {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    return options


def photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 image with smooth shading, overlapping shapes, edges and grain."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack(
        [80 + 60 * np.sin(xs / w * 3 + c) * np.cos(ys / h * 2 - c) for c in (0.0, 1.0, 2.0)], -1
    )
    for _ in range(40):
        colour = rng.uniform(0, 255, 3)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        ax, ay = rng.uniform(0.02, 0.2) * w, rng.uniform(0.02, 0.2) * h
        inside = ((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2 < 1
        shade = 0.8 + 0.2 * np.cos((xs - cx) / ax)[..., None]
        image = np.where(inside[..., None], colour * shade, image)
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.5)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> float:
    times = []
    for i in range(warmup + runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    generate: Callable[[np.ndarray], list[dict]],
    image: np.ndarray,
    device: torch.device,
    runs: int,
    warmup: int,
) -> tuple[float, list[dict], int]:
    """(median seconds, the last run's records, peak memory in bytes: GPU, or CPU max RSS)."""
    records: list[dict] = []

    def run() -> None:
        nonlocal records
        records = []  # let the previous run's masks go first
        records = generate(image)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(run, device, runs, warmup)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return seconds, records, peak


def official_generator(model, config: SamConfig, args, options: dict[str, Any]):
    try:
        import segment_anything
    except ImportError as e:
        sys.exit(f"--official: cannot import segment_anything ({e})")
    if args.tiny:
        official_model = _official_modules(segment_anything.modeling, config)
    else:
        official_model = segment_anything.sam_model_registry[args.model_type]()
    official_model.load_state_dict(model.state_dict(), strict=True)
    official_model.to(model.device).eval()
    return segment_anything.SamAutomaticMaskGenerator(official_model, **options)


def _official_modules(modeling, config: SamConfig):
    """The official Sam for a config the registry does not know (its input side is fixed)."""
    enc, dec = config.image_encoder, config.mask_decoder
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(**vit_encoder_kwargs(enc)),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=config.prompt_encoder.embed_dim,
            image_embedding_size=(config.embedding_size, config.embedding_size),
            input_image_size=(enc.img_size, enc.img_size),
            mask_in_chans=config.prompt_encoder.mask_in_chans,
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=dec.num_multimask_outputs,
            transformer=modeling.TwoWayTransformer(
                depth=dec.transformer_depth,
                embedding_dim=dec.transformer_dim,
                mlp_dim=dec.mlp_dim,
                num_heads=dec.num_heads,
            ),
            transformer_dim=dec.transformer_dim,
            iou_head_depth=dec.iou_head_depth,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
        ),
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    )


def compare_records(ours: list[dict], official: list[dict]) -> dict[str, Any]:
    """Pair each record with the official record of the same point prompt whose mask overlaps
    it most (near-equal predicted IoUs may swap places between implementations), then report
    mask IoU (min, mean), identical masks, same order, and the largest score gaps."""
    if len(ours) != len(official):
        return {"same_count": False, "samkit": len(ours), "official": len(official)}
    if not ours:
        return {"same_count": True, "records": 0}
    by_point: dict[tuple[float, ...], list[int]] = {}
    for j, record in enumerate(official):
        by_point.setdefault(tuple(record["point_coords"][0]), []).append(j)
    ious, pairs = [], []
    for i, record in enumerate(ours):
        candidates = by_point.get(tuple(record["point_coords"][0]), [])
        scored = [
            (_mask_iou(record["segmentation"], official[j]["segmentation"]), j) for j in candidates
        ]
        best_iou, best = max(scored, default=(0.0, -1))
        if best >= 0:
            candidates.remove(best)
        ious.append(best_iou)
        pairs.append((i, best))
    matched = [(ours[i], official[j]) for i, j in pairs if j >= 0]
    return {
        "same_count": True,
        "records": len(ours),
        "paired": len(matched),
        "same_order": sum(i == j for i, j in pairs),
        "mask_iou_min": float(min(ious)),
        "mask_iou_mean": float(np.mean(ious)),
        "identical_masks": sum(
            np.array_equal(a["segmentation"], b["segmentation"]) for a, b in matched
        ),
        "max_predicted_iou_diff": max(
            abs(a["predicted_iou"] - b["predicted_iou"]) for a, b in matched
        ),
        "max_stability_diff": max(
            abs(a["stability_score"] - np.nan_to_num(b["stability_score"])) for a, b in matched
        ),
    }


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("encoder only (set_image)", f"{result['encoder_s']:.3f} s"),
        ("samkit generate", f"{result['samkit_s']:.3f} s/image, {result['samkit_masks']} masks"),
        ("samkit peak memory", f"{result['samkit_peak_bytes'] / 2**30:.2f} GiB"),
    ]
    if "official_s" in result:
        rows += [
            (
                "official generate",
                f"{result['official_s']:.3f} s/image, {result['official_masks']} masks",
            ),
            ("official peak memory", f"{result['official_peak_bytes'] / 2**30:.2f} GiB"),
            ("speed-up", f"{result['speedup']:.1f}x"),
            ("records agree", json.dumps(result["agreement"])),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
