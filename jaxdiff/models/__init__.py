"""Flax Linen models (channels-last): U-Net, video U-Net, VAE, Wan's video VAE, DiT, MMDiT (SD3), Flux, Wan, CLIP, T5 and their building blocks."""
from jaxdiff.models.dit import DiT, DiTConfig
from jaxdiff.models.unet import UNet2DCondition, UNetConfig
from jaxdiff.models.temporal_unet import TemporalUNet, TemporalUNetConfig, frame_conditioning, inflate
from jaxdiff.models.vae import AutoencoderKL, AutoencoderKLConfig
from jaxdiff.models.wan_vae import AutoencoderKLWan, AutoencoderKLWanConfig
from jaxdiff.models.clip import (CLIPConfig, CLIPModel, CLIPOutput, CLIPTextConfig, CLIPTextModel,
                                 CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel, clip_loss,
                                 zero_shot_classify)
from jaxdiff.models.mmdit import SD3Config, SD3Transformer2D
from jaxdiff.models.flux import FluxConfig, FluxTransformer2D
from jaxdiff.models.wan import WanConfig, WanTransformer3D
from jaxdiff.models.t5 import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
