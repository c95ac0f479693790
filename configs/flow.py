"""Rectified-flow matching (Lipman et al. 2023; Liu et al. 2023) in pixel space with a U-Net,
logit-normal timesteps (Esser et al. 2024).

  python -m train --config configs/flow.py:tiny --workdir /tmp/flow
"""
from configs import common
from jaxdiff.training.config import base_config


def get_config(variant: str = "tiny"):
    c = base_config()
    c.recipe = "diffusion"
    c.model = common.diffusion_model("unet", "pixel", prediction_type="flow")
    if variant != "tiny":
        raise ValueError(f"unknown variant {variant!r} of configs/flow.py; choose one of: tiny")
    common.tiny_run(c)
    c.model.unet = common.tiny_unet(cross_attention=False)
    c.model.sample_steps = 5
    return c
