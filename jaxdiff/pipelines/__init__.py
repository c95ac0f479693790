"""Pipelines: text-to-image (and, as they land, img2img, inpainting, outpainting, editing, video)."""
from jaxdiff.pipelines.text_to_image import TextToImage

__all__ = ["TextToImage"]
