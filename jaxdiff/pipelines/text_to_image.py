"""Text-to-image latent diffusion: text encoders -> a denoiser in VAE latent space (a cross-attention U-Net, or a
patch transformer: SD3's MMDiT, Flux) -> VAE decoder, with classifier-free guidance (negative prompts, guidance
rescale; SDXL: zeros in place of absent negative prompts, as its folders ask; Flux: its guidance embedding, and
true CFG on request).

    pipe = TextToImage.from_pretrained("path/to/stable-diffusion-folder")     # SD 1/2, SDXL, SD3, Flux folders
    images = pipe(["a red circle"], negative_prompts=["blurry"], steps=25, guidance_scale=7.5, seed=0)

Every request -- text-to-image here, img2img / inpainting / outpainting / editing in
`jaxdiff.pipelines.editing` -- runs through `generate`: one jitted program per static setup
(steps, sampler, strength, inpainting mode) and shape, cached by the pipeline's `runner`. Prompt
ids, seeds, guidance scale and rescale, images and masks are traced arguments, so changing them
never recompiles.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxdiff import samplers
from jaxdiff.pipelines.latent import LatentDiffusion, training_config
from jaxdiff.pipelines.runner import check_guidance, check_seed, prompt_lists
from jaxdiff.samplers.driver import check_number

INPAINT_MODES = (None, "blend", "channels")


class TextToImage(LatentDiffusion):
    """A latent text-to-image model: a 2D U-Net or a patch transformer, the image VAE and the text encoders (see
    `LatentDiffusion`)."""

    @classmethod
    def from_pretrained(cls, path: str, verify: bool = True, param_dtype=jnp.float32, mesh=None) -> "TextToImage":
        """From a diffusers pipeline folder: Stable Diffusion 1/2, SDXL, SD3, Flux (see
        `jaxdiff.convert.load_pipeline`); `verify` checks the weights against the folder's checksums.json when it has one. Params are held in
        `param_dtype` (e.g. jnp.bfloat16) and, with a `mesh`, placed straight into the shardings of the default
        logical axis rules (fsdp / tensor axes split the large kernels); pass the same mesh to `generate`."""
        return cls(*cls._components(path, training_config(path), verify=verify, param_dtype=param_dtype, mesh=mesh))

    def _build(self, steps: int, sampler: tuple, strength: float | None, inpaint: str | None, true_cfg: bool,
               zero_uncond: bool, trajectory: bool, progress: bool):
        """The whole generation as one function of traced inputs, for `runner.program`."""
        kwargs, schedule = self.runner.sampler_kwargs(sampler, progress), self.schedule

        def generate(params, ids, uncond_ids, noise, init_latents, latent_mask, layout, rng, scale, rescale,
                     true_cfg_scale):
            denoiser_params, vae_params, text_params = params
            # a 9-channel inpainting U-Net sees [x_t | mask | masked image latents]; a layout-to-image MMDiT [x_t | map]
            extra = jnp.concatenate([latent_mask, init_latents], axis=-1) if inpaint == "channels" else layout
            model_fn = self.guided_model(denoiser_params, text_params, ids, uncond_ids, scale, rescale, extra,
                                         true_cfg_scale if true_cfg else None, zero_uncond)
            extra_kwargs = {}
            if strength is not None:
                extra_kwargs.update(x_init=init_latents, strength=strength, strength_rounding=self.strength_rounding)
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

        return generate

    def generate(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *, steps: int = 25,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, true_cfg_scale: float = 1.0,
                 seed: int = 0,
                 height: int | None = None, width: int | None = None, noise=None, init_latents=None,
                 strength: float | None = None, latent_mask=None, inpaint: str | None = None, layouts=None,
                 return_trajectory: bool = False, progress: bool = False, mesh=None, **sampler_kwargs) -> dict:
        """Runs the program; returns {'images', 'latents'} (+ 'trajectory' {'x', 'x0'} if asked).

        init_latents [B, h, w, C] with `strength` is img2img (steps * strength steps, rounded as the reference
        pipeline rounds: `strength_rounding`); with `latent_mask` [B, h, w, 1] (1 = generate) and
        inpaint='blend' (any U-Net) or 'channels' (9-channel U-Nets) it is inpainting.
        SDXL: without `negative_prompts`, the folder's force_zeros_for_empty_prompt (default True) guides against
        zeros, as diffusers does. `guidance_scale` None is `default_guidance` (the training run's, else the
        reference pipeline's).
        Flux: `guidance_scale` is what its guidance embedding reads (a model without the embedding ignores it),
        and with negative prompts a `true_cfg_scale` > 1 runs CFG
        against them (diffusers' true CFG); other models take `true_cfg_scale` 1 only.
        A layout-to-image model (`layout_channels`; the shipped shapes model) draws each prompt's objects where
        `layouts` puts them -- one list per prompt of SceneObjects or {'shape', 'colour', 'size', 'x', 'y'} dicts
        (box centres as fractions of the image, y downwards; `jaxdiff.data.layout`) -- or, without `layouts`, where
        its folder's caption -> layout model places them (seeded by `seed`).
        `noise` [B, h, w, C] overrides the seed's initial latents. `progress` shows
        a progress bar over the denoising steps. With a `mesh` (a `jax.sharding.Mesh` with a
        'data' axis) the batch is split over that axis and the params are replicated.
        `sampler_kwargs` override `sampler_defaults` (diffusers' option names: see `samplers.sample`).
        """
        prompts, negative = prompt_lists(prompts, negative_prompts)
        check_seed(seed)
        guidance_scale = self.default_guidance if guidance_scale is None else guidance_scale
        check_guidance(guidance_scale, guidance_rescale)
        check_number("true_cfg_scale", true_cfg_scale)
        if true_cfg_scale != 1.0 and not self.flux:
            raise ValueError(f"true_cfg_scale={true_cfg_scale!r} applies to Flux; this model's classifier-free "
                             f"guidance is guidance_scale")
        true_cfg = self.flux and true_cfg_scale > 1.0 and negative_prompts is not None
        zero_uncond = negative_prompts is None and self.zeros_without_negative
        if inpaint not in INPAINT_MODES:
            raise ValueError(f"unknown inpaint mode {inpaint!r}; choose one of: blend, channels")
        if strength is not None:
            check_number("strength", strength, 0.0, 1.0)
        if (inpaint is not None or strength is not None) and init_latents is None:
            raise ValueError("img2img and inpainting need init_latents")
        if inpaint is not None and latent_mask is None:
            raise ValueError("inpainting needs latent_mask")
        height, width = height or self.default_size, width or self.default_size
        shape = self.latent_shape(len(prompts), height, width)
        for name, a, want in (("noise", noise, shape), ("init_latents", init_latents, shape),
                              ("latent_mask", latent_mask, shape[:-1] + (1,))):
            if a is not None and tuple(a.shape) != want:
                raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {want}")
        layout = self.layout_latents(prompts, layouts, seed, height, width)
        expected_in = (self.latent_channels * (2 if inpaint == "channels" else 1) + (inpaint == "channels")
                       + self.layout_channels)
        takes = self.denoiser.config.in_channels // (4 if self.flux else 1)  # Flux counts 2x2-packed channels
        if takes != expected_in:
            raise ValueError(f"the denoiser takes {takes} latent channels; inpaint={inpaint!r} feeds {expected_in} "
                             f"(use inpaint='channels' only with 9-channel inpainting U-Nets)")
        if noise is None:
            noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        sampler = self.sampler_setup(steps, height, width, sampler_kwargs)
        setup = (steps, sampler, strength, inpaint, true_cfg, zero_uncond, return_trajectory, progress)
        program = self.program(setup)
        batch = [self.tokenize(prompts), self.tokenize(negative), jnp.asarray(noise),
                 None if init_latents is None else jnp.asarray(init_latents, jnp.float32),
                 None if latent_mask is None else jnp.asarray(latent_mask, jnp.float32),
                 None if layout is None else jnp.asarray(layout, jnp.float32)]
        images, latents, traj = self.runner.run(program, self.params, batch, jax.random.key(seed + 1),
                                                jnp.float32(guidance_scale), jnp.float32(guidance_rescale),
                                                jnp.float32(true_cfg_scale), steps=steps, progress=progress, mesh=mesh)
        out = {"images": images, "latents": latents}
        if return_trajectory:
            out["trajectory"] = traj
        return out

    def __call__(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                 return_latents: bool = False, **kwargs):
        """Text-to-image: images [B, H, W, 3] in [0, 1] (and the final latents if asked)."""
        out = self.generate(prompts, negative_prompts, **kwargs)
        return (out["images"], out["latents"]) if return_latents else out["images"]
