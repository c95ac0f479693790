"""The pieces text-to-image and text-to-video share: a U-Net under classifier-free guidance on CLIP
text, and the VAE between pixels and latents, as pure jittable functions of their params.

`TextToImage` and `TextToVideo` are both `LatentDiffusion`s, each with its own `generate`; neither
extends the other. Each owns a `Runner` (`jaxdiff.pipelines.runner`) that compiles and runs its programs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance
from jaxdiff.convert.scheduler import schedule_from_config
from jaxdiff.pipelines.runner import Runner
from jaxdiff.schedules import Schedule


@dataclasses.dataclass
class LatentDiffusion:
    """Modules, their params, tokenizer, schedule and sampler defaults of a latent diffusion model.

    `sampler_defaults` are `samplers.sample` keyword arguments (method, prediction_type,
    timestep_spacing, steps_offset, set_alpha_to_one, ...) that each call may override.
    """

    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_params: Any
    tokenizer: Any
    schedule: Schedule
    sampler_defaults: dict = dataclasses.field(default_factory=dict)
    runner: Runner = dataclasses.field(default_factory=Runner, init=False, repr=False, compare=False)

    @classmethod
    def _components(cls, path: str, **load_kwargs) -> tuple:
        """The constructor's positional fields from a diffusers folder (see `jaxdiff.convert.load_pipeline`);
        the folder's scheduler gives the schedule and the sampler defaults (DDIM where it names no sampler)."""
        from jaxdiff.convert import load_pipeline

        sd = load_pipeline(path, **load_kwargs)
        schedule, defaults = schedule_from_config(sd.scheduler_config)
        return (sd.unet, sd.unet_params, sd.vae, sd.vae_params, sd.text_encoder, sd.text_params, sd.tokenizer,
                schedule, {"method": "ddim", **defaults})

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's and the U-Net's downsampling together."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def default_size(self) -> int:
        return (self.unet.config.sample_size or 64) * self.vae_scale_factor

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.tokenizer(list(prompts)), np.int32)

    def encode_text(self, text_params, ids):
        """Token ids [B, L] -> the U-Net's context [B, L, D] (CLIP's last hidden state)."""
        return self.text_encoder.apply({"params": text_params}, ids)[0]

    def guided_model(self, unet_params, text_params, ids, uncond_ids, scale, rescale=0.0, extra_channels=None,
                     **unet_kwargs):
        """The U-Net under classifier-free guidance as a sampler's model_fn(x, t).

        extra_channels [B, h, w, K] are appended to x's channels (9-channel inpainting U-Nets);
        unet_kwargs hold per-example inputs [B, ...] such as a video U-Net's `cond_frames`. Both are
        repeated for the unconditional and conditional halves of the guided batch.
        """
        context, uncond = self.encode_text(text_params, ids), self.encode_text(text_params, uncond_ids)
        twice = lambda a: jnp.concatenate([a, a], axis=0)
        unet_kwargs = {k: twice(v) for k, v in unet_kwargs.items()}
        extra = None if extra_channels is None else twice(extra_channels)

        def apply_fn(x, t, ctx):
            x = x if extra is None else jnp.concatenate([x, extra], axis=-1)
            return self.unet.apply({"params": unet_params}, x, t, ctx, **unet_kwargs)

        return guidance.cfg(apply_fn, context, uncond, scale, rescale)

    def encode_image(self, vae_params, images):
        """Images in [0, 1], [B, H, W, 3] -> diffusion latents (the posterior mean, scaled)."""
        c = self.vae.config
        mean, _ = self.vae.apply({"params": vae_params}, images * 2.0 - 1.0, method=self.vae.encode)
        return (mean - (c.shift_factor or 0.0)) * c.scaling_factor

    def decode(self, vae_params, latents):
        """Diffusion latents [B, h, w, C] -> images in [0, 1], [B, H, W, 3] float32."""
        c = self.vae.config
        z = latents / c.scaling_factor + (c.shift_factor or 0.0)
        x = self.vae.apply({"params": vae_params}, z, method=self.vae.decode)
        return jnp.clip(x / 2.0 + 0.5, 0.0, 1.0)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        m, f = self.size_multiple, self.vae_scale_factor
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {m} (the VAE's and U-Net's "
                             f"downsampling), got {height}x{width}")
        return (batch, height // f, width // f, self.latent_channels)

    @property
    def params(self) -> tuple:
        """(unet, vae, text) params: every program's first argument."""
        return (self.unet_params, self.vae_params, self.text_params)
