"""Text-to-image latent diffusion: CLIP text encoder -> cross-attention U-Net in VAE latent space
-> VAE decoder, with classifier-free guidance (negative prompts, guidance rescale).

    pipe = TextToImage.from_pretrained("path/to/stable-diffusion-folder")
    images = pipe(["a red circle"], negative_prompts=["blurry"], steps=25, guidance_scale=7.5, seed=0)

Every request -- text-to-image here, img2img / inpainting / outpainting / editing in
`jaxdiff.pipelines.editing` -- runs through `generate`: one jitted program per static setup
(steps, sampler, strength, inpainting mode) and shape. Prompt ids, seeds, guidance scale and
rescale, images and masks are traced arguments, so changing them never recompiles.
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

INPAINT_MODES = (None, "blend", "channels")


def prompt_lists(prompts, negative_prompts) -> tuple[list[str], list[str]]:
    """Prompts and one negative prompt each ("" when none are given), checked."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    negative = [""] * len(prompts) if negative_prompts is None else (
        [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts))
    if len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one per prompt")
    return prompts, negative


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
    _progress: Any = dataclasses.field(default=None, repr=False)  # the live progress bar, if any

    @classmethod
    def from_pretrained(cls, path: str) -> "TextToImage":
        """From a diffusers Stable Diffusion folder (see `jaxdiff.convert.load_pipeline`)."""
        from jaxdiff.convert import load_pipeline

        sd = load_pipeline(path)
        schedule, defaults = schedule_from_config(sd.scheduler_config)
        return cls(sd.unet, sd.unet_params, sd.vae, sd.vae_params, sd.text_encoder, sd.text_params, sd.tokenizer,
                   schedule, {"method": "ddim", **defaults})

    # ------------------------------------------------------------------ pieces (pure, jittable)

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

    # ------------------------------------------------------------------ the one program

    def _on_step(self, step):
        """Host side of the progress bar: called from inside the sampling scan after every step."""
        if self._progress is not None:
            self._progress.update(int(step) - self._progress.n)

    def _program(self, steps: int, sampler: tuple, strength: float | None, inpaint: str | None, trajectory: bool,
                 progress: bool):
        """The whole generation as one jitted function of traced inputs (cached per static setup)."""
        key = (steps, sampler, strength, inpaint, trajectory, progress, id(self.schedule))
        if key in self._compiled:
            return self._compiled[key]
        kwargs, schedule = dict(sampler), self.schedule
        if progress:
            kwargs["callback"] = self._on_step

        def generate(params, ids, uncond_ids, noise, rng, scale, rescale, init_latents, latent_mask):
            unet_params, vae_params, text_params = params
            # a 9-channel inpainting U-Net sees [x_t | mask | masked image latents]
            extra = jnp.concatenate([latent_mask, init_latents], axis=-1) if inpaint == "channels" else None
            model_fn = self.guided_model(unet_params, text_params, ids, uncond_ids, scale, rescale, extra)
            extra_kwargs = {}
            if strength is not None:
                extra_kwargs.update(x_init=init_latents, strength=strength)
            if inpaint == "blend":
                extra_kwargs["hook"] = samplers.mask_blend(init_latents, latent_mask, noise)
            out = samplers.sample(model_fn, schedule, noise, key=rng, steps=steps, return_trajectory=trajectory,
                                  **kwargs, **extra_kwargs)
            latents, traj = out if trajectory else (out, None)
            images = self.decode(vae_params, latents)
            if trajectory:  # decoded x_t and predicted x_0 after every step: [steps, B, H, W, 3]
                decode_all = jax.vmap(lambda z: self.decode(vae_params, z))
                traj = {k: decode_all(v) for k, v in traj.items()}
            return images, latents, traj

        self._compiled[key] = jax.jit(generate)
        return self._compiled[key]

    def generate(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *, steps: int = 25,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0, seed: int = 0,
                 height: int | None = None, width: int | None = None, noise=None, init_latents=None,
                 strength: float | None = None, latent_mask=None, inpaint: str | None = None,
                 return_trajectory: bool = False, progress: bool = False, mesh=None, **sampler_kwargs) -> dict:
        """Runs the program; returns {'images', 'latents'} (+ 'trajectory' {'x', 'x0'} if asked).

        init_latents [B, h, w, C] with `strength` is img2img; with `latent_mask` [B, h, w, 1]
        (1 = generate) and inpaint='blend' (any U-Net) or 'channels' (9-channel U-Nets) it is
        inpainting. `noise` [B, h, w, C] overrides the seed's initial latents. `progress` shows
        a progress bar over the denoising steps. With a `mesh` (a `jax.sharding.Mesh` with a
        'data' axis) the batch is split over that axis and the params are replicated.
        """
        prompts, negative = prompt_lists(prompts, negative_prompts)
        if inpaint not in INPAINT_MODES:
            raise ValueError(f"unknown inpaint mode {inpaint!r}; choose one of: blend, channels")
        if strength is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if (inpaint is not None or strength is not None) and init_latents is None:
            raise ValueError("img2img and inpainting need init_latents")
        if inpaint is not None and latent_mask is None:
            raise ValueError("inpainting needs latent_mask")
        shape = self.latent_shape(len(prompts), height or self.default_size, width or self.default_size)
        for name, a, want in (("noise", noise, shape), ("init_latents", init_latents, shape),
                              ("latent_mask", latent_mask, shape[:-1] + (1,))):
            if a is not None and tuple(a.shape) != want:
                raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {want}")
        expected_in = self.latent_channels * (2 if inpaint == "channels" else 1) + (inpaint == "channels")
        if self.unet.config.in_channels != expected_in:
            raise ValueError(f"the U-Net takes {self.unet.config.in_channels} input channels; inpaint={inpaint!r} "
                             f"feeds {expected_in} (use inpaint='channels' only with 9-channel inpainting U-Nets)")
        if noise is None:
            noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        sampler = tuple(sorted({**self.sampler_defaults, **sampler_kwargs}.items()))
        program = self._program(steps, sampler, strength, inpaint, return_trajectory, progress)
        params = (self.unet_params, self.vae_params, self.text_params)
        batch_args = [self.tokenize(prompts), self.tokenize(negative), jnp.asarray(noise),
                      None if init_latents is None else jnp.asarray(init_latents, jnp.float32),
                      None if latent_mask is None else jnp.asarray(latent_mask, jnp.float32)]
        if mesh is not None:
            params, batch_args = _shard_over_data(mesh, params, batch_args)
        ids, uncond_ids, noise, init_latents, latent_mask = batch_args
        bar = _progress_bar(steps) if progress else None
        self._progress = bar
        try:
            images, latents, traj = program(params, ids, uncond_ids, noise, jax.random.key(seed + 1),
                                            jnp.float32(guidance_scale), jnp.float32(guidance_rescale),
                                            init_latents, latent_mask)
            images = jax.block_until_ready(images)
        finally:
            self._progress = None
            if bar is not None:
                bar.close()
        out = {"images": images, "latents": latents}
        if return_trajectory:
            out["trajectory"] = traj
        return out

    def __call__(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                 return_latents: bool = False, **kwargs):
        """Text-to-image: images [B, H, W, 3] in [0, 1] (and the final latents if asked)."""
        out = self.generate(prompts, negative_prompts, **kwargs)
        return (out["images"], out["latents"]) if return_latents else out["images"]


def _shard_over_data(mesh, params, batch_args):
    """Batch arrays split over the mesh's 'data' axis, params replicated on every device."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    if "data" not in mesh.axis_names:
        raise ValueError(f"the mesh needs a 'data' axis, it has {mesh.axis_names}")
    n = mesh.shape["data"]
    batch = batch_args[0].shape[0]
    if batch % n:
        raise ValueError(f"batch {batch} is not divisible by the mesh's data axis ({n}); pad the prompts")
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    return params, [None if a is None else jax.device_put(a, data) for a in batch_args]


def _progress_bar(steps: int):
    from tqdm import tqdm

    return tqdm(total=steps, desc="denoising", unit="step", leave=False)
