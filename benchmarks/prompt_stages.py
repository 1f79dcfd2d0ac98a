"""Per-stage time of one point prompt on the CPU (vit_b decoder, random weights, 1000x1500).

    PYTHONPATH=src:benchmarks python benchmarks/prompt_stages.py fast|fp32 THREADS [N]

Stages: decode_tokens (prompt encoder, transformer, IoU head), decode_masks (upscaling and
hypernetworks), postprocess (bool masks at the original size) and the whole `predict_torch`.
With 1 thread it reports CPU time (`time.process_time`, robust on a shared machine), else
wall time; median/min of N calls (default 40). A random embedding stands in for `set_image`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from samkit.build import build_sam
from samkit.embedding import ImageEmbedding
from samkit.predictor import SamPredictor

import implementations as impl


def main(argv: list[str]) -> None:
    mode, threads = argv[0], int(argv[1])
    n = int(argv[2]) if len(argv) > 2 else 40
    torch.set_num_threads(threads)
    # as set_image leaves glibc's malloc: a large freed block raises its mmap threshold, so
    # later per-prompt buffers are reused instead of trimmed and page-faulted in each call
    big = torch.ones(30 * 2**20 // 4)
    del big
    model = build_sam(impl.config_for("vit_b"))
    model.load_state_dict(impl.random_state_dict("vit_b"))
    predictor = SamPredictor(model, fast=mode == "fast")
    features = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    predictor.set_embedding(ImageEmbedding(features, (1000, 1500), (683, 1024)))
    coords = torch.tensor([[[512.0, 256.0]]])
    labels = torch.ones(1, 1, dtype=torch.int)
    runner = predictor.accelerated or model
    decoder = model.mask_decoder
    if predictor.accelerated is not None and predictor.accelerated._low_decoder is not None:
        decoder = predictor.accelerated._low_decoder
    clock = time.process_time if threads == 1 else time.perf_counter
    with torch.inference_mode():
        for _ in range(5):
            predictor.predict_torch(coords, labels)
        side = predictor._prepared(features, None)

        def tokens():
            return runner.decode_tokens(features, coords, labels, None, None, True, image_side=side)

        def binary(masks, input_size, original_size):  # also for versions before it existed
            if hasattr(model, "postprocess_binary"):
                return model.postprocess_binary(masks, input_size, original_size)
            return model.postprocess_masks(masks, input_size, original_size) > 0

        decoded = tokens()
        low_res = decoder.decode_masks(decoded).float()
        stages = {
            "decode_tokens": tokens,
            "decode_masks": lambda: decoder.decode_masks(decoded),
            "postprocess": lambda: binary(low_res, (683, 1024), (1000, 1500)),
            "predict_torch": lambda: predictor.predict_torch(coords, labels),
        }
        results = {}
        for name, fn in stages.items():
            times = []
            for _ in range(n):
                start = clock()
                fn()
                times.append(1000 * (clock() - start))
            results[name] = f"{statistics.median(times):.2f}/{min(times):.2f}"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(mode, threads, " ".join(f"{k} {v}" for k, v in results.items()), "load", load)


if __name__ == "__main__":
    main(sys.argv[1:])
