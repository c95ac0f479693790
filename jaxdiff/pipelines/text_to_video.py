"""Text-to-video and image-to-video latent diffusion: a classifier-free guided video denoiser on latent videos
[B, T, h, w, C], two kinds, told apart by the denoiser (`TextToVideo.wan`):

- a TemporalUNet on CLIP's text states, whose latents the image VAE decodes frame by frame
  (diffusers' TextToVideoSDPipeline folders, jaxdiff's own video runs);
- Wan 2.1's video transformer on UMT5's states (zero past each prompt's tokens), whose latents are the causal
  video VAE's, normalised by its latents_mean/std: 1 + (frames - 1) / 4 latent frames, so frames must be
  1 + 4k (diffusers' WanPipeline folders; WanImageToVideoPipeline folders, which need `init_image`);
  or, in jaxdiff's own Wan runs (configs/wan.py), on CLIP's states and the image VAE's latents of every frame,
  as the temporal U-Net (`TextToVideo.video_vae` tells the two VAEs apart).

    pipe = TextToVideo.from_pretrained("path/to/text-to-video-folder")    # TextToVideoSDPipeline or WanPipeline
    videos = pipe(["a red circle moving left"], num_frames=8, steps=25, guidance_scale=7.5, seed=0)
    videos = pipe(["a red circle moving left"], init_image=first_frames)  # image-to-video
    jaxdiff.video_io.write_video("out.gif", videos[0], fps=8)

Image-to-video: the conditioning image [B, H, W, 3] in [0, 1] is encoded by the VAE (posterior
mean, scaled) into the first frame's latent z0. Two mechanisms, both on by default:
- a U-Net with `conditioning_frame_channels` also sees z0 through its extra input channels
  (`jaxdiff.models.temporal_unet.frame_conditioning`), in both halves of the CFG batch (guidance
  is on the text only);
- `keep_first_frame`: after every sampler step frame 0 is replaced by z0 noised to that step's
  level, and by z0 itself after the last step (`jaxdiff.samplers.mask_blend` with a mask that is 0
  on frame 0), so the first frame of the video is the image up to the VAE round trip, by
  construction, for any video U-Net.
A Wan image-to-video transformer reads the image as WanImageToVideoPipeline gives it: the VAE latents of the
image followed by frames - 1 zero frames, after `scale_factor_temporal` mask channels that are 1 on the first
latent frame, appended to its input channels, and CLIP vision's penultimate states of the image as its
`image_context`; no frame is re-imposed unless `keep_first_frame=True` is asked for.

Each request runs one jitted program per static setup (steps, sampler, image or not) and shape,
cached by the pipeline's `runner`: prompt ids, seed, guidance scale and rescale and the image are
traced, so changing them never recompiles.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxdiff import diffusion, samplers
from jaxdiff.data.layout import LAYOUT_CHANNELS
from jaxdiff.models.wan import WanTransformer3D
from jaxdiff.models.wan_vae import (
    AutoencoderKLWan,
    denormalize_latents,
    normalize_latents,
)
from jaxdiff.pipelines.latent import LatentDiffusion, as_images, training_config
from jaxdiff.pipelines.runner import (
    check_guidance,
    check_seed,
    prompt_lists,
    sampler_options,
)

DEFAULT_FRAMES = 8  # for a video U-Net folder whose training.json does not say how many frames it learnt
WAN_FRAMES, WAN_SIZE = 81, (480, 832)  # diffusers' Wan pipelines' defaults: 81 frames of 480x832 (height, width)


def trained_frames(record: dict) -> int | None:
    """The frames per clip of the videos a model folder's diffusion run trained on, from its training.json
    record (`training_config`): the run's moving_shapes data name, else its config.model.num_frames; None if the
    record does not say."""
    from jaxdiff.data.moving_shapes import frames_of

    frames = frames_of(record.get("data", {}).get("name", "")) or record.get("model", {}).get("num_frames")
    return int(frames) if frames else None


def trained_noise_correlation(record: dict) -> float:
    """The frame noise correlation a model folder's diffusion run trained with (config.model.
    frame_noise_correlation of its training.json record; 0 if the record does not say)."""
    return float(record.get("model", {}).get("frame_noise_correlation", 0.0))


def default_frames(path: str) -> int:
    """The video length a model folder generates by default: the frames it trained on, else DEFAULT_FRAMES."""
    return trained_frames(training_config(path)) or DEFAULT_FRAMES


def trained_size(record: dict) -> tuple[int, int] | None:
    """(height, width) of the videos a model folder's diffusion run trained on (config.data.image_size of its
    training.json record); None if the record does not say."""
    size = record.get("data", {}).get("image_size")
    return (int(size), int(size)) if size else None


@dataclasses.dataclass
class TextToVideo(LatentDiffusion):
    """A latent text-to-video model (TemporalUNet + image VAE + CLIP), with the text and VAE pieces
    of `LatentDiffusion` (tokenize, encode_text, encode_image, decode). `num_frames` is the default video length;
    `frame_noise_correlation` the default share of the noise's variance common to all frames (the
    initial latents' and the stochastic samplers' step noise: `jaxdiff.diffusion.frame_correlated_noise`),
    which should be what the U-Net trained with. `frame_size`: the default (height, width), None for the
    denoiser's (a U-Net's working size, Wan's 480x832)."""

    num_frames: int = DEFAULT_FRAMES
    frame_noise_correlation: float = 0.0
    frame_size: tuple[int, int] | None = None

    @classmethod
    def from_pretrained(cls, path: str, num_frames: int | None = None, verify: bool = True) -> "TextToVideo":
        """From a diffusers text-to-video folder: unet/ holds a UNet3DConditionModel (TextToVideoSDPipeline), or
        transformer/ a WanTransformer3DModel (WanPipeline, WanImageToVideoPipeline, jaxdiff's Wan runs). The default
        video length is `num_frames`, else the frames the folder's training.json records, else DEFAULT_FRAMES (Wan:
        81, diffusers' default); its default size and frame noise correlation too are the ones training.json
        records (without one: the denoiser's size, and 0). `verify`: see `TextToImage.from_pretrained`."""
        from jaxdiff.models.temporal_unet import TemporalUNet

        record = training_config(path)
        parts = cls._components(path, record, denoiser_type=(TemporalUNet, WanTransformer3D), verify=verify)
        wan = isinstance(parts[0], WanTransformer3D)
        return cls(*parts, num_frames=num_frames or trained_frames(record) or (WAN_FRAMES if wan else DEFAULT_FRAMES),
                   frame_noise_correlation=trained_noise_correlation(record), frame_size=trained_size(record))

    @property
    def wan(self) -> bool:
        """Whether the denoiser is Wan's video transformer (UMT5 states, the causal video VAE's normalised latents)
        rather than a temporal U-Net (CLIP states, an image VAE on every frame)."""
        return isinstance(self.denoiser, WanTransformer3D)

    @property
    def video_vae(self) -> bool:
        """Whether the VAE is Wan's causal video VAE (normalised latents, time compressed by scale_factor_temporal)
        rather than an image VAE on every frame."""
        return isinstance(self.vae, AutoencoderKLWan)

    @property
    def wan_image_to_video(self) -> bool:
        """Whether the denoiser is a Wan image-to-video transformer: it reads mask and first-frame latent channels
        or CLIP image states, so every request needs `init_image`."""
        c = self.denoiser.config
        return self.wan and (c.in_channels != self.latent_channels + self.layout_channels or c.image_dim is not None)

    @property
    def layout_channels(self) -> int:
        """The layout map's channels a layout-to-video Wan transformer (jaxdiff's, on an image VAE) reads beside each
        frame's latent, 0 for other models."""
        if not self.wan or self.video_vae:
            return 0
        c = self.denoiser.config
        extra = c.in_channels - c.video_out_channels
        return extra if extra == LAYOUT_CHANNELS else 0

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels (Wan); the video U-Net's (its in_channels also count the conditioning
        frame's)."""
        return self.vae.config.latent_channels if self.wan else self.denoiser.config.latent_channels

    @property
    def size_multiple(self) -> int:
        """Sides must be multiples of this: Wan's, the VAE's downsampling times the transformer's patch side."""
        if self.wan:
            return self.vae_scale_factor * math.lcm(*self.denoiser.config.patch_size[1:])
        return super().size_multiple

    @property
    def reference_guidance(self) -> float:
        """diffusers' Wan pipelines' default guidance scale, 5.0; a video U-Net's as `LatentDiffusion`'s."""
        return 5.0 if self.wan else super().reference_guidance

    @property
    def video_size(self) -> tuple[int, int]:
        """The default (height, width): `frame_size`, else Wan's 480x832 or the U-Net's square working size."""
        if self.frame_size:
            return tuple(self.frame_size)
        return WAN_SIZE if self.wan else (super().default_size,) * 2

    @property
    def default_size(self) -> int:
        """The working size the largest side is measured against: the default video's largest side."""
        return max(self.video_size)

    def decode_video(self, vae_params, latents):
        """Latent videos [B, n, h, w, C] -> videos in [0, 1], [B, T, H, W, 3]: Wan's causal VAE decodes the
        denormalised latents as one video (T = 1 + scale_factor_temporal (n - 1)); an image VAE each frame (T = n)."""
        if self.video_vae:
            z = denormalize_latents(latents, self.vae.config)
            video = self.vae.apply({"params": vae_params}, z, method=self.vae.decode)
            return jnp.clip(video / 2.0 + 0.5, 0.0, 1.0)
        b, t = latents.shape[:2]
        frames = self.decode(vae_params, latents.reshape(b * t, *latents.shape[2:]))
        return frames.reshape(b, t, *frames.shape[1:])

    def wan_image_latents(self, vae_params, images, frames: int):
        """WanImageToVideoPipeline's conditioning latents: `images` [B, H, W, 3] in [0, 1] as the first of `frames`
        frames, the rest zero (mid-grey), encoded (posterior mean) and normalised: [B, n, h, w, z_dim]."""
        b, h, w, c = images.shape
        video = jnp.concatenate([images[:, None] * 2.0 - 1.0, jnp.zeros((b, frames - 1, h, w, c), images.dtype)], 1)
        mean, _ = self.vae.apply({"params": vae_params}, video, method=self.vae.encode)
        return normalize_latents(mean, self.vae.config)

    def image_conditioning(self, vae_params, text_params, images, latent_frames: int) -> tuple:
        """(the first frame's latents [B, h, w, C], the `guided_model` keyword arguments that carry the image) for
        images [B, H, W, 3] in [0, 1]. A video U-Net with conditioning_frame_channels reads the frame's latents
        (`cond_frames`); a Wan image-to-video transformer reads `scale_factor_temporal` mask channels (1 on the first
        latent frame) and `wan_image_latents` appended to its input (`extra_channels`), and CLIP vision's states as
        `image_context` when it has image_dim. A Wan transformer on an image VAE reads nothing of the image (only
        `keep_first_frame` imposes it)."""
        if not self.video_vae:
            first = self.encode_image(vae_params, images)
            reads = not self.wan and self.denoiser.config.conditioning_frame_channels
            return first, ({"cond_frames": first} if reads else {})
        t = self.vae.config.scale_factor_temporal
        latents = self.wan_image_latents(vae_params, images, 1 + t * (latent_frames - 1))
        extra = {}
        if self.denoiser.config.in_channels != self.latent_channels:
            first_frame = (jnp.arange(latent_frames) == 0).astype(latents.dtype)[None, :, None, None, None]
            mask = jnp.broadcast_to(first_frame, (*latents.shape[:4], t))
            extra["extra_channels"] = jnp.concatenate([mask, latents], axis=-1)
        if self.denoiser.config.image_dim is not None:
            extra["image_context"] = self.text_encoder.apply({"params": text_params}, images,
                                                             method=self.text_encoder.encode_image)
        return latents[:, 0], extra

    def video_latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
        """[B, latent frames, h, w, C]: a frame each for an image VAE; 1 + (frames - 1) / scale_factor_temporal for
        Wan's causal VAE."""
        step = self.vae.config.scale_factor_temporal if self.video_vae else 1
        if frames < 1 or (frames - 1) % step:
            allowed = f"1 + {step}k (1, {1 + step}, {1 + 2 * step}, ...) for Wan's causal VAE" if self.video_vae \
                else ">= 1"
            raise ValueError(f"num_frames must be {allowed}, got {frames}")
        b, h, w, c = self.latent_shape(batch, height, width)
        return (b, 1 + (frames - 1) // step, h, w, c)

    def _build(self, steps: int, sampler: tuple, image: bool, keep_first_frame: bool, correlation: float,
               progress: bool):
        """The whole generation as one function of traced inputs, for `runner.program`."""
        kwargs, schedule = self.runner.sampler_kwargs(sampler, progress), self.schedule
        kwargs["noise_fn"] = functools.partial(diffusion.frame_correlated_noise, correlation=correlation, axis=2)

        def generate(params, ids, uncond_ids, noise, init_image, layout, rng, scale, rescale):
            denoiser_params, vae_params, text_params = params
            first, extra = self.image_conditioning(vae_params, text_params, init_image, noise.shape[1]) if image \
                else (None, {})
            if layout is not None:   # a layout-to-video transformer: [x_t | each frame's layout map]
                extra = {**extra, "extra_channels": layout}
            model_fn = self.guided_model(denoiser_params, text_params, ids, uncond_ids, scale, rescale, **extra)
            blend = {}
            if image and keep_first_frame:
                known = jnp.broadcast_to(first[:, None], noise.shape)
                mask = (jnp.arange(noise.shape[1]) > 0).astype(noise.dtype)[None, :, None, None, None]
                blend["hook"] = samplers.mask_blend(known, mask, noise)
            latents = samplers.sample(model_fn, schedule, noise, key=rng, steps=steps, **kwargs, **blend)
            return self.decode_video(vae_params, latents), latents

        return generate

    def generate(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                 num_frames: int | None = None, steps: int = 25, guidance_scale: float | None = None,
                 guidance_rescale: float = 0.0, seed: int = 0, height: int | None = None, width: int | None = None,
                 noise=None, frame_noise_correlation: float | None = None, init_image=None,
                 keep_first_frame: bool | None = None, layouts=None, progress: bool = False, mesh=None,
                 **sampler_kwargs) -> dict:
        """Runs the program; returns {'videos' [B, T, H, W, 3] in [0, 1], 'latents' [B, n, h, w, C]} (n = T, or
        Wan's 1 + (T - 1) / 4 latent frames).

        `init_image` [B, H, W, 3] (or [H, W, 3] for every prompt) in [0, 1] makes it image-to-video (a Wan
        image-to-video model needs it); `keep_first_frame` re-imposes its latents on frame 0 (default: on, except
        for a Wan image-to-video model, which reads the image itself as diffusers runs it);
        `noise` [B, n, h, w, C] overrides the seed's initial latents; `frame_noise_correlation` (in [0, 1))
        the model's default share of the noise common to all frames. `guidance_scale` None is `default_guidance`.
        A layout-to-video model (`layout_channels`; the shipped shapes video model) moves each prompt's objects along
        `layouts` -- one list per prompt of MovingObjects or {'shape', 'colour', 'size', 'x', 'y', 'direction',
        'speed'} dicts (the frame-0 box centre as fractions of the frame, y downwards; speed in frame sides per frame;
        `jaxdiff.data.layout.as_trajectories`) -- or, without `layouts`, where its folder's caption -> trajectory
        model sends them (seeded by `seed`; for the frame count that model draws).
        The default size is `video_size`: the trained one, or the U-Net's working size, or Wan's 480x832 (height x
        width). With a `mesh` (a
        `jax.sharding.Mesh` with a 'data' axis) the videos are split over that axis and the params are replicated.
        """
        prompts, negative = prompt_lists(prompts, negative_prompts)
        check_seed(seed)
        guidance_scale = self.default_guidance if guidance_scale is None else guidance_scale
        check_guidance(guidance_scale, guidance_rescale)
        frames = self.num_frames if num_frames is None else int(num_frames)
        default_height, default_width = self.video_size
        shape = self.video_latent_shape(len(prompts), frames, height or default_height, width or default_width)
        if self.wan_image_to_video and init_image is None:
            raise ValueError("this Wan image-to-video model needs init_image: the first frame, [H, W, 3] in [0, 1] "
                             "(or one per prompt) of the video's size")
        if keep_first_frame is None:
            keep_first_frame = not self.wan_image_to_video
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        if init_image is not None:
            init_image = as_images(init_image, "init_image")
            if init_image.shape[0] == 1:  # one image for every prompt
                init_image = jnp.broadcast_to(init_image, (len(prompts), *init_image.shape[1:]))
            want = (len(prompts), shape[2] * self.vae_scale_factor, shape[3] * self.vae_scale_factor, 3)
            if tuple(init_image.shape) != want:
                raise ValueError(f"init_image has shape {tuple(init_image.shape)}, expected {want} (one image in "
                                 f"[0, 1] per prompt, the video's size)")
        layout = self.layout_latents(prompts, layouts, seed, shape[2] * self.vae_scale_factor,
                                     shape[3] * self.vae_scale_factor, num_frames=frames)
        correlation = self.frame_noise_correlation if frame_noise_correlation is None else frame_noise_correlation
        if not (isinstance(correlation, (int, float)) and 0.0 <= correlation < 1.0):
            raise ValueError(f"frame_noise_correlation must be in [0, 1), got {correlation!r}")
        correlation = float(correlation)
        if noise is None:
            noise = diffusion.frame_correlated_noise(jax.random.key(seed), shape, correlation)
        sampler = sampler_options(self.sampler_defaults, sampler_kwargs)
        setup = (steps, sampler, init_image is not None, keep_first_frame, correlation, progress)
        program = self.program(setup)
        batch = [self.tokenize(prompts), self.tokenize(negative), jnp.asarray(noise), init_image,
                 None if layout is None else jnp.asarray(layout, jnp.float32)]
        videos, latents = self.runner.run(program, self.params, batch, jax.random.key(seed + 1),
                                          jnp.float32(guidance_scale), jnp.float32(guidance_rescale),
                                          steps=steps, progress=progress, mesh=mesh)
        return {"videos": videos, "latents": latents}

    def __call__(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                 return_latents: bool = False, **kwargs):
        """Videos [B, T, H, W, 3] in [0, 1] (and the final latents if asked)."""
        out = self.generate(prompts, negative_prompts, **kwargs)
        return (out["videos"], out["latents"]) if return_latents else out["videos"]
