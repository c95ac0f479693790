"""Latent text-to-video / image-to-video diffusion on `moving_shapes`: a TemporalUNet in the frozen
shapes VAE's latent space (every frame encoded and decoded by the image VAE), the frozen shapes
CLIP text encoder, caption dropout for classifier-free guidance, and image dropout for the
first-frame conditioning (conditioning_frame_channels: 4 latent channels + 1 indicator).

  python -m jaxdiff.data.prepare moving_shapes --resolution 32 --num_frames 8          # once: moving_shapes/32px-8f
  python -m train --config configs/video_diffusion.py:scratch --workdir runs/vd_scratch    # video U-Net from scratch
  python -m train --config configs/video_diffusion.py:inflated --workdir runs/vd_inflated  # from the shipped model

The `inflated` variant starts from the shipped U-Net model (jaxdiff/assets/shapes_unet, the `emphasis`
fine-tune of configs/latent_diffusion.py exported: its U-Net inflated, so that before training it is that
U-Net on every frame, with its objective, v-prediction to a zero-terminal-SNR schedule); both variants use the same architecture and the shipped VAE and text encoder. Tests and smoke runs (seconds; prepare the tiny dataset first):

  python -m jaxdiff.data.prepare moving_shapes --resolution 16 --num_frames 4 --train_size 16 \
      --validation_size 2 --test_size 2 --data_dir /tmp/tfds
  python -m train --config configs/video_diffusion.py:tiny --workdir /tmp/vd --config.data.data_dir=/tmp/tfds
  python -m train --config configs/video_diffusion.py:tiny_inflated --workdir /tmp/vdi \
      --config.data.data_dir=/tmp/tfds --config.model.init_from=/tmp/ld    # /tmp/ld: a tiny latent_diffusion run
"""
import ml_collections

from configs import common
from configs.latent_diffusion import SCALING_FACTOR, SHIPPED_UNET
from jaxdiff.training.config import base_config

VARIANTS = ("scratch", "inflated", "tiny", "tiny_inflated")
PREVIEW_PROMPTS = ("a red circle moving left", "a blue square moving up", "a green triangle moving right",
                   "a yellow circle moving down", "a purple square moving right and a cyan circle moving left",
                   "a large red triangle moving up")
TINY_DATA = "moving_shapes/16px-4f-16-2-2-seed0"
# PYoCo's mixed noise prior (Ge et al. 2023): 80% of the noise's variance shared by a video's frames. With
# independent noise per frame the inflated U-Net drew a different scene on every frame (objects kept their
# colour and shape in 2 of the first 8 held-out videos after 1000 steps; 14 of 16 when that model was merely
# sampled from 0.9-correlated noise). Trained with it, 12 of 16 at steps 500 and 1000; after 4000 steps the
# full evaluation (0.46) matched the independent-noise run's (0.44): see docs/video.md.
FRAME_NOISE_CORRELATION = 0.8


def video_data(name: str, image_size: int, data_dir: str = "", prompts=PREVIEW_PROMPTS) -> ml_collections.ConfigDict:
    """A moving_shapes config through the shapes pipeline: batch['image'] [B, T, H, W, 3]."""
    return ml_collections.ConfigDict(dict(source="shapes", name=name, data_dir=data_dir, image_size=image_size,
                                          max_length=16, worker_count=0, preview_prompts=tuple(prompts)))


def get_config(variant: str = "scratch"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/video_diffusion.py; choose one of: "
                         f"{', '.join(VARIANTS)}")
    c = base_config()
    c.recipe = "diffusion"
    c.model = common.diffusion_model("temporal_unet", "latent", frame_noise_correlation=FRAME_NOISE_CORRELATION)
    video_only = dict(frame_position_embedding="sinusoidal", conditioning_frame_channels=5)
    if variant.startswith("tiny"):
        common.tiny_run(c)
        c.data = video_data(TINY_DATA, 16, prompts=PREVIEW_PROMPTS[:2])
        c.batch_size = 4
        c.model.vae = dict(common.tiny_vae(), checkpoint="")
        c.model.text_encoder = dict(common.tiny_text_encoder(), checkpoint="")
        c.model.sample_steps = 3
        if variant == "tiny":
            # common.tiny_unet(cross_attention=True) as a video U-Net (what tiny_inflated inflates)
            c.model.temporal_unet = dict(
                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, num_attention_heads=2,
                attention_head_dim=8, cross_attention_dim=16, norm_num_groups=8, **video_only)
        else:
            c.model.temporal = video_only    # set --config.model.init_from to a tiny latent_diffusion run
        return c
    c.data = video_data("moving_shapes/32px-8f", 32)
    c.batch_size, c.ema_decay = 16, 0.999
    c.checkpoint_every, c.sample_every, c.log_every = 500, 1000, 50
    c.model.vae = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                       scaling_factor=SCALING_FACTOR, checkpoint=SHIPPED_UNET)
    c.model.text_encoder = dict(hidden_size=128, intermediate_size=512, projection_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, checkpoint=SHIPPED_UNET)
    if variant == "scratch":
        c.steps = 15000
        c.optim.lr, c.optim.warmup_steps = 3e-4, 500
        # configs/latent_diffusion.py's U-Net with temporal layers: what `inflated` gets by inflation
        # (4 heads per block; transformer_in: 8 heads of width 64 / 4 = 16).
        c.model.temporal_unet = dict(
            block_out_channels=(64, 128), down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
            up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"), layers_per_block=1, num_attention_heads=4,
            attention_head_dim=16, cross_attention_dim=128, norm_num_groups=16, **video_only)
    else:
        # Batch 4 (32 frames): 1.3 s/step on the 2-core machine, 24 frames/s; batch 16 ran at ~9 s/step.
        # At lr 1e-4 and image_dropout 0.1 the frames were still unrelated at step 1000 (the zero-initialised
        # temporal layers grow slowly, and text-only videos were a tenth of the batches): a higher peak,
        # and half of the batches without the conditioning frame.
        c.steps, c.batch_size, c.sample_every = 4000, 4, 2000
        c.optim.lr, c.optim.warmup_steps = 3e-4, 200
        c.model.image_dropout = 0.5
        c.model.init_from = SHIPPED_UNET
        c.model.temporal = video_only
        # the objective the shipped U-Net was fine-tuned to (configs/latent_diffusion.py:emphasis): min-SNR
        # weighting would give the pure-noise end, where the motion is laid out, weight ~0
        c.model.update(prediction_type="v_prediction", rescale_zero_terminal_snr=True, weighting="simple")
    return c
