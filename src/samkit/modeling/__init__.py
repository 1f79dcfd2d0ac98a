"""SAM's modules, named so that their state_dict keys equal the official checkpoints'."""

from samkit.modeling.image_encoder import ImageEncoderViT
from samkit.modeling.mask_decoder import MaskDecoder
from samkit.modeling.prompt_encoder import PointLabel, PromptEncoder
from samkit.modeling.sam import Sam
from samkit.modeling.transformer import TwoWayTransformer

__all__ = [
    "ImageEncoderViT",
    "MaskDecoder",
    "PointLabel",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
]
