"""Every SAM implementation on this machine, same weights, same inputs, one table.

    python benchmarks/bench.py --device cuda --models vit_b,vit_h --batches 1,8 --json out.json
    python benchmarks/bench.py --device cpu --models vit_b --batches 1 --runs 2
    python benchmarks/bench.py --tiny          # seconds-long smoke run (CI)

Columns: images/s of the image encoder (1024x1024 input), ms per batch, peak GPU memory, and
agreement with samkit's fp32 reference on the same input: cosine similarity of the embeddings
(lowest over the batch) and IoU of the masks the fp32 decoder gives for one point prompt.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from samkit.build import build_sam

import implementations as impl  # the script's folder is on sys.path


def time_call(fn: Callable[[], object], device: torch.device, runs: int, warmup: int) -> float:
    """Median seconds per call (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encoder_factories(args, device, model_type) -> list[Callable]:
    cuda = device.type == "cuda"
    bf16 = torch.bfloat16
    factories = [lambda sd, mt: impl.samkit_encoder(sd, mt, device)]
    if cuda:
        factories += [lambda sd, mt: impl.samkit_fast_encoder(sd, mt, device)]
        for ablation in args.ablations:
            key, _, value = ablation.partition("=")
            change = {key: value if value not in ("True", "False") else value == "True"}
            factories.append(lambda sd, mt, c=change: impl.samkit_fast_encoder(sd, mt, device, **c))
        factories += [
            lambda sd, mt: impl.samkit_encoder(sd, mt, device, dtype=bf16, backend="sdpa"),
            lambda sd, mt: impl.samkit_encoder(sd, mt, device, dtype=bf16, backend="fused"),
        ]
        for mode in args.compile_modes:
            for backend in args.fast_backends:
                factories.append(
                    lambda sd, mt, m=mode, b=backend: impl.samkit_encoder(
                        sd, mt, device, dtype=bf16, backend=b, compile_mode=m
                    )
                )
    else:
        factories += [
            lambda sd, mt: impl.samkit_encoder(sd, mt, device, backend="fused"),
            lambda sd, mt: impl.samkit_encoder(sd, mt, device, dtype=bf16, backend="sdpa"),
        ]
    if impl.official_available(model_type) and not args.no_others:
        factories.append(lambda sd, mt: impl.official_encoder(sd, mt, device))
        if cuda:
            factories.append(lambda sd, mt: impl.official_encoder(sd, mt, device, dtype=bf16))
    if cuda and impl.saf_available(model_type) and not args.no_others:
        factories.append(lambda sd, mt: impl.saf_encoder(sd, mt, device))
    if impl.transformers_available() and not args.no_others:
        factories.append(lambda sd, mt: impl.transformers_encoder(sd, mt, device))
        if cuda:
            factories.append(lambda sd, mt: impl.transformers_encoder(sd, mt, device, dtype=bf16))
    return factories


def mask_iou_with_reference(embedding, reference_embedding, decoder_model) -> float:
    """IoU of the fp32 decoder's masks (one centre point) on the two embeddings."""
    size = decoder_model.config.image_size
    point = torch.full((1, 1, 2), size / 2, device=embedding.device)
    label = torch.ones(1, 1, dtype=torch.long, device=embedding.device)
    ious = []
    with torch.inference_mode():
        for i in range(embedding.shape[0]):
            a, _ = decoder_model.decode(embedding[i : i + 1].float(), point, label)
            b, _ = decoder_model.decode(reference_embedding[i : i + 1], point, label)
            a, b = a > 0, b > 0
            union = (a | b).sum().item()
            ious.append(1.0 if union == 0 else (a & b).sum().item() / union)
    return min(ious)


def run_encoders(args, device) -> list[dict]:
    rows = []
    for model_type in args.models:
        state_dict = impl.random_state_dict(model_type)
        reference = build_sam(impl.config_for(model_type), device=device)
        reference.load_state_dict(state_dict)
        size = reference.config.image_size
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, 3, size, size, generator=gen).to(device)
            with torch.inference_mode():
                ref_emb = reference.image_encoder(x)
            for factory in encoder_factories(args, device, model_type):
                row = measure(factory, state_dict, model_type, x, ref_emb, reference, args)
                if not row.get("skipped"):
                    rows.append(row)
                    print(format_row(row), flush=True)
        del reference
    return rows


def measure(factory, state_dict, model_type, x, ref_emb, reference, args) -> dict:
    device = x.device
    try:
        encoder = factory(state_dict, model_type)
    except Exception as error:  # an implementation that cannot run here is reported, not fatal
        return {"model": model_type, "batch": x.shape[0], "impl": "?", "error": str(error)[:200]}
    row = {"model": model_type, "batch": x.shape[0], "impl": encoder.name}
    if args.only and not any(part in encoder.name for part in args.only):
        return row | {"skipped": True}
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out = encoder.run(x)
        seconds = time_call(lambda: encoder.run(x), device, args.runs, args.warmup)
        row["ms"] = 1000 * seconds
        row["img_per_s"] = x.shape[0] / seconds
        if device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out = encoder.run(x).float()
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref_emb.flatten(1), dim=1)
        row["cosine"] = cos.min().item()
        row["mask_iou"] = mask_iou_with_reference(out, ref_emb, reference)
        if args.profile and device.type == "cuda":
            print_profile(lambda: encoder.run(x), encoder.name)
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    return row


def print_profile(fn, name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"--- {name}")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70)
    )


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['model']} | {row['batch']} | {row['impl']} | error: {row['error']} |"
    peak = f"{row['peak_mib']:,.0f}" if "peak_mib" in row else "-"
    return (
        f"| {row['model']} | {row['batch']} | {row['impl']} | {row['img_per_s']:.1f} | "
        f"{row['ms']:.1f} | {peak} | {row['cosine']:.5f} | {row['mask_iou']:.4f} |"
    )


HEADER = (
    "| model | batch | implementation | img/s | ms/batch | peak MiB | cosine vs fp32 | mask IoU |\n"
    "|---|---|---|---|---|---|---|---|"
)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="vit_b,vit_h", type=lambda s: s.split(","))
    parser.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--compile-modes",
        default="default",
        type=lambda s: [m for m in s.split(",") if m],
    )
    parser.add_argument("--fast-backends", default="fused", type=lambda s: s.split(","))
    parser.add_argument(
        "--ablations",
        default=[],
        type=lambda s: s.split(","),
        help="extra samkit fast rows with one SpeedPlan field changed, e.g. gelu_epilogue=False",
    )
    parser.add_argument("--no-others", action="store_true", help="samkit only")
    parser.add_argument(
        "--only",
        default=None,
        type=lambda s: s.split(","),
        help="encoder table: only implementations whose name contains one of these strings",
    )
    parser.add_argument("--latency", action="store_true", help="also time set_image and a prompt")
    parser.add_argument("--latency-only", action="store_true", help="only the latency table")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--profile", action="store_true", help="top CUDA kernels of each run")
    args = parser.parse_args(argv)
    args.latency = args.latency or args.latency_only
    if args.tiny:
        args.models, args.batches, args.runs, args.warmup = ["tiny"], [1, 2], 1, 0
        args.compile_modes = []
    device = torch.device(args.device)
    print(f"# {machine()}, {time.strftime('%Y-%m-%d')}: {' '.join(sys.argv)}")
    rows = []
    if not args.latency_only:
        print(HEADER)
        rows = run_encoders(args, device)
    result = {"machine": machine(), "argv": sys.argv, "encoder": rows}
    if args.latency:
        import latency

        print(latency.HEADER)
        result["latency"] = latency.run(args, device)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
