"""The KL autoencoder: L1 + Laplacian-pyramid perceptual loss + KL, patch-GAN after a warm-up.

  python -m train --config configs/vae.py --workdir runs/vae_shapes   # the shapes VAE
  python -m train --config configs/vae.py:tiny --workdir /tmp/vae          # seconds, synthetic squares
"""
import ml_collections

from configs import common
from jaxdiff.training.config import base_config


def get_config(variant: str = "shapes"):
    c = base_config()
    c.recipe = "vae"
    c.model = ml_collections.ConfigDict(dict(kl_weight=1e-6, perceptual_weight=1.0, pyramid_levels=3, disc_channels=32,
                                             disc_layers=2, disc_weight=0.1, disc_start=2000))
    if variant == "tiny":
        common.tiny_run(c)
        c.model.vae = common.tiny_vae()
        c.model.disc_channels, c.model.disc_start = 8, 10
        return c
    if variant != "shapes":
        raise ValueError(f"unknown variant {variant!r} of configs/vae.py; choose one of: shapes, tiny")
    c.data = common.shapes_data()
    c.steps, c.batch_size = 6000, 32
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 4e-4, 200, 0.0
    c.checkpoint_every, c.log_every = 500, 50
    c.model.vae = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                       scaling_factor=1.0)
    return c
