"""Automatic mask generation ("segment everything"): the generator, its records, mask utilities."""

from samkit.amg.generator import SamAutomaticMaskGenerator
from samkit.amg.records import MaskRecord

__all__ = ["MaskRecord", "SamAutomaticMaskGenerator"]
