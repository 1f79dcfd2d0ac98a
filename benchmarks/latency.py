"""Interactive latency: `set_image` on a 1000x1500 uint8 photo, then one point prompt.

"prompt (device)" is predict_torch: point -> masks at the original size, left on the device;
"prompt (numpy)" is predict: the same, returned as numpy arrays on the host.
"""

from __future__ import annotations

import numpy as np
import torch

from samkit.build import build_sam
from samkit.predictor import SamPredictor

import implementations as impl

IMAGE_SHAPE = (1000, 1500)
POINT = np.array([[500.0, 375.0]])


def photo(shape=IMAGE_SHAPE, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 image: smooth gradients, a few shapes, noise."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    image = np.stack([120 + 100 * x, 80 + 120 * y, 150 - 60 * x * y], axis=-1)
    image[h // 4 : h // 2, w // 5 : w // 2] = (200, 40, 40)
    disc = (x - 0.7) ** 2 + (y - 0.35) ** 2 < 0.02
    image[disc] = (30, 160, 60)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _with_prompts(predictor, device):
    """(predictor, one point through predict_torch, the same point through predict)."""
    coords = torch.as_tensor(
        predictor.transform.apply_coords(POINT, IMAGE_SHAPE), dtype=torch.float, device=device
    )[None]
    labels = torch.ones(1, 1, dtype=torch.int, device=device)
    return (
        predictor,
        lambda: predictor.predict_torch(coords, labels),
        lambda: predictor.predict(POINT, np.array([1])),
    )


def _samkit(state_dict, model_type, device, fast):
    model = build_sam(impl.config_for(model_type), device=device)
    model.load_state_dict(state_dict)
    return _with_prompts(SamPredictor(model, fast=fast), device)


def _official(state_dict, model_type, device):
    from segment_anything import SamPredictor as OfficialPredictor

    model = impl.official_model(state_dict, model_type, device)
    return _with_prompts(OfficialPredictor(model), device)


def run(args, device: torch.device) -> list[dict]:
    from bench import time_call

    image = photo()
    rows = []
    for model_type in args.models:
        state_dict = impl.random_state_dict(model_type)
        makers = {
            "samkit fp32 (reference)": lambda sd=state_dict, mt=model_type: _samkit(
                sd, mt, device, fast=False
            ),
            "samkit fast": lambda sd=state_dict, mt=model_type: _samkit(sd, mt, device, fast=True),
        }
        if impl.official_available(model_type) and not args.no_others:
            makers["official fp32"] = lambda sd=state_dict, mt=model_type: _official(sd, mt, device)
        for name, make in makers.items():
            row = {"model": model_type, "impl": name}
            try:
                predictor, prompt_device, prompt_numpy = make()
                with torch.inference_mode():
                    row["set_image_ms"] = 1000 * time_call(
                        lambda p=predictor: p.set_image(image), device, args.runs, args.warmup
                    )
                    row["prompt_device_ms"] = 1000 * time_call(
                        prompt_device, device, 5 * args.runs, args.warmup + 3
                    )
                    row["prompt_numpy_ms"] = 1000 * time_call(
                        prompt_numpy, device, 5 * args.runs, args.warmup + 3
                    )
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['model']} | {row['impl']} | error: {row['error']} |"
    return (
        f"| {row['model']} | {row['impl']} | {row['set_image_ms']:.1f} | "
        f"{row['prompt_device_ms']:.2f} | {row['prompt_numpy_ms']:.2f} |"
    )


HEADER = (
    "| model | implementation | set_image ms (1000x1500 uint8) | prompt ms (device) "
    "| prompt ms (numpy) |\n|---|---|---|---|---|"
)
