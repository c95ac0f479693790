"""Unconditional pixel-space diffusion with a U-Net (DDPM, Ho et al. 2020; v-prediction, min-SNR weighting).

  python -m train --config configs/pixel_diffusion.py:tiny --workdir /tmp/pixel
"""
import ml_collections

from configs import common
from jaxdiff.training.config import base_config


def get_config(variant: str = "tiny"):
    c = base_config()
    c.recipe = "diffusion"
    c.model = ml_collections.ConfigDict(dict(backbone="unet", space="pixel",
                                             **common.diffusion_objective("v_prediction", "cosine")))
    if variant != "tiny":
        raise ValueError(f"unknown variant {variant!r} of configs/pixel_diffusion.py; choose one of: tiny")
    common.tiny_run(c)
    c.model.unet = common.tiny_unet(cross_attention=False)
    c.model.sample_steps = 5
    return c
