"""Latent text-to-video flow matching with Wan's video transformer (Wan Team 2025) on `moving_shapes`: the
latent video is cut into (1, 2, 2) patches that attend to each other across frames and space at once (3-D RoPE),
cross-attending to the text; trained with rectified flow, logit-normal timesteps and a time shift.

  python -m jaxdiff.data.prepare moving_shapes --resolution 32 --num_frames 8          # once: moving_shapes/32px-8f
  python -m train --config configs/wan.py --workdir runs/wan_shapes
  python -m jaxdiff.training.export --workdir runs/wan_shapes --out wan_model
  python -m sample --video "a red circle moving left" --model wan_model --out clip.gif

As configs/video_diffusion.py's video U-Net, it works in the shipped model's VAE latent space, every frame
encoded and decoded by the image VAE (8 frames of 16x16x4 latents for 32 px videos: 8 x 8 x 8 = 512 patch tokens),
and reads the shipped CLIP text encoder's states as its context (text_dim 128); both frozen, from
jaxdiff/assets/shapes_unet. Tests and smoke runs (seconds; prepare the tiny dataset first, as for video_diffusion):

  python -m train --config configs/wan.py:tiny --workdir /tmp/wan --config.data.data_dir=/tmp/tfds

A run continues from a Wan run or model folder (config.model.init_from: its transformer and T5, the same
config.model.wan and t5; the patch embedding grows zero rows for layout channels the source did not read), e.g. the
shipped video model on a fresh schedule:

  python -m train --config configs/wan.py:layout --workdir runs/wan_more \\
      --config.model.init_from=jaxdiff/assets/shapes_video --config.steps=2700 --config.optim.lr=2e-4 \\
      --config.optim.warmup_steps=100
"""
from configs import common
from configs.latent_diffusion import SCALING_FACTOR, SHIPPED_UNET
from configs.video_diffusion import PREVIEW_PROMPTS, TINY_DATA, video_data
from jaxdiff.training.config import base_config

VARIANTS = ("shapes", "t5", "layout", "tiny", "tiny_t5", "tiny_layout")
# `layout`: `t5` reading each frame's layout map beside its latent (config.data.layout: the objects' boxes where they
# are at that frame, from moving_shapes' trajectories; a caption -> trajectory model draws them at sampling, as the
# image model's layout stage does), since `t5` alone bound no direction to its object in two-object prompts
# `t5`: the Wan transformer cross-attends to a bidirectional T5 encoder trained with it (Wan's UMT5 role) instead of
# the frozen CLIP, whose states barely tell "moving left" from "moving right" (docs/video.md)
T5 = dict(d_model=128, d_kv=32, num_heads=4, d_ff=512, num_layers=4, feed_forward_proj="gated-gelu")
TINY_T5 = dict(d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2, feed_forward_proj="gated-gelu")
# SD3's resolution rule for the time shift, sqrt(tokens / 256) (Esser et al. 2024, 5.3.2): 512 patch tokens per
# video; the mmdit recipe's 256-token images train unshifted.
FLOW_SHIFT = 2.0 ** 0.5


def get_config(variant: str = "shapes"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/wan.py; choose one of: {', '.join(VARIANTS)}")
    c = base_config()
    c.recipe = "diffusion"
    c.model = common.diffusion_model("wan", "latent", prediction_type="flow", flow_shift=FLOW_SHIFT,
                                     guidance_scale=5.0)
    if variant.startswith("tiny"):
        common.tiny_run(c)
        c.data = video_data(TINY_DATA, 16, prompts=PREVIEW_PROMPTS[:2])
        c.batch_size, c.optim.lr = 4, 3e-3
        c.model.wan = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, ffn_dim=64,
                           freq_dim=32, num_layers=2)
        c.model.vae = dict(common.tiny_vae(), checkpoint="")
        c.model.text_encoder = dict(common.tiny_text_encoder(), checkpoint="")
        c.model.sample_steps = 3
        if variant in ("tiny_t5", "tiny_layout"):
            c.model.t5, c.model.text_encoder = TINY_T5, None
        c.data.layout = variant == "tiny_layout"
        return c
    c.data = video_data("moving_shapes/32px-8f", 32)
    # 0.86 steps/s at batch 8 alone on the 2 cores (a 60-step smoke run, blocked attention; 0.32 before it): ~3.2 h
    c.steps, c.batch_size, c.ema_decay = 10000, 8, 0.999
    c.optim.lr, c.optim.warmup_steps = 3e-4, 500
    c.checkpoint_every, c.sample_every, c.log_every, c.keep_checkpoints = 500, 2000, 50, 3
    c.model.wan = dict(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=32, ffn_dim=768,
                       freq_dim=256, num_layers=6)
    c.model.vae = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                       scaling_factor=SCALING_FACTOR, checkpoint=SHIPPED_UNET)
    c.model.text_encoder = dict(hidden_size=128, intermediate_size=512, projection_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, checkpoint=SHIPPED_UNET)
    if variant in ("t5", "layout"):
        c.model.t5, c.model.text_encoder = T5, None
    c.data.layout = variant == "layout"
    if variant == "layout":   # 2.1 s/step alone on the 2 cores (2026-12-07): ~1.8 h, a checkpoint every ~5 min
        c.steps, c.checkpoint_every, c.optim.warmup_steps = 3000, 150, 300
    return c
