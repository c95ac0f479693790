"""Pipelines: text-to-image, editing real images with it (img2img, inpainting, outpainting,
inversion editing; each `fn(pipe, prompts, images, ...)`), and text-to-video. `SHAPES_MODEL` is the
folder of the shipped text-to-image model, trained here on the built-in `shapes` dataset (see the
README for how); `python -m jaxdiff.pipelines.shapes_eval` scores a model folder on ShapesEval."""
import os

from jaxdiff.pipelines.editing import edit, img2img, inpaint, invert, outpaint
from jaxdiff.pipelines.text_to_image import TextToImage
from jaxdiff.pipelines.text_to_video import TextToVideo

SHAPES_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shapes")

__all__ = ["SHAPES_MODEL", "TextToImage", "TextToVideo", "edit", "img2img", "inpaint", "invert", "outpaint"]
