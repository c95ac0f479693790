"""The pieces text-to-image and text-to-video share: a denoiser (a U-Net on CLIP's states; SDXL's U-Net on text
states, a pooled embedding and size ids; or a transformer over patch tokens -- SD3's MMDiT, Flux -- on text states
and a pooled embedding) under classifier-free guidance, the text encoders, and the VAE between pixels and latents,
as pure jittable functions of their params.

`TextToImage` and `TextToVideo` are both `LatentDiffusion`s, each with its own `generate`; neither
extends the other. Each owns a `Runner` (`jaxdiff.pipelines.runner`) that compiles and runs its programs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance, trace_cache
from jaxdiff.convert.scheduler import dynamic_shift_mu, schedule_from_config
from jaxdiff.data.layout import LAYOUT_CHANNELS, downsampled, layout_map, trajectory_map
from jaxdiff.models import FluxTransformer2D, SD3Transformer2D, UNet2DCondition
from jaxdiff.models.text_encoders import SDXLTextEncoders
from jaxdiff.pipelines.layout import LayoutModel
from jaxdiff.pipelines.runner import Runner, sampler_options
from jaxdiff.schedules import Schedule

# Image sides up to this many times a model's working size: memory grows with the pixel count squared
# (attention over the latent's positions), so a 1000 px image on a 32 px model would need ~250 GB.
MAX_SIZE_FACTOR = 2
# Transformers over patch tokens: their text inputs are (states, pooled).
PATCH_TRANSFORMERS = (SD3Transformer2D, FluxTransformer2D)
# The reference pipelines' default working size in latent pixels where the denoiser's config has none (Flux's)
FLUX_SAMPLE_SIZE = 128


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


def training_config(path: str) -> dict:
    """The config of the diffusion run a model folder was exported from, as its training.json records it
    (`jaxdiff.training.export`); {} if the folder has none."""
    listing = os.path.join(path, "training.json")
    if not os.path.isfile(listing):
        return {}
    with open(listing) as f:
        return json.load(f).get("diffusion", {}).get("config", {})


def recorded_guidance(record: dict) -> float | None:
    """The guidance scale a model folder's diffusion run sampled its previews with (config.model.guidance_scale of
    its `training_config` record), None if the record does not say."""
    scale = record.get("model", {}).get("guidance_scale")
    return None if scale is None else float(scale)


# LatentDiffusion fields no generation program reads: its arguments (the params) and what runs before or around it
OUTSIDE_PROGRAMS = ("denoiser_params", "vae_params", "text_params", "tokenizer", "layout_model", "runner")


@dataclasses.dataclass
class LatentDiffusion:
    """Modules, their params, tokenizer, schedule and sampler defaults of a latent diffusion model. The
    denoiser is a U-Net (UNet2DCondition, SDXL's among them; TemporalUNet) or a patch transformer
    (SD3Transformer2D, FluxTransformer2D); the text encoder is one CLIP or several encoders as one module
    (`jaxdiff.models.text_encoders`) with a `MultiTokenizer`.

    `sampler_defaults` are `samplers.sample` keyword arguments (method, prediction_type,
    timestep_spacing, steps_offset, set_alpha_to_one, ...) that each call may override;
    `scheduler_config` is the folder's scheduler config (dynamic shifting's constants); `trained_guidance` the
    guidance scale the folder's training run sampled with (its training.json), the default when set.
    `layout_model`: a layout-to-image folder's caption -> layout model (`jaxdiff.models.layout.LayoutModel`), which
    draws the layout its denoiser reads when a call gives none.
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
    scheduler_config: dict = dataclasses.field(default_factory=dict)
    trained_guidance: float | None = None
    layout_model: Any = None
    runner: Runner = dataclasses.field(default_factory=Runner, init=False, repr=False, compare=False)

    def program(self, setup: tuple):
        """The runner's generation program of static `setup` (`_build`'s arguments, `progress` last): in this process
        keyed by the setup and the schedule object, on disk (`jaxdiff.trace_cache`) by the setup and the
        `fingerprint` of every field the program may read (all but OUTSIDE_PROGRAMS), unless it has a host callback
        (progress) or a field has no stable fingerprint."""
        def identity():
            fields = {k: v for k, v in vars(self).items() if k not in OUTSIDE_PROGRAMS}
            return None if setup[-1] else trace_cache.identity(type(self).__module__, type(self).__qualname__,
                                                                "generate", setup, fields)

        return self.runner.program((*setup, id(self.schedule)), lambda: self._build(*setup), identity)

    @classmethod
    def _components(cls, path: str, record: dict, **load_kwargs) -> tuple:
        """The constructor's positional fields from a diffusers folder (see `jaxdiff.convert.load_pipeline`);
        the folder's scheduler gives the schedule and the sampler defaults (DDIM where it names no sampler), its
        training.json `record` (`training_config`; {} for a folder not exported here) the default guidance, its
        layout/ (a layout-to-image folder's) the layout model."""
        from jaxdiff.convert import load_pipeline

        sd = load_pipeline(path, **load_kwargs)
        schedule, defaults = schedule_from_config(sd.scheduler_config)
        layout = os.path.join(path, "layout")
        return (sd.denoiser, sd.denoiser_params, sd.vae, sd.vae_params, sd.text_encoder, sd.text_params, sd.tokenizer,
                schedule, {"method": "ddim", **defaults}, sd.scheduler_config, recorded_guidance(record),
                LayoutModel.from_pretrained(layout) if os.path.isdir(layout) else None)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def patch_transformer(self) -> bool:
        """Whether the denoiser is a transformer over patch tokens (its text: the states and a pooled embedding)."""
        return isinstance(self.denoiser, PATCH_TRANSFORMERS)

    @property
    def text_time(self) -> bool:
        """Whether the denoiser is SDXL's U-Net: it reads a pooled text embedding and size ids beside the states
        (`addition_embed_type='text_time'`)."""
        return isinstance(self.denoiser, UNet2DCondition) and self.denoiser.config.addition_embed_type == "text_time"

    @property
    def zeros_without_negative(self) -> bool:
        """SDXL's force_zeros_for_empty_prompt: without negative prompts, CFG guides against zero text inputs."""
        return isinstance(self.text_encoder, SDXLTextEncoders) and self.text_encoder.force_zeros_for_empty_prompt

    @property
    def strength_rounding(self) -> str:
        """How img2img rounds steps * strength (`samplers.driver.img2img_start`): up for the patch transformers,
        as diffusers' SD3 and Flux img2img pipelines do; down for the U-Nets, as its SD and SDXL pipelines do."""
        return "up" if self.patch_transformer else "down"

    @property
    def layout_channels(self) -> int:
        """The layout map's channels (`jaxdiff.data.layout`) an MMDiT reads beside the latent, 0 for other models."""
        c = self.denoiser.config
        extra = c.in_channels - c.out_channels if isinstance(self.denoiser, SD3Transformer2D) else 0
        return extra if extra == LAYOUT_CHANNELS else 0

    def layout_latents(self, prompts: Sequence[str], layouts, seed: int, height: int, width: int,
                       num_frames: int | None = None) -> np.ndarray | None:
        """The layout maps [B, h, w, K] a layout-to-image denoiser reads, on the latent grid: of `layouts` (one list
        of objects per prompt, see `jaxdiff.data.layout.as_objects`), or drawn from the prompts by the folder's
        layout model (seeded by `seed`); None for a model that reads none. With `num_frames` (layout-to-video) the
        layouts are trajectories (`as_trajectories`) and the maps [B, T, h, w, K], each frame's."""
        fields = "'shape', 'colour', 'size', 'x', 'y'" + (", 'direction', 'speed'" if num_frames else "")
        if not self.layout_channels:
            if layouts is not None:
                raise ValueError("layouts were given, but this model reads no layout map (only layout-to-image and "
                                 "layout-to-video folders do, e.g. the shipped shapes models)")
            return None
        if layouts is None:
            if self.layout_model is None:
                raise ValueError(f"this model reads a layout map and its folder has no layout model to draw one: pass "
                                 f"layouts=[[{{{fields}}}, ...] per prompt]")
            drawn_frames = self.layout_model.module.config.num_frames or None
            if drawn_frames != num_frames:
                raise ValueError(f"this folder's layout model draws trajectories of {drawn_frames} frames; ask for "
                                 f"num_frames={drawn_frames} or pass layouts=[[{{{fields}}}, ...] per prompt]")
            layouts = self.layout_model.draw(prompts, seed)
        if len(layouts) != len(prompts):
            raise ValueError(f"{len(layouts)} layouts for {len(prompts)} prompts; give one list of objects per prompt")
        maps = np.stack([trajectory_map(objects, num_frames, height, width) if num_frames
                         else layout_map(objects, height, width) for objects in layouts])
        return downsampled(maps, self.vae_scale_factor)

    @property
    def flux(self) -> bool:
        return isinstance(self.denoiser, FluxTransformer2D)

    @property
    def default_guidance(self) -> float:
        """`trained_guidance` for a folder trained here, else `reference_guidance`."""
        return self.reference_guidance if self.trained_guidance is None else self.trained_guidance

    @property
    def reference_guidance(self) -> float:
        """The reference pipeline's default guidance scale: Flux's embedded guidance 3.5, SD3's CFG 7.0,
        Stable Diffusion's 7.5 (and SDXL's 5.0)."""
        if self.patch_transformer:
            return 3.5 if self.flux else 7.0
        return 5.0 if getattr(self.denoiser.config, "addition_embed_type", None) == "text_time" else 7.5

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling times the U-Net's (or the patch side:
        SD3's `patch_size`, Flux's 2x2 packing)."""
        c = self.denoiser.config
        if self.patch_transformer:
            return self.vae_scale_factor * (2 if self.flux else c.patch_size)
        return self.vae_scale_factor * 2 ** (len(c.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def default_size(self) -> int:
        size = getattr(self.denoiser.config, "sample_size", None) or (FLUX_SAMPLE_SIZE if self.flux else 64)
        return size * self.vae_scale_factor

    def tokenize(self, prompts: Sequence[str]):
        """Prompts -> token ids [B, L] int32 (a tuple of such arrays for several text encoders)."""
        return jax.tree.map(lambda a: np.asarray(a, np.int32), self.tokenizer(list(prompts)))

    def encode_text(self, text_params, ids):
        """Token ids -> the denoiser's text inputs: CLIP's last hidden state [B, L, D] for a U-Net; for a patch
        transformer or SDXL's U-Net (states [B, L, D], pooled [B, P]) as its text encoders give them."""
        states, pooled = self.text_encoder.apply({"params": text_params}, ids)[:2]
        return (states, pooled) if self.patch_transformer or self.text_time else states

    def size_ids(self, x) -> jnp.ndarray:
        """SDXL's size conditioning for latents x [B, h, w, C] (its `add_time_ids`), [B, 6]: original size, crop
        corner and target size as diffusers' pipelines set them by default: (H, W), (0, 0), (H, W) in pixels."""
        height, width = (n * self.vae_scale_factor for n in x.shape[1:3])
        return jnp.broadcast_to(jnp.asarray([height, width, 0, 0, height, width], jnp.float32), (x.shape[0], 6))

    def sampler_setup(self, steps: int, height: int, width: int, overrides: dict) -> tuple:
        """The sampler defaults with one call's overrides (`runner.sampler_options`), plus what depends on the
        image as the reference pipelines set it: mu for dynamic shifting from the latent's token count (SD3's
        constants default to max_shift 1.16, Flux's to 1.15: diffusers' two pipelines differ), and Flux's
        sigmas linspace(1, 1/steps, steps) for the FlowMatch samplers."""
        options, extra = {**self.sampler_defaults, **overrides}, {}
        if options.get("use_dynamic_shifting") and options.get("mu") is None:
            side = self.size_multiple
            config = self.scheduler_config if self.flux else {"max_shift": 1.16, **self.scheduler_config}
            extra["mu"] = dynamic_shift_mu(config, (height // side) * (width // side))
        if self.flux and options.get("method") in ("flow_euler", "flow_heun") and options.get("sigmas") is None:
            extra["sigmas"] = tuple(np.linspace(1.0, 1.0 / steps, steps).tolist())
        return sampler_options(self.sampler_defaults, {**overrides, **extra})

    def guided_model(self, denoiser_params, text_params, ids, uncond_ids, scale, rescale=0.0, extra_channels=None,
                     true_cfg_scale=None, zero_uncond=False, **denoiser_kwargs):
        """The denoiser under classifier-free guidance as a sampler's model_fn(x, t).

        extra_channels [B, h, w, K] are appended to x's channels (9-channel inpainting U-Nets);
        denoiser_kwargs hold per-example inputs [B, ...] such as a video U-Net's `cond_frames`. Both are
        repeated for the unconditional and conditional halves of the guided batch.
        `zero_uncond`: guide against zero text inputs instead of uncond_ids' (`zeros_without_negative`).
        Flux: `scale` is the guidance its embedding reads (a model without one ignores it, as diffusers does);
        it runs unguided unless `true_cfg_scale` is given (diffusers' true CFG against the negative prompts).
        SDXL's U-Net also reads the pooled embedding and `size_ids`.
        """
        context = self.encode_text(text_params, ids)
        uncond = lambda: (jax.tree.map(jnp.zeros_like, context) if zero_uncond
                          else self.encode_text(text_params, uncond_ids))
        if self.flux:
            guidance_kwargs = {"guidance": scale} if self.denoiser.config.guidance_embeds else {}
            apply = lambda x, t, ctx: self.denoiser.apply({"params": denoiser_params}, x, t, *ctx, **guidance_kwargs)
            if true_cfg_scale is None:
                return lambda x, t: apply(x, t, context)
            return guidance.cfg(apply, context, uncond(), true_cfg_scale, rescale)
        twice = lambda a: jnp.concatenate([a, a], axis=0)
        denoiser_kwargs = {k: twice(v) for k, v in denoiser_kwargs.items()}
        extra = None if extra_channels is None else twice(extra_channels)

        def apply_fn(x, t, ctx):
            kwargs = denoiser_kwargs
            if self.text_time:  # SDXL: the states as context, the pooled embedding and size ids as added inputs
                ctx, pooled = ctx
                kwargs = {**kwargs, "text_embeds": pooled, "time_ids": self.size_ids(x)}
            x = x if extra is None else jnp.concatenate([x, extra], axis=-1)
            return self.denoiser.apply({"params": denoiser_params}, x, t, *(ctx if self.patch_transformer else (ctx,)),
                                       **kwargs)

        return guidance.cfg(apply_fn, context, uncond(), scale, rescale)

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
