"""`samkit segment`: masks for points and boxes on one image, written as PNGs, an overlay and JSON.

Objects: with no --box or one --box, all prompts (points, the box, the mask input) describe one
object. Several --box give one object per box; points and a mask input are then refused, since
it would be unclear which object they belong to.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from samkit.build import load_sam
from samkit.checkpoint import describe
from samkit.cli.common import UserError, add_command, output_folder, parse_device
from samkit.embedding import EmbeddingError, EmbeddingMismatchError
from samkit.io import DEFAULT_MAX_PIXELS, load_image, save_png, write_atomic
from samkit.overlay import PALETTE, draw_overlay
from samkit.predictor import SamPredictor
from samkit.transforms import get_preprocess_shape

MODEL_TYPES = ("auto", "vit_b", "vit_l", "vit_h")
# a binary mask prompt becomes +-MASK_LOGIT logits (the range of SAM's own low-res outputs)
MASK_LOGIT = 10.0

EXAMPLES = """\
  samkit segment photo.jpg --checkpoint sam_vit_b_01ec64.pth --point 500,375
  samkit segment photo.jpg --checkpoint sam_vit_b_01ec64.pth --point 500,375 --point 620,390,0
  samkit segment photo.jpg --checkpoint sam_vit_h_4b8939.pth --box 425,600,700,875 --single
  samkit segment photo.jpg --checkpoint sam_vit_b_01ec64.pth --box 10,10,200,300 \\
      --box 250,40,500,380 --out boxes/
  samkit segment photo.jpg --checkpoint sam_vit_b_01ec64.pth --point 500,375 \\
      --embedding photo.sam.safetensors          # encode once, reuse on the next runs
  samkit segment photo.jpg --checkpoint sam_vit_b_01ec64.pth --point 500,375 \\
      --mask-input photo_masks/mask_0_2.png      # refine a previous mask

Writes into --out (default ./IMAGE_STEM_masks): mask_<object>_<k>.png (0/255), overlay.png and
masks.json (per mask: score, area, bbox XYWH, COCO RLE, the prompt). Coordinates are pixels of
the image as displayed (EXIF orientation applied). Use --point=-5,10 for a negative X.
"""


@dataclass
class ObjectPrompt:
    """One object's prompts in original image pixels."""

    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    mask_input: np.ndarray | None = None  # 1xSxS logits


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "segment",
        help="masks for point and box prompts on one image",
        description=(
            "Segment objects in IMAGE from point and box prompts with a SAM checkpoint. Each "
            "--box is one object; without boxes (or with one) all prompts are one object. "
            "Several boxes cannot be combined with --point or --mask-input."
        ),
        examples=EXAMPLES,
    )
    parser.add_argument("image", metavar="IMAGE", help="image file (JPEG, PNG, TIFF, WebP, ...)")
    parser.add_argument("--checkpoint", metavar="PATH", help="SAM checkpoint (required)")
    parser.add_argument(
        "--model-type", choices=MODEL_TYPES, default="auto", help="default: from the checkpoint"
    )
    parser.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="X,Y[,LABEL]",
        help="a point in image pixels; LABEL 1 foreground (default) or 0 background; repeatable",
    )
    parser.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="X0,Y0,X1,Y1",
        help="a box in image pixels; repeatable, one object per box",
    )
    parser.add_argument(
        "--mask-input",
        metavar="FILE",
        help="a previous mask: 256x256 logits .npy, or a mask PNG (image size or 256x256)",
    )
    multimask = parser.add_mutually_exclusive_group()
    multimask.add_argument(
        "--multimask",
        dest="multimask",
        action="store_const",
        const=True,
        help="3 masks per object (default for a single point: it is ambiguous)",
    )
    multimask.add_argument(
        "--single",
        dest="multimask",
        action="store_const",
        const=False,
        help="1 mask per object (default for boxes and several points)",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (default ./IMAGE_STEM_masks)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the fast path (CUDA: bf16 compiled encoder, bf16 graphed decoder; compiles on "
        "first use, so it pays off over many prompts or images); default: the exact fp32 path",
    )
    parser.add_argument(
        "--embedding",
        metavar="FILE",
        help="image embedding file: reused if it matches the image and model, else written",
    )
    parser.add_argument(
        "--max-pixels",
        default=str(DEFAULT_MAX_PIXELS),
        metavar="N",
        help=f"refuse images with more pixels (default {DEFAULT_MAX_PIXELS:,})",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.checkpoint:
        raise UserError("--checkpoint PATH is required (e.g. sam_vit_b_01ec64.pth)")
    points = [parse_point(text) for text in args.point]
    boxes = [parse_box(text) for text in args.box]
    if not (points or boxes or args.mask_input):
        raise UserError("no prompt: give --point X,Y, --box X0,Y0,X1,Y1 or --mask-input FILE")
    if len(boxes) > 1 and (points or args.mask_input):
        raise UserError(
            "--point and --mask-input cannot be combined with several --box (one object per "
            "box); segment those objects one at a time"
        )
    max_pixels = _positive_int(args.max_pixels, "--max-pixels")
    device = parse_device(args.device)
    out = output_folder(args.out or f"{Path(args.image).stem}_masks")

    image = load_image(args.image, max_pixels=max_pixels)
    height, width = image.shape[:2]
    for x, y, _ in points:
        if not (0 <= x < width and 0 <= y < height):
            warn(f"point ({x:g}, {y:g}) is outside the {width}x{height} image; SAM accepts it")

    predictor = SamPredictor(
        load_sam(args.checkpoint, args.model_type, device=device), fast=args.fast
    )
    mask_size = predictor.model.config.mask_size
    mask_input = None
    if args.mask_input:
        mask_input = read_mask_input(args.mask_input, (height, width), mask_size)
    objects = make_objects(points, boxes, mask_input)
    multimask = args.multimask
    if multimask is None:  # the official advice: several masks only for an ambiguous prompt
        multimask = len(points) == 1 and not boxes and mask_input is None
    set_image(predictor, image, args.embedding)
    try:
        masks, scores, _ = predictor.predict_objects(
            point_coords=[o.points or None for o in objects],
            point_labels=[o.labels or None for o in objects],
            boxes=[o.box for o in objects],
            mask_inputs=[o.mask_input for o in objects],
            multimask_output=multimask,
        )
    except ValueError as e:
        raise UserError(str(e)) from None

    summary = {
        "image": {"file_name": str(args.image), "width": width, "height": height},
        "model": {
            "checkpoint": str(args.checkpoint),
            "model_type": describe(predictor.model.config),
        },
        "multimask_output": multimask,
    }
    try:
        summary["masks"] = records = write_outputs(out, image, objects, masks, scores, args)
        write_atomic(out / "masks.json", json.dumps(summary, indent=2) + "\n")
    except OSError as e:  # a full disk, a file in the way
        raise UserError(f"cannot write the outputs to {out}: {e}") from None
    for record in records:
        print(f"{out / record['file_name']}: score {record['score']:.3f}, area {record['area']}")
    noun = "mask" if len(records) == 1 else "masks"
    print(f"wrote {len(records)} {noun}, overlay.png and masks.json to {out}")
    return 0


def make_objects(
    points: list[tuple[float, float, int]],
    boxes: list[tuple[float, float, float, float]],
    mask_input: np.ndarray | None,
) -> list[ObjectPrompt]:
    """One object per box; without boxes, one object holding every prompt."""
    coords = [(x, y) for x, y, _ in points]
    labels = [label for _, _, label in points]
    if len(boxes) > 1:
        return [ObjectPrompt(box=box) for box in boxes]
    box = boxes[0] if boxes else None
    return [ObjectPrompt(points=coords, labels=labels, box=box, mask_input=mask_input)]


def set_image(predictor: SamPredictor, image: np.ndarray, embedding: str | None) -> None:
    """Encode the image, or reuse a matching embedding file (and write one if asked)."""
    if embedding and Path(embedding).exists():
        try:
            predictor.load_embedding(embedding, image=image)
            print(f"reused the image embedding in {embedding}")
            return
        except EmbeddingMismatchError as e:
            warn(f"{e}; it will be replaced")
        except EmbeddingError as e:
            raise UserError(f"--embedding: {e} (left untouched)") from None
    predictor.set_image(image)
    if embedding:
        try:
            predictor.save_embedding(embedding)
        except OSError as e:  # a file in the way of its folder, a full disk
            raise UserError(f"--embedding {embedding}: cannot write ({e.strerror or e})") from None
        print(f"saved the image embedding to {embedding}")


def write_outputs(
    out: Path,
    image: np.ndarray,
    objects: list[ObjectPrompt],
    masks: np.ndarray,
    scores: np.ndarray,
    args: argparse.Namespace,
) -> list[dict]:
    """Mask PNGs and overlay.png into `out`; returns the masks.json records."""
    records, flat_masks, colours = [], [], []
    for k, (obj, object_masks) in enumerate(zip(objects, masks, strict=True)):
        for j, mask in enumerate(object_masks):
            name = f"mask_{k}_{j}.png"
            save_png(out / name, mask.astype(np.uint8) * np.uint8(255))
            rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            records.append(
                {
                    "object": k,
                    "mask_index": j,
                    "file_name": name,
                    "score": round(float(scores[k, j]), 6),
                    "area": int(mask.sum()),
                    "bbox": [int(v) for v in coco_mask.toBbox(rle)],  # XYWH, COCO convention
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                    "prompt": {
                        "points": [list(p) for p in obj.points],
                        "labels": obj.labels,
                        "box": list(obj.box) if obj.box is not None else None,
                        "mask_input": args.mask_input if obj.mask_input is not None else None,
                    },
                }
            )
            flat_masks.append(mask)
            colours.append(PALETTE[len(colours) % len(PALETTE)])
    first_colour = [colours[k * masks.shape[1]] for k in range(len(objects))]
    all_points = [p for o in objects for p in o.points]
    all_labels = [label for o in objects for label in o.labels]
    overlay = draw_overlay(
        image,
        flat_masks,
        colours=colours,
        points=np.array(all_points, dtype=np.float64).reshape(-1, 2),
        labels=np.array(all_labels),
        boxes=[o.box for o in objects if o.box is not None],
        box_colours=[c for o, c in zip(objects, first_colour, strict=True) if o.box is not None],
    )
    save_png(out / "overlay.png", overlay)
    return records


def read_mask_input(path: str, image_size: tuple[int, int], mask_size: int) -> np.ndarray:
    """A mask prompt file -> (1, S, S) logits: an .npy of logits, or a mask image.

    A mask image of the image's size is resized as the image is (long side to S, then padded,
    outside the image is background); an S x S mask image is taken as already in that frame.
    """
    if Path(path).suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--mask-input {path}: cannot read .npy ({e})") from None
        if array.dtype == np.bool_:
            array = np.where(array, MASK_LOGIT, -MASK_LOGIT)
        if array.shape not in ((mask_size, mask_size), (1, mask_size, mask_size)):
            raise UserError(
                f"--mask-input {path}: expected {mask_size}x{mask_size} logits, got shape "
                f"{array.shape}"
            )
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise UserError(f"--mask-input {path}: expected finite numbers")
        return array.astype(np.float32).reshape(1, mask_size, mask_size)
    mask = load_image(path).max(axis=2) > 127
    if mask.shape == image_size:
        h, w = get_preprocess_shape(*image_size, mask_size)
        small = Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).resize(
            (w, h), Image.Resampling.BILINEAR
        )
        mask = np.zeros((mask_size, mask_size), dtype=bool)
        mask[:h, :w] = np.asarray(small) > 127
    elif mask.shape != (mask_size, mask_size):
        raise UserError(
            f"--mask-input {path}: a mask image must be {image_size[1]}x{image_size[0]} (the "
            f"image) or {mask_size}x{mask_size}, got {mask.shape[1]}x{mask.shape[0]}"
        )
    return np.where(mask, MASK_LOGIT, -MASK_LOGIT).astype(np.float32)[None]


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y,LABEL' -> (x, y, label)."""
    parts = text.split(",")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        x, y = _finite(parts[0]), _finite(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
        if label not in (0, 1):
            raise ValueError
    except ValueError:
        raise UserError(
            f"--point {text!r}: expected X,Y or X,Y,LABEL with numbers X and Y and LABEL "
            "1 (foreground) or 0 (background)"
        ) from None
    return x, y, label


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' -> (x0, y0, x1, y1), with x0 <= x1 and y0 <= y1."""
    try:
        x0, y0, x1, y1 = (_finite(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--box {text!r}: expected X0,Y0,X1,Y1 (four numbers)") from None
    if x1 < x0 or y1 < y0:
        raise UserError(f"--box {text!r}: expected X0 <= X1 and Y0 <= Y1 (corners XYXY)")
    return x0, y0, x1, y1


def warn(message: str) -> None:
    print(f"samkit segment: warning: {message}", file=sys.stderr)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{name} {text!r}: expected a positive whole number")
    return value
