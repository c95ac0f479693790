"""Latent text-to-image flow matching with an MMDiT (SD3's joint text-image transformer, Esser et al. 2024):
the text tokens and the image's patch tokens attend jointly in every block, each image token knows its place
(2-D sin-cos positions), trained with rectified flow and logit-normal timesteps.

  python -m train --config configs/mmdit.py --workdir runs/mmdit_shapes        # on the shapes data
  python -m train --config configs/mmdit.py:tiny --workdir /tmp/mmdit           # seconds, synthetic squares

`shapes` works in the shipped model's VAE latent space (16x16x4 for 32 px images) and reads the shipped
CLIP text encoder's states (frozen): both from jaxdiff/assets/shapes.
"""
from configs import common
from configs.latent_diffusion import SCALING_FACTOR
from jaxdiff.pipelines import SHAPES_MODEL as SHIPPED
from jaxdiff.training.config import base_config

VARIANTS = ("shapes", "tiny")


def get_config(variant: str = "shapes"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/mmdit.py; choose one of: {', '.join(VARIANTS)}")
    c = base_config()
    c.recipe = "diffusion"
    c.model = common.diffusion_model("mmdit", "latent", prediction_type="flow", guidance_scale=5.0)
    if variant == "tiny":
        common.tiny_run(c)
        c.model.mmdit = dict(patch_size=2, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                             caption_projection_dim=16, pos_embed_max_size=None)
        c.model.vae = dict(common.tiny_vae(), checkpoint="")
        c.model.text_encoder = dict(common.tiny_text_encoder(), checkpoint="")
        c.model.sample_steps = 5
        return c
    c.data = common.shapes_data()
    c.steps, c.batch_size = 20000, 32
    c.optim.lr, c.optim.warmup_steps, c.ema_decay = 3e-4, 500, 0.999
    c.checkpoint_every, c.sample_every, c.log_every, c.keep_checkpoints = 250, 2000, 50, 3
    c.model.mmdit = dict(patch_size=2, num_layers=6, attention_head_dim=32, num_attention_heads=6,
                         caption_projection_dim=192, pos_embed_max_size=None)
    c.model.vae = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                       scaling_factor=SCALING_FACTOR, checkpoint=SHIPPED)
    c.model.text_encoder = dict(hidden_size=128, intermediate_size=512, projection_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, checkpoint=SHIPPED)
    return c
