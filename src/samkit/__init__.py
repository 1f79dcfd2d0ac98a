"""samkit: Segment Anything with the official checkpoints, faster, with tools around it."""

from samkit.amg import SamAutomaticMaskGenerator
from samkit.build import (
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    load_sam,
    sam_model_registry,
)
from samkit.checkpoint import CheckpointError, convert_checkpoint, read_checkpoint, save_checkpoint
from samkit.config import VARIANTS, SamConfig
from samkit.modeling import PointLabel, Sam
from samkit.predictor import SamPredictor

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "PointLabel",
    "Sam",
    "SamAutomaticMaskGenerator",
    "SamConfig",
    "SamPredictor",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "convert_checkpoint",
    "load_sam",
    "read_checkpoint",
    "sam_model_registry",
    "save_checkpoint",
]
