"""Latent text-to-image diffusion: a U-Net in a frozen VAE's latent space, a frozen CLIP text encoder,
caption dropout for classifier-free guidance.

  python -m train --config configs/latent_diffusion.py --workdir runs/ld_shapes             # the base shapes model
  python -m train --config configs/latent_diffusion.py:emphasis --workdir runs/ld_emphasis  # fine-tunes the shipped U-Net
  python -m train --config configs/latent_diffusion.py:tiny --workdir /tmp/ld               # seconds, synthetic squares

`shapes` trains from scratch on the frozen CLIP and VAE runs `runs/clip_shapes`, `runs/vae_shapes`
(configs/clip.py, configs/vae.py; the folder is $JAXDIFF_RUNS, default `runs`). `emphasis` is the
objective of the shipped U-Net's fine-tunes (README, "The shipped shapes models"): from the shipped U-Net folder
jaxdiff/assets/shapes_unet (its U-Net, VAE and text encoder), v-prediction to a schedule ending at SNR 0 (Lin et al. 2024), timesteps
drawn towards the noisy end, and captions with a place or relation word weighted 6 times in the loss.
"""
from configs import common
from jaxdiff.pipelines import SHAPES_UNET_MODEL as SHIPPED_UNET
from jaxdiff.training.config import base_config

# 1 / 1.028, the std of the shapes VAE's latents (step 4000) on 1000 test images
SCALING_FACTOR = 0.97
# the words of place and relation captions ("on the left", "a red circle to the left of a blue square")
PLACE_WORDS = ("left", "right", "top", "bottom", "above", "below")
VARIANTS = ("shapes", "emphasis", "tiny")


def get_config(variant: str = "shapes"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/latent_diffusion.py; choose one of: "
                         f"{', '.join(VARIANTS)}")
    c = base_config()
    c.recipe = "diffusion"
    c.model = common.diffusion_model("unet", "latent")
    if variant == "tiny":
        common.tiny_run(c)
        c.model.unet = common.tiny_unet(cross_attention=True)
        c.model.vae = dict(common.tiny_vae(), checkpoint="")
        c.model.text_encoder = dict(common.tiny_text_encoder(), checkpoint="")
        c.model.sample_steps = 5
        return c
    c.data = common.shapes_data()
    c.steps, c.batch_size = 15000, 32
    c.optim.lr, c.optim.warmup_steps, c.ema_decay = 3e-4, 500, 0.999
    c.checkpoint_every, c.sample_every, c.log_every = 500, 1000, 50
    # Cross-attention at the 8x8 latent level and the middle only: the 16x16 level's transformer
    # blocks cost a quarter of the FLOPs and positions are already resolved at 8x8.
    c.model.unet = dict(block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                        num_attention_heads=4, cross_attention_dim=128, norm_num_groups=16)
    c.model.vae = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                       scaling_factor=SCALING_FACTOR, checkpoint=common.run_dir("vae_shapes"))
    c.model.text_encoder = dict(hidden_size=128, intermediate_size=512, projection_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, checkpoint=common.run_dir("clip_shapes"))
    if variant == "emphasis":
        c.model.update(init_from=SHIPPED_UNET, rescale_zero_terminal_snr=True, prediction_type="v_prediction",
                       weighting="simple", timestep_distribution="logit_normal", timestep_logit_mean=0.5,
                       emphasis_words=PLACE_WORDS, emphasis_weight=6.0)
        c.model.vae.checkpoint = c.model.text_encoder.checkpoint = SHIPPED_UNET
        c.steps, c.optim.lr, c.optim.warmup_steps = 6000, 5e-4, 200
    return c
