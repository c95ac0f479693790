"""The pieces text-to-image and text-to-video share: a denoiser (a U-Net, or an MMDiT whose text stream is
CLIP's states and whose pooled embedding CLIP's pooled state) under classifier-free guidance on CLIP text,
and the VAE between pixels and latents, as pure jittable functions of their params.

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
from jaxdiff.models import SD3Transformer2D
from jaxdiff.pipelines.runner import Runner
from jaxdiff.schedules import Schedule

# Image sides up to this many times a model's working size: memory grows with the pixel count squared
# (attention over the latent's positions), so a 1000 px image on a 32 px model would need ~250 GB.
MAX_SIZE_FACTOR = 2


def as_images(images, name: str = "images") -> jnp.ndarray:
    """uint8 or float [0, 1] images [B, H, W, 3] (or one [H, W, 3]) -> float32 [B, H, W, 3]."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name} must be RGB [B, H, W, 3] (or [H, W, 3]), got shape {a.shape}")
    if a.dtype == np.uint8:
        return jnp.asarray(a, jnp.float32) / 255.0
    if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError(f"{name} must be uint8 or floats in [0, 1], with no NaN or inf")
    return jnp.asarray(a, jnp.float32)


@dataclasses.dataclass
class LatentDiffusion:
    """Modules, their params, tokenizer, schedule and sampler defaults of a latent diffusion model. The
    denoiser is a U-Net (UNet2DCondition, TemporalUNet) or an MMDiT (SD3Transformer2D).

    `sampler_defaults` are `samplers.sample` keyword arguments (method, prediction_type,
    timestep_spacing, steps_offset, set_alpha_to_one, ...) that each call may override.
    """

    denoiser: Any
    denoiser_params: Any
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
        return (sd.denoiser, sd.denoiser_params, sd.vae, sd.vae_params, sd.text_encoder, sd.text_params, sd.tokenizer,
                schedule, {"method": "ddim", **defaults})

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def mmdit(self) -> bool:
        """Whether the denoiser is an MMDiT (its text: the states and the pooled state)."""
        return isinstance(self.denoiser, SD3Transformer2D)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling times the U-Net's (or the MMDiT's patch)."""
        c = self.denoiser.config
        return self.vae_scale_factor * (c.patch_size if self.mmdit else 2 ** (len(c.block_out_channels) - 1))

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def default_size(self) -> int:
        return (self.denoiser.config.sample_size or 64) * self.vae_scale_factor

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.tokenizer(list(prompts)), np.int32)

    def encode_text(self, text_params, ids):
        """Token ids [B, L] -> the denoiser's context: CLIP's last hidden state [B, L, D], and for an MMDiT also
        its pooled state [B, D]."""
        states, pooled = self.text_encoder.apply({"params": text_params}, ids)[:2]
        return (states, pooled) if self.mmdit else states

    def guided_model(self, denoiser_params, text_params, ids, uncond_ids, scale, rescale=0.0, extra_channels=None,
                     **denoiser_kwargs):
        """The denoiser under classifier-free guidance as a sampler's model_fn(x, t).

        extra_channels [B, h, w, K] are appended to x's channels (9-channel inpainting U-Nets);
        denoiser_kwargs hold per-example inputs [B, ...] such as a video U-Net's `cond_frames`. Both are
        repeated for the unconditional and conditional halves of the guided batch.
        """
        context, uncond = self.encode_text(text_params, ids), self.encode_text(text_params, uncond_ids)
        twice = lambda a: jnp.concatenate([a, a], axis=0)
        denoiser_kwargs = {k: twice(v) for k, v in denoiser_kwargs.items()}
        extra = None if extra_channels is None else twice(extra_channels)

        def apply_fn(x, t, ctx):
            x = x if extra is None else jnp.concatenate([x, extra], axis=-1)
            return self.denoiser.apply({"params": denoiser_params}, x, t, *(ctx if self.mmdit else (ctx,)),
                                       **denoiser_kwargs)

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

    @property
    def max_size(self) -> int:
        """The largest image side the pipelines accept: MAX_SIZE_FACTOR times the working size."""
        return MAX_SIZE_FACTOR * self.default_size

    def check_size(self, height: int, width: int, what: str = "height x width") -> None:
        """Sides must be positive multiples of `size_multiple` up to `max_size`; checked before any allocation."""
        m, top = self.size_multiple, self.max_size
        if height % m or width % m or not (0 < height <= top and 0 < width <= top):
            raise ValueError(f"{what} is {width}x{height}; this model takes positive multiples of {m} (the VAE's and "
                             f"U-Net's downsampling) up to {top}x{top} ({MAX_SIZE_FACTOR}x its working size "
                             f"{self.default_size}): resize it, e.g. to {self.default_size}x{self.default_size}")

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        self.check_size(height, width)
        f = self.vae_scale_factor
        return (batch, height // f, width // f, self.latent_channels)

    @property
    def params(self) -> tuple:
        """(unet, vae, text) params: every program's first argument."""
        return (self.denoiser_params, self.vae_params, self.text_params)
