"""Records of many noisy masks: seconds of `make_records` per output mode, on one device.

The segment-everything worst case with random weights keeps ~3,000 masks of ~111,000 runs each
at 1000x1500. This makes such a batch directly (run lengths drawn from a geometric distribution
with mean --mean-run pixels, random first pixels) as an RleBatch on --device, wraps it in a
MaskTable and times `make_records` per output mode: the median of --runs after one cold run,
which is reported too (page faults of fresh host memory, pinned buffers). On CUDA two
alternatives are timed beside it: binary masks copied straight into pageable host memory, and
COCO strings from pycocotools on the host.

    python benchmarks/records_benchmark.py --device cuda --masks 3072
    python benchmarks/records_benchmark.py --device cpu --masks 48

Binary masks take masks*height*width bytes of host memory (4.6 GB for 3072 at 1000x1500).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from samkit.amg.masks import coco_encode_rle
from samkit.amg.records import OUTPUT_MODES, MaskTable, make_records
from samkit.amg.rle_batch import RleBatch
from samkit.build import resolve_device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    table = noisy_table(args.masks, args.height, args.width, args.mean_run, device, args.seed)
    runs = table.rles.starts.shape[0]
    crop, points = [[0, 0, args.width, args.height]], [np.zeros((len(table), 2))]
    cases: dict[str, Callable[[], Any]] = {
        mode: lambda mode=mode: make_records(table, crop, points, mode)
        for mode in args.modes.split(",")
    }
    if device.type == "cuda":
        cases["binary_mask, pageable copy"] = lambda: pageable_masks(table.rles)
        cases["coco_rle, pycocotools on host"] = lambda: host_coco(table.rles)
    rows = []
    for name, fn in cases.items():
        cold, median = seconds(fn, device, args.runs)
        rows.append({"case": name, "cold_s": cold, "median_s": median})
    result = {
        "device": device_name(device),
        "masks": len(table),
        "size": [args.height, args.width],
        "runs_per_mask": runs / max(1, len(table)),
        "rows": rows,
    }
    print_table(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--masks", type=int, default=3072)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--mean-run", type=float, default=13.5, help="mean run length, pixels")
    parser.add_argument("--modes", default=",".join(OUTPUT_MODES), help="comma separated")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the cold one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(OUTPUT_MODES)
    if unknown:
        parser.error(f"unknown output modes {sorted(unknown)}; expected {OUTPUT_MODES}")
    return args


def noisy_table(
    n: int, h: int, w: int, mean_run: float, device: torch.device, seed: int
) -> MaskTable:
    """A MaskTable of n masks at h x w whose runs have geometric lengths (mean `mean_run`)."""
    g = torch.Generator(device=device).manual_seed(seed)
    draws = int(h * w / mean_run * 1.2) + 16  # enough draws to pass h*w almost surely
    starts, per_mask = [], []
    for _ in range(n):
        lengths = torch.empty(draws, device=device).geometric_(1 / mean_run, generator=g)
        ends = lengths.cumsum(0)
        ends = ends[ends < h * w].to(torch.int32)  # change positions, 1 <= p < h*w
        starts.append(ends)
        per_mask.append(ends.shape[0])
    first = torch.rand(n, generator=g, device=device) < 0.5
    offsets = torch.tensor(np.cumsum([0, *per_mask]), dtype=torch.int64, device=device)
    rles = RleBatch((h, w), first, torch.cat(starts), offsets)

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.int64, device=device)

    return MaskTable(
        rles=rles,
        boxes=zeros(n, 4),
        areas=zeros(n),
        iou_preds=torch.ones(n, device=device),
        stability_scores=torch.ones(n, device=device),
        crop_ids=zeros(n),
        point_ids=zeros(n),
    )


def pageable_masks(rles: RleBatch) -> np.ndarray:
    """Binary masks decoded on the device, each chunk copied straight into pageable memory."""
    h, w = rles.size
    block = np.empty((len(rles), h * w), dtype=bool)
    target = torch.from_numpy(block)
    row = 0
    for part in rles.chunks(max_masks=max(1, (1 << 26) // (h * w))):
        target[row : row + len(part)].copy_(part.decode_columns())
        row += len(part)
    return block


def host_coco(rles: RleBatch) -> list[dict[str, Any]]:
    """COCO RLEs from host counts through pycocotools, one mask at a time."""
    h, w = rles.size
    return [coco_encode_rle({"size": [h, w], "counts": c}) for c in rles.to_counts()]


def seconds(fn: Callable[[], Any], device: torch.device, runs: int) -> tuple[float, float]:
    """(cold seconds, median seconds of `runs` more calls); results are dropped before the next."""
    times = []
    for _ in range(1 + runs):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        del out
    return times[0], statistics.median(times[1:]) if runs else times[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def print_table(result: dict[str, Any]) -> None:
    h, w = result["size"]
    print(
        f"{result['device']}: {result['masks']} masks at {h}x{w}, "
        f"{result['runs_per_mask']:,.0f} runs per mask"
    )
    print("| case | median s | cold s | ms per mask |")
    print("|---|---|---|---|")
    for row in result["rows"]:
        per_mask = 1000 * row["median_s"] / max(1, result["masks"])
        print(f"| {row['case']} | {row['median_s']:.3f} | {row['cold_s']:.3f} | {per_mask:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
