"""Unconditional pixel-space diffusion with a U-Net (DDPM, Ho et al. 2020; v-prediction, min-SNR weighting).

  python -m train --config configs/pixel_diffusion.py:tiny --workdir /tmp/pixel
"""
from configs import common
from jaxdiff.training.config import base_config


def get_config(variant: str = "tiny"):
    c = base_config()
    c.recipe = "diffusion"
    c.model = common.diffusion_model("unet", "pixel", prediction_type="v_prediction", schedule="cosine")
    if variant != "tiny":
        raise ValueError(f"unknown variant {variant!r} of configs/pixel_diffusion.py; choose one of: tiny")
    common.tiny_run(c)
    c.model.unet = common.tiny_unet(cross_attention=False)
    c.model.sample_steps = 5
    return c
