"""Pipelines: text-to-image, editing real images with it (img2img, inpainting, outpainting,
inversion editing; each `fn(pipe, prompts, images, ...)`), and text-to-video. `SHAPES_MODEL` is the
folder of the shipped text-to-image model (an MMDiT), trained here on the built-in `shapes` dataset (see the
README for how); `SHAPES_UNET_MODEL` the shipped U-Net model whose VAE and CLIP text encoder the MMDiT and the
video runs read, and which the LoRA and video-inflation recipes start from; `SHAPES_VIDEO_MODEL` the shipped
text-to-video model (a Wan transformer, trained here on `moving_shapes`); `python -m jaxdiff.pipelines.shapes_eval`
scores a model folder on ShapesEval."""
import os

from jaxdiff.pipelines.editing import edit, img2img, inpaint, invert, outpaint
from jaxdiff.pipelines.text_to_image import TextToImage
from jaxdiff.pipelines.text_to_video import TextToVideo

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SHAPES_MODEL = os.path.join(_ASSETS, "shapes")
SHAPES_UNET_MODEL = os.path.join(_ASSETS, "shapes_unet")
SHAPES_VIDEO_MODEL = os.path.join(_ASSETS, "shapes_video")

__all__ = ["SHAPES_MODEL", "SHAPES_UNET_MODEL", "SHAPES_VIDEO_MODEL", "TextToImage", "TextToVideo", "edit", "img2img", "inpaint",
           "invert", "outpaint"]
