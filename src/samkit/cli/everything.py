"""`samkit everything`: segment everything in many images, resumably, one output per image.

Output names: each image's path relative to the deepest folder holding all inputs, without its
suffix (`photos/a/x.jpg` and `photos/b/x.jpg` give `OUT/a/x.json` and `OUT/b/x.json`). Two
inputs that would still share a name (`x.jpg` and `x.png` in one folder) keep their suffix
(`x.jpg.json`, `x.png.json`). Names depend only on the set of inputs, so running the same
command again finds the outputs it wrote before.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from samkit.cli.common import UserError, add_command

FORMATS = ("sa1b", "png")
OVERLAY_SUFFIX = ".overlay.png"

EXAMPLES = """\
  # SA-1B JSON (COCO RLE) per image, for every image under photos/ (recursively)
  samkit everything photos/ --checkpoint sam_vit_h_4b8939.pth --out masks/

  # the official PNG layout (a folder of <i>.png plus metadata.csv per image) and overlays
  samkit everything 'shots/*.jpg' --checkpoint sam_vit_b_01ec64.pth --out masks/ \\
      --format png --overlay

  # denser sampling with a second crop layer and small-region cleanup, on the CPU
  samkit everything img.jpg --checkpoint sam_vit_b_01ec64.pth --out masks/ --device cpu \\
      --points-per-side 64 --crop-n-layers 1 --min-mask-region-area 100

Interrupted runs resume: images whose output exists are skipped (--overwrite redoes them).
Exit code: 0 all done, 1 some images failed (each reported in one line), 2 usage error.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


# SamAutomaticMaskGenerator's own arguments: (flag, type, official default, help)
GENERATOR_OPTIONS = (
    ("points-per-side", _positive_int, 32, "points along each side of the grid"),
    ("points-per-batch", _positive_int, 64, "points decoded at once (memory vs speed)"),
    ("pred-iou-thresh", float, 0.88, "keep masks with predicted IoU above this; 0: off"),
    ("stability-score-thresh", float, 0.95, "keep masks at least this stable; 0: off"),
    ("stability-score-offset", float, 1.0, "logit shift for the stability score"),
    ("box-nms-thresh", float, 0.7, "box IoU above which duplicates in a crop are dropped"),
    ("crop-n-layers", _non_negative_int, 0, "crop layers run again on (2**i)**2 crops"),
    ("crop-nms-thresh", float, 0.7, "box IoU for duplicates across crops"),
    ("crop-overlap-ratio", float, 512 / 1500, "overlap of the first layer's crops"),
    ("crop-n-points-downscale-factor", _positive_int, 1, "points per side / this**layer"),
    ("min-mask-region-area", _non_negative_int, 0, "fill holes, drop islands below; 0: off"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "everything",
        help="generate all masks of images (automatic mask generation)",
        description=(
            "Prompt SAM with a grid of points over each image and keep the good, distinct masks "
            "(the official SamAutomaticMaskGenerator). Writes per image OUT/<name>.json in the "
            "SA-1B layout, or with --format png a folder OUT/<name>/ of <i>.png masks and "
            "metadata.csv (the official scripts/amg.py layout). <name> is the image's path "
            "relative to the deepest folder holding all inputs, without its suffix."
        ),
        examples=EXAMPLES,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs")
    parser.add_argument("--checkpoint", required=True, help="SAM checkpoint, any format")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--model-type",
        default="auto",
        choices=("auto", "default", "vit_b", "vit_l", "vit_h"),
        help="model variant (default: auto, read from the checkpoint)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the fast path (CUDA: bf16 compiled encoder, graphed decoder); default: exact fp32",
    )
    parser.add_argument("--format", choices=FORMATS, default="sa1b", help="(default: sa1b)")
    parser.add_argument(
        "--overlay", action="store_true", help=f"also write OUT/<name>{OVERLAY_SUFFIX}"
    )
    parser.add_argument("--overwrite", action="store_true", help="redo images with outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")

    group = parser.add_argument_group("generator options (official defaults)")
    for flag, kind, default, text in GENERATOR_OPTIONS:
        group.add_argument(
            f"--{flag}", type=kind, default=default, metavar="X", help=f"{text} (%(default)s)"
        )
    group.add_argument(
        "--max-mask-region-fraction",
        type=float,
        default=None,
        metavar="X",
        help="drop masks covering more than this fraction of the image (default: off; the "
        "paper used 0.95)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from samkit.amg.export import (
        overlay,
        sa1b_document,
        write_mask_folder,
        write_sa1b_json,
    )
    from samkit.amg.generator import SamAutomaticMaskGenerator
    from samkit.build import load_sam, resolve_device
    from samkit.io import ImageReadError, find_images, load_image, save_png

    paths, problems = find_images(args.inputs)
    for problem in problems:
        print(f"samkit everything: warning: {problem}", file=sys.stderr)
    if not paths:
        raise UserError("no images found in the inputs")
    names = output_names(paths)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")

    out: Path = args.out
    todo = [p for p in paths if args.overwrite or not _outputs_exist(out, names[p], args)]
    skipped = len(paths) - len(todo)
    done = failed = 0
    if todo:
        model = load_sam(args.checkpoint, args.model_type, device=device)
        try:
            generator = SamAutomaticMaskGenerator(
                model,
                output_mode="coco_rle" if args.format == "sa1b" else "binary_mask",
                max_mask_region_fraction=args.max_mask_region_fraction,
                fast=args.fast,
                **_official_options(args),
            )
        except ValueError as e:
            raise UserError(str(e)) from None
        image_ids = {path: i for i, path in enumerate(paths, start=1)}
        start = time.perf_counter()
        for path in tqdm(todo, unit="img", desc="everything", disable=args.quiet or None):
            name = names[path]
            try:
                image = load_image(path)
                records = generator.generate_records(image)
            except (ImageReadError, torch.OutOfMemoryError) as e:
                tqdm.write(f"samkit everything: failed: {_one_line(e, path)}", file=sys.stderr)
                failed += 1
                continue
            if args.format == "sa1b":
                document = sa1b_document(
                    records,
                    image_id=image_ids[path],
                    file_name=path.name,
                    height=image.shape[0],
                    width=image.shape[1],
                )
                write_sa1b_json(out / f"{name}.json", document)
            else:
                write_mask_folder(out / name, records)
            if args.overlay:
                save_png(out / f"{name}{OVERLAY_SUFFIX}", overlay(image, records))
            done += 1
        elapsed = time.perf_counter() - start
        rate = f", {done / elapsed:.2f} images/s" if done and elapsed > 0 else ""
    else:
        rate = ""
    print(
        f"samkit everything: {done} done, {skipped} skipped (output exists), "
        f"{failed} failed{rate}; outputs in {out}"
    )
    return 1 if failed else 0


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """Output name (POSIX relative path, no suffix) for each image path; see the module doc."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    root = Path(os.path.commonpath([str(a.parent) for a in absolute]))
    relative = [a.relative_to(root) for a in absolute]
    stems = [r.with_suffix("").as_posix() for r in relative]
    counts = Counter(stems)
    return {
        path: rel.as_posix() if counts[stem] > 1 else stem
        for path, rel, stem in zip(paths, relative, stems, strict=True)
    }


def _outputs_exist(out: Path, name: str, args: argparse.Namespace) -> bool:
    if args.format == "sa1b":
        main = (out / f"{name}.json").is_file()
    else:
        main = (out / name / "metadata.csv").is_file()
    return main and (not args.overlay or (out / f"{name}{OVERLAY_SUFFIX}").is_file())


def _official_options(args: argparse.Namespace) -> dict[str, float | int]:
    return {
        flag.replace("-", "_"): getattr(args, flag.replace("-", "_"))
        for flag, *_ in GENERATOR_OPTIONS
    }


def _one_line(error: BaseException, path: Path) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if str(path) in text else f"{path}: {text}"
