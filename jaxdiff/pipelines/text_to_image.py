"""Text-to-image latent diffusion: CLIP text encoder -> cross-attention U-Net in VAE latent space
-> VAE decoder, with classifier-free guidance (negative prompts, guidance rescale).

    pipe = TextToImage.from_pretrained("path/to/stable-diffusion-folder")
    images = pipe(["a red circle"], negative_prompts=["blurry"], steps=25, guidance_scale=7.5, seed=0)

Each call runs one jitted program per (batch, size, steps, sampler) shape: prompt ids, seed,
guidance scale and rescale are traced arguments, so changing them never recompiles.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance, samplers
from jaxdiff.convert.scheduler import schedule_from_config
from jaxdiff.schedules import Schedule


@dataclasses.dataclass
class TextToImage:
    """A latent text-to-image model: modules, their params, tokenizer, schedule and sampler defaults.

    `sampler_defaults` are `samplers.sample` keyword arguments (method, prediction_type,
    timestep_spacing, steps_offset, ...) that each call may override.
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
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(cls, path: str) -> "TextToImage":
        """From a diffusers Stable Diffusion folder (see `jaxdiff.convert.load_pipeline`)."""
        from jaxdiff.convert import load_pipeline

        sd = load_pipeline(path)
        schedule, defaults = schedule_from_config(sd.scheduler_config)
        return cls(sd.unet, sd.unet_params, sd.vae, sd.vae_params, sd.text_encoder, sd.text_params, sd.tokenizer,
                   schedule, {"method": "ddim", **defaults})

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.tokenizer(list(prompts)), np.int32)

    def encode_text(self, text_params, ids):
        """Token ids [B, L] -> the U-Net's context [B, L, D] (CLIP's last hidden state)."""
        return self.text_encoder.apply({"params": text_params}, ids)[0]

    def decode(self, vae_params, latents):
        """Diffusion latents [B, h, w, C] -> images in [0, 1], [B, H, W, 3] float32."""
        c = self.vae.config
        z = latents / c.scaling_factor + (c.shift_factor or 0.0)
        x = self.vae.apply({"params": vae_params}, z, method=self.vae.decode)
        return jnp.clip(x / 2.0 + 0.5, 0.0, 1.0)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} (the VAE's downsampling), "
                             f"got {height}x{width}")
        return (batch, height // f, width // f, self.unet.config.in_channels)

    def _program(self, steps: int, sampler: tuple):
        """The whole generation as one jitted function of traced inputs (cached per static setup)."""
        key = (steps, sampler, id(self.schedule))
        if key not in self._compiled:
            kwargs, schedule = dict(sampler), self.schedule

            def generate(params, ids, uncond_ids, noise, rng, scale, rescale):
                unet_params, vae_params, text_params = params
                context = self.encode_text(text_params, ids)
                uncond = self.encode_text(text_params, uncond_ids)
                apply_fn = lambda x, t, ctx: self.unet.apply({"params": unet_params}, x, t, ctx)
                model_fn = guidance.cfg(apply_fn, context, uncond, scale, rescale)
                latents = samplers.sample(model_fn, schedule, noise, key=rng, steps=steps, **kwargs)
                return self.decode(vae_params, latents), latents

            self._compiled[key] = jax.jit(generate)
        return self._compiled[key]

    def __call__(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *, steps: int = 25,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0, seed: int = 0,
                 height: int | None = None, width: int | None = None, noise=None, return_latents: bool = False,
                 **sampler_kwargs):
        """Images [B, H, W, 3] in [0, 1] for prompts; `noise` [B, h, w, C] overrides the seed's latents."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        negative = [""] * len(prompts) if negative_prompts is None else (
            [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts))
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one per prompt")
        sample_size = self.unet.config.sample_size * self.vae_scale_factor
        shape = self.latent_shape(len(prompts), height or sample_size, width or sample_size)
        if noise is None:
            noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        sampler = tuple(sorted({**self.sampler_defaults, **sampler_kwargs}.items()))
        program = self._program(steps, sampler)
        params = (self.unet_params, self.vae_params, self.text_params)
        images, latents = program(params, self.tokenize(prompts), self.tokenize(negative), jnp.asarray(noise),
                                  jax.random.key(seed + 1), jnp.float32(guidance_scale), jnp.float32(guidance_rescale))
        return (images, latents) if return_latents else images
