"""Latent text-to-image flow matching with an MMDiT (SD3's joint text-image transformer, Esser et al. 2024):
the text tokens and the image's patch tokens attend jointly in every block, each image token knows its place
(2-D sin-cos positions), trained with rectified flow and logit-normal timesteps.

  python -m train --config configs/mmdit.py --workdir runs/mmdit_shapes        # on the shapes data
  python -m train --config configs/mmdit.py:t5 --workdir runs/mmdit_t5           # text from a T5 trained alongside
  python -m train --config configs/mmdit.py:layout --workdir runs/mmdit_layout   # the t5 run + layout maps
  python -m train --config configs/mmdit.py:tiny --workdir /tmp/mmdit           # seconds, synthetic squares

`shapes` works in the shipped model's VAE latent space (16x16x4 for 32 px images) and reads the shipped
CLIP text encoder's states (frozen): both from jaxdiff/assets/shapes_unet. `t5` reads instead the states of a
bidirectional T5 encoder (4 layers, 128 wide) trained from scratch with the transformer, the frozen CLIP giving
only the pooled embedding (Flux's split): every caption word sees every other before the image does, where the
causal CLIP's state of the first object cannot see the relation word after it. `tiny_t5`: the tiny run so.
`layout`: the `t5` run (runs/mmdit_t5) fine-tuned to also read each scene's layout map (every object's box painted
into its colour's and shape's channels, jaxdiff.data.layout), appended to the latent's channels with zero weights at
the start; a caption -> layout model (configs/layout.py) draws the map at sampling. The shipped model
(jaxdiff/assets/shapes) is this run and configs/layout.py's, exported with --layout (docs/shipped-model-history.md).
"""
from configs import common
from configs.latent_diffusion import SCALING_FACTOR
from jaxdiff.pipelines import SHAPES_UNET_MODEL as SHIPPED_UNET
from jaxdiff.training.config import base_config

VARIANTS = ("shapes", "t5", "layout", "tiny", "tiny_t5")


def get_config(variant: str = "shapes"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/mmdit.py; choose one of: {', '.join(VARIANTS)}")
    c = base_config()
    c.recipe = "diffusion"
    c.model = common.diffusion_model("mmdit", "latent", prediction_type="flow", guidance_scale=5.0)
    if variant.startswith("tiny"):
        common.tiny_run(c)
        c.model.mmdit = dict(patch_size=2, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                             caption_projection_dim=16, pos_embed_max_size=None)
        c.model.vae = dict(common.tiny_vae(), checkpoint="")
        c.model.text_encoder = dict(common.tiny_text_encoder(), checkpoint="")
        c.model.sample_steps = 5
        if variant == "tiny_t5":
            c.model.t5 = dict(d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2, feed_forward_proj="gated-gelu")
        return c
    c.data = common.shapes_data()
    c.steps, c.batch_size = 20000, 32
    c.optim.lr, c.optim.warmup_steps, c.ema_decay = 3e-4, 500, 0.999
    c.checkpoint_every, c.sample_every, c.log_every, c.keep_checkpoints = 250, 2000, 50, 3
    c.model.mmdit = dict(patch_size=2, num_layers=6, attention_head_dim=32, num_attention_heads=6,
                         caption_projection_dim=192, pos_embed_max_size=None)
    c.model.vae = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                       scaling_factor=SCALING_FACTOR, checkpoint=SHIPPED_UNET)
    c.model.text_encoder = dict(hidden_size=128, intermediate_size=512, projection_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, checkpoint=SHIPPED_UNET)
    if variant in ("t5", "layout"):
        c.model.t5 = dict(d_model=128, d_kv=32, num_heads=4, d_ff=512, num_layers=4, feed_forward_proj="gated-gelu")
    if variant == "layout":
        c.data.layout, c.model.init_from = True, common.run_dir("mmdit_t5")
        c.steps, c.optim.lr, c.optim.warmup_steps = 6000, 1e-4, 200
    return c
