"""Mask decoding alone: one point prompt, and a batch of 64 points, on a fixed embedding.

No image encoder run: each predictor gets the same random (1, 256, 64, 64) embedding of a
1000x1500 image through `set_embedding`, so the prompt path is timed in seconds, not minutes,
and the same script runs on older checkouts (it uses only set_embedding, predict_torch,
predict and the `_decode` hook). Rows: "one prompt (device)" = predict_torch, one point to
masks at 1000x1500; "(numpy)" = predict; "64 prompts" = `_decode` of 64 points to low-res
logits (what segment everything runs per batch).

    python benchmarks/decoder_benchmark.py --device cpu --model-type vit_b
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from samkit.build import build_sam, resolve_device
from samkit.embedding import ImageEmbedding
from samkit.predictor import SamPredictor

import implementations as impl

ORIGINAL, INPUT = (1000, 1500), (683, 1024)


def _median_ms(fn, device, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--runs", type=int, default=20, help="timed runs of one prompt")
    parser.add_argument("--batch-runs", type=int, default=3, help="timed runs of 64 prompts")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    state_dict = impl.random_state_dict(args.model_type)
    features = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    embedding = ImageEmbedding(features.to(device), ORIGINAL, INPUT, None)
    print(f"# {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| predictor | one prompt ms (device) | one prompt ms (numpy) | 64 prompts ms |")
    print("|---|---|---|---|")
    for fast in (False, True):
        model = build_sam(impl.config_for(args.model_type), device=device)
        model.load_state_dict(state_dict)
        print(_row(SamPredictor(model, fast=fast), embedding, device, args), flush=True)


def _row(predictor: SamPredictor, embedding: ImageEmbedding, device, args) -> str:
    predictor.set_embedding(embedding)
    point = np.array([[500.0, 375.0]])
    coords = torch.as_tensor(
        predictor.transform.apply_coords(point, ORIGINAL), dtype=torch.float, device=device
    )[None]
    labels = torch.ones(1, 1, dtype=torch.int, device=device)
    points = np.random.default_rng(0).uniform((0, 0), (INPUT[1], INPUT[0]), (64, 1, 2))
    batch = torch.as_tensor(points, dtype=torch.float, device=device)
    batch_labels = torch.ones(64, 1, dtype=torch.int, device=device)
    features = predictor.features
    with torch.inference_mode():
        one = _median_ms(lambda: predictor.predict_torch(coords, labels), device, args.runs, 3)
        one_np = _median_ms(lambda: predictor.predict(point, np.array([1])), device, args.runs, 3)
        many = _median_ms(
            lambda: predictor._decode(features, batch, batch_labels, None, None, True),
            device,
            args.batch_runs,
            1,
        )
    name = "samkit fast" if predictor.accelerated is not None else "samkit fp32 (default)"
    return f"| {name} | {one:.2f} | {one_np:.2f} | {many:.0f} |"


if __name__ == "__main__":
    main()
