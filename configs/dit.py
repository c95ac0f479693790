"""Latent diffusion with a DiT backbone (Peebles & Xie 2023) cross-attending to CLIP text (as PixArt-alpha).

  python -m train --config configs/dit.py:tiny --workdir /tmp/dit
"""
from configs import common
from jaxdiff.training.config import base_config


def get_config(variant: str = "tiny"):
    c = base_config()
    c.recipe = "diffusion"
    c.model = common.diffusion_model("dit", "latent")
    if variant != "tiny":
        raise ValueError(f"unknown variant {variant!r} of configs/dit.py; choose one of: tiny")
    common.tiny_run(c)
    c.model.dit = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, context_dim=16)
    c.model.vae = dict(common.tiny_vae(), checkpoint="")
    c.model.text_encoder = dict(common.tiny_text_encoder(), checkpoint="")
    c.model.sample_steps = 5
    return c
