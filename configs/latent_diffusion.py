"""Latent text-to-image diffusion: U-Net in a frozen VAE's latent space, frozen CLIP text encoder,
caption dropout for classifier-free guidance.

  python -m train --config configs/latent_diffusion.py --workdir /work/runs/ld_shapes   # the shapes model
  python -m train --config configs/latent_diffusion.py:zero_snr --workdir /work/runs/ld_shapes_zsnr  # fine-tunes it
  python -m train --config configs/latent_diffusion.py:joint_text --workdir /work/runs/ld_shapes_joint
  python -m train --config configs/latent_diffusion.py:coordinates --workdir /work/runs/ld_coords
  python -m train --config configs/latent_diffusion.py:context --workdir /work/runs/ld_context
  python -m train --config configs/latent_diffusion.py:positions --workdir /work/runs/ld_positions
  python -m train --config configs/latent_diffusion.py:emphasis --workdir /work/runs/ld_emphasis
  python -m train --config configs/latent_diffusion.py:grounding --workdir /work/runs/ld_grounding
  python -m train --config configs/latent_diffusion.py:terminal_means --workdir /work/runs/ld_terminal
  python -m train --config configs/latent_diffusion.py:mirror_pairs --workdir /work/runs/ld_mirror
  python -m train --config configs/latent_diffusion.py:tiny --workdir /tmp/ld          # seconds, synthetic squares

The fine-tunes start from the shipped folder (jaxdiff/assets/shapes: its U-Net, VAE and CLIP text encoder).
Until commit 4382459 that was the `shapes` run's EMA (the base model), which every run README reports
started from; since, it is the `emphasis` fine-tune (README, "The shipped shapes model"). `zero_snr` fine-tunes that U-Net on the hard-negative CLIP of configs/clip.py:negatives,
to a schedule that ends at SNR 0 with v-prediction (Lin et al. 2024). The `shapes` model ignores
place and relation words (same seed, "on the left" and "on the right": the same image, objects
where the initial noise's low frequencies put them): its CLIP's text features barely tell those
words apart (zero-shot, a caption beats its left/right-swapped twin for 0.50 of test images), and
scaled_linear's last timestep keeps sqrt(0.0047) of the latent, enough to read the layout off
the noise instead of the text. `joint_text` is `zero_snr` with the text encoder trained along
(config.model.text_encoder.trainable), so the diffusion loss itself can make those words count.
Neither taught the model positions in 2000-3000 steps (README, "Why positions fail").
`coordinates` is `zero_snr` on the shipped CLIP with the U-Net's input_coordinates added: two input
channels holding each latent pixel's x and y, since zero-padded convolutions tell the middle columns of
the 16x16 latent apart barely (on pure noise at t = 999, a linear probe on the 8x8 features the
cross-attention sees tells left from right at chance for the two centre columns). `context` adds two
bidirectional transformer layers over the text states (unet.context_layers, gated from 0): in the causal
CLIP the noun's state, which the U-Net reads most, cannot see the place words that follow it.
`positions` adds unet.attention_positions (each attention's input gets a 2-D sinusoidal embedding of
the pixel's place, gained from 0) and weighs the captions with a place or relation word 3 times in the
loss, with timesteps drawn towards the noisy end, where the layout is decided. `emphasis` is that objective
(weight 6, lr 5e-4, the settings `positions` was resumed with) on a plain, diffusers-loadable U-Net: the
position gains turned out not to matter (README). `grounding` adds to `emphasis` a grounding loss on the
cross-attention maps (TokenCompose, Wang et al. 2024): each caption token's attention is pulled into the
pixels of the objects its words describe (`jaxdiff.data.grounding`), a direct gradient for place and
relation words where the denoising loss gives a faint, saddle-shaped one. `terminal_means` adds to
`emphasis` caption-mean targets at pure noise (config.model.terminal_mean_share): a quarter of each batch
is trained at the last timestep against the mean latent of its caption's training images, the exact best
prediction there, which is the layout prior (red mass on the left for "... on the left") that sampling
starts from and that the ordinary loss teaches one noisy example at a time. `mirror_pairs` trains `emphasis`
on minimal pairs (config.model.mirror_pairs 'flip'): half of each batch is the other half flipped, its place
and relation words swapped, noised alike, so the pair's difference is carried by those words alone.
"""
import ml_collections

from configs import common
from jaxdiff.pipelines import SHAPES_MODEL as SHIPPED   # the `shapes` runs, exported
from jaxdiff.training.config import base_config

# 1 / 1.028, the std of the shapes VAE's latents (step 4000) on 1000 test images
SCALING_FACTOR = 0.97
# the words of place and relation captions ("on the left", "a red circle to the left of a blue square")
PLACE_WORDS = ("left", "right", "top", "bottom", "above", "below")
# grounding: the cross-attention grounding loss's weight beside the v-prediction loss (~0.1 here)
GROUNDING_WEIGHT = 0.05
# terminal_means: the share of each batch trained at pure noise against its caption's mean latent
TERMINAL_MEAN_SHARE = 0.25
VARIANTS = ("shapes", "zero_snr", "joint_text", "coordinates", "context", "positions", "emphasis", "grounding",
            "terminal_means", "mirror_pairs")


def get_config(variant: str = "shapes"):
    c = base_config()
    c.recipe = "diffusion"
    c.model = ml_collections.ConfigDict(dict(backbone="unet", space="latent", **common.diffusion_objective()))
    if variant == "tiny":
        common.tiny_run(c)
        c.model.unet = common.tiny_unet(cross_attention=True)
        c.model.vae = dict(common.tiny_vae(), checkpoint="")
        c.model.text_encoder = dict(common.tiny_text_encoder(), checkpoint="")
        c.model.sample_steps = 5
        return c
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/latent_diffusion.py; choose one of: "
                         f"{', '.join(VARIANTS)}, tiny")
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
                       scaling_factor=SCALING_FACTOR, checkpoint="/work/runs/vae_shapes")
    c.model.text_encoder = dict(hidden_size=128, intermediate_size=512, projection_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, checkpoint="/work/runs/clip_shapes", trainable=False)
    if variant != "shapes":
        # Fine-tunes of the shipped model to a schedule ending at SNR 0 with v-prediction (Lin et al. 2024)
        c.model.update(init_from=SHIPPED, rescale_zero_terminal_snr=True, prediction_type="v_prediction",
                       weighting="simple")
        c.model.vae.checkpoint = c.model.text_encoder.checkpoint = SHIPPED
        c.steps, c.optim.lr, c.optim.warmup_steps = 6000, 2e-4, 200
    if variant in ("zero_snr", "joint_text"):
        c.model.text_encoder.checkpoint = "/work/runs/clip_shapes_neg"
        c.model.text_encoder.trainable = variant == "joint_text"
    if variant in ("coordinates", "context"):
        c.model.unet.input_coordinates = True
    if variant == "context":
        c.model.unet.context_layers = 2
    if variant in ("positions", "emphasis", "grounding", "terminal_means", "mirror_pairs"):
        c.model.update(emphasis_words=PLACE_WORDS, emphasis_weight=3.0, timestep_distribution="logit_normal",
                       timestep_logit_mean=0.5)
        c.steps, c.optim.lr = 4000, 3e-4
    if variant == "positions":
        c.model.unet.attention_positions = True
    if variant in ("emphasis", "grounding", "terminal_means", "mirror_pairs"):
        c.model.emphasis_weight, c.optim.lr = 6.0, 5e-4
    if variant == "grounding":
        c.data.token_masks = 16     # the latent side: 32 px through the VAE's f = 2
        c.model.grounding_weight = GROUNDING_WEIGHT
    if variant == "terminal_means":
        c.model.terminal_mean_share = TERMINAL_MEAN_SHARE
    if variant == "mirror_pairs":
        c.model.mirror_pairs = "flip"
    return c
