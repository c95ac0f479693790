"""Pipelines: text-to-image, and editing real images with it (img2img, inpainting, outpainting,
inversion editing)."""
from jaxdiff.pipelines.editing import edit, img2img, inpaint, invert, outpaint
from jaxdiff.pipelines.text_to_image import TextToImage
from jaxdiff.pipelines.text_to_video import TextToVideo

__all__ = ["TextToImage", "TextToVideo", "edit", "img2img", "inpaint", "invert", "outpaint"]
