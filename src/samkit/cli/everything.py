"""`samkit everything`: segment everything in many images, resumably, one output per image.

Output names: each image's path relative to the deepest folder holding all inputs, without its
suffix (`photos/a/x.jpg` and `photos/b/x.jpg` give `OUT/a/x.json` and `OUT/b/x.json`). Two
inputs that would still share a name (`x.jpg` and `x.png` in one folder) keep their suffix
(`x.jpg.json`, `x.png.json`). Names depend only on the set of inputs, so running the same
command again finds the outputs it wrote before.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from samkit.cli.common import UserError, add_command, output_folder, parse_device
from samkit.io import DEFAULT_MAX_PIXELS

FORMATS = ("sa1b", "png")
OVERLAY_SUFFIX = ".overlay.png"
# images read ahead of the model, and threads writing outputs, so that the host's decoding and
# encoding run beside the model (on 2 cores: a 1000x1500 JPEG reads in ~18 ms, its overlay of
# 100 masks takes ~0.3 s to draw and ~0.16 s to write as PNG; see benchmarks/README.md)
READ_AHEAD = 2
WRITERS = max(1, min(4, os.cpu_count() or 1))
# host memory that images waiting for their outputs may hold (an image and, for --format png,
# its bool masks: 100 masks of a 24 Mpixel photo take 2.4 GB); one image is always allowed
PENDING_BYTES = 2**30

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
Exit code: 0 all done, 1 some images failed (each reported in one line), 2 usage error,
130 interrupted (the images already segmented are written first).
"""


def _int_at_least(low: int):
    """An argparse type: an integer >= low, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _number(low=-math.inf, high=math.inf, *, open_low: bool = False, open_high: bool = False):
    """An argparse type: a finite float between low and high (each end included unless open),
    with a one-line message otherwise."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        below = value < low or (open_low and value == low)
        above = value > high or (open_high and value == high)
        if below or above:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value:g}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)
_fraction = _number(0.0, 1.0)


# SamAutomaticMaskGenerator's own arguments: (flag, type, official default, help)
GENERATOR_OPTIONS = (
    ("points-per-side", _positive_int, 32, "points along each side of the grid"),
    ("points-per-batch", _positive_int, 64, "points decoded at once (memory vs speed)"),
    ("pred-iou-thresh", _number(), 0.88, "keep masks with predicted IoU above this; 0: off"),
    ("stability-score-thresh", _number(), 0.95, "keep masks at least this stable; 0: off"),
    ("stability-score-offset", _number(0.0), 1.0, "logit shift for the stability score"),
    ("box-nms-thresh", _fraction, 0.7, "box IoU above which duplicates in a crop are dropped"),
    ("crop-n-layers", _non_negative_int, 0, "crop layers run again on (2**i)**2 crops"),
    ("crop-nms-thresh", _fraction, 0.7, "box IoU for duplicates across crops"),
    (
        "crop-overlap-ratio",
        _number(0.0, 1.0, open_high=True),
        512 / 1500,
        "overlap of the first layer's crops",
    ),
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
        help="the fast path (CUDA: bf16 compiled encoder and decoder; the first image compiles "
        "for tens of seconds); default: exact fp32",
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
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="fail images with more pixels, read from the file's header (default %(default)s)",
    )
    group.add_argument(
        "--max-mask-region-fraction",
        type=_number(0.0, 1.0, open_low=True),
        default=None,
        metavar="X",
        help="drop masks covering more than this fraction of the image (default: off; the "
        "paper used 0.95)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from samkit.amg.generator import SamAutomaticMaskGenerator
    from samkit.build import load_sam
    from samkit.io import find_images

    out: Path = args.out
    paths, problems = find_images(args.inputs)
    # an output folder inside an input folder: its PNGs are this command's outputs, not inputs
    real_out = Path(os.path.realpath(out))
    inputs = [p for p in paths if real_out not in Path(os.path.realpath(p)).parents]
    if len(inputs) < len(paths):
        left_out = len(paths) - len(inputs)
        problems.append(f"left out {left_out} image(s) inside the output folder {out}")
        paths = inputs
    for problem in problems:
        print(f"samkit everything: warning: {problem}", file=sys.stderr)
    if not paths:
        raise UserError("no images found in the inputs")
    names = output_names(paths)
    device = parse_device(args.device)
    output_folder(out)

    todo = [p for p in paths if args.overwrite or not _outputs_exist(out, names[p], args)]
    tally = _Tally()
    rate = ""
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
        jobs = [(path, names[path], image_ids[path]) for path in todo]
        try:
            _segment_all(jobs, generator, tally, args)
        except KeyboardInterrupt:
            print(
                f"samkit everything: interrupted: {tally.done} done, {tally.failed} failed, "
                f"{len(todo) - tally.done - tally.failed} left; the same command resumes "
                f"(outputs in {out})",
                file=sys.stderr,
            )
            return 130
        elapsed = time.perf_counter() - start
        if tally.done and elapsed > 0:
            rate = f", {tally.done / elapsed:.2f} images/s"
    print(
        f"samkit everything: {tally.done} done, {len(paths) - len(todo)} skipped (output exists), "
        f"{tally.failed} failed{rate}; outputs in {out}"
    )
    return 1 if tally.failed else 0


class _Tally:
    """Images done and failed; failures are reported in one line each."""

    def __init__(self) -> None:
        self.done = self.failed = 0

    def fail(self, message: str) -> None:
        tqdm.write(f"samkit everything: failed: {message}", file=sys.stderr)
        self.failed += 1


def _segment_all(
    jobs: list[tuple[Path, str, int]], generator, tally: _Tally, args: argparse.Namespace
) -> None:
    """Read, segment and write each (image path, output name, image id) of `jobs`, with the
    host's reading and writing beside the model's work: one thread reads READ_AHEAD images
    ahead, WRITERS threads write the outputs of segmented ones (the records of at most
    WRITERS + 1 images, and of more than one only within PENDING_BYTES, are held)."""
    from samkit.io import ImageReadError, load_image

    upcoming = iter(jobs)
    reads: deque = deque()  # (job, future image)
    writes: deque = deque()  # (image path, bytes held, future None)
    held = 0

    def read_next() -> None:
        job = next(upcoming, None)
        if job is not None:
            reads.append((job, reader.submit(load_image, job[0], max_pixels=args.max_pixels)))

    def finish_write() -> None:
        nonlocal held
        path, size, future = writes.popleft()
        held -= size
        try:
            future.result()
        except OSError as e:  # disk full, permissions: this image fails, the others go on
            tally.fail(f"cannot write the outputs of '{path}': {e}")
        else:
            tally.done += 1

    with (
        ThreadPoolExecutor(1, thread_name_prefix="samkit-read") as reader,
        ThreadPoolExecutor(WRITERS, thread_name_prefix="samkit-write") as writer,
        tqdm(total=len(jobs), unit="img", desc="everything", disable=args.quiet or None) as bar,
    ):
        for _ in range(READ_AHEAD):
            read_next()
        try:
            while reads:
                (path, name, image_id), pending = reads.popleft()
                read_next()
                try:
                    image = pending.result()
                    records = generator.generate_records(image)
                except (ImageReadError, torch.OutOfMemoryError) as e:
                    tally.fail(_one_line(e, path))
                except Exception as e:  # a bug on one image must not end a run of thousands
                    tally.fail(f"{_one_line(e, path)} ({type(e).__name__}: a samkit bug?)")
                else:
                    size = image.nbytes
                    if args.format == "png":  # bool masks; SA-1B JSON keeps COCO RLE strings
                        size += len(records) * image.shape[0] * image.shape[1]
                    while writes and (len(writes) > WRITERS or held + size > PENDING_BYTES):
                        finish_write()
                    job = (args, path, name, image_id, image, records)
                    writes.append((path, size, writer.submit(_write_outputs, *job)))
                    held += size
                bar.update()
        except KeyboardInterrupt:
            reader.shutdown(wait=False, cancel_futures=True)
            raise
        finally:  # interrupted too: what was segmented is written and counted
            while writes:
                finish_write()


def _write_outputs(
    args: argparse.Namespace, path: Path, name: str, image_id: int, image, records
) -> None:
    """One image's outputs under args.out: SA-1B JSON or a PNG folder, and an overlay."""
    from samkit.amg.export import overlay, sa1b_document, write_mask_folder, write_sa1b_json
    from samkit.io import save_png

    out: Path = args.out
    if args.format == "sa1b":
        document = sa1b_document(
            records,
            image_id=image_id,
            file_name=path.name,
            height=image.shape[0],
            width=image.shape[1],
        )
        write_sa1b_json(out / f"{name}.json", document)
    else:
        write_mask_folder(out / name, records)
    if args.overlay:
        save_png(out / f"{name}{OVERLAY_SUFFIX}", overlay(image, records))


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
