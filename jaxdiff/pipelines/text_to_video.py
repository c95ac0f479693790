"""Text-to-video and image-to-video latent diffusion: CLIP text encoder -> classifier-free guided
TemporalUNet on latent videos [B, T, h, w, C] -> the image VAE's decoder on every frame.

    pipe = TextToVideo.from_pretrained("path/to/text-to-video-folder")    # diffusers TextToVideoSDPipeline layout
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

Each request runs one jitted program per static setup (steps, sampler, image or not) and shape,
cached by the pipeline's `runner`: prompt ids, seed, guidance scale and rescale and the image are
traced, so changing them never recompiles.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxdiff import diffusion, samplers
from jaxdiff.pipelines.latent import LatentDiffusion, as_images
from jaxdiff.pipelines.runner import check_guidance, check_seed, prompt_lists, sampler_options


DEFAULT_FRAMES = 8  # for a video model folder whose training.json does not say how many frames it learnt


def _training_config(path: str) -> dict:
    """The config of the diffusion run a model folder was exported from, as its training.json records it
    (`jaxdiff.training.export`); {} if the folder has none."""
    listing = os.path.join(path, "training.json")
    if not os.path.isfile(listing):
        return {}
    with open(listing) as f:
        return json.load(f).get("diffusion", {}).get("config", {})


def trained_frames(path: str) -> int | None:
    """The frames per clip of the videos a model folder's diffusion run trained on: the run's
    moving_shapes data name, else its config.model.num_frames; None if the folder does not say."""
    config = _training_config(path)
    from jaxdiff.data.moving_shapes import frames_of

    frames = frames_of(config.get("data", {}).get("name", "")) or config.get("model", {}).get("num_frames")
    return int(frames) if frames else None


def trained_noise_correlation(path: str) -> float:
    """The frame noise correlation a model folder's diffusion run trained with (config.model.
    frame_noise_correlation; 0 if the folder does not say)."""
    return float(_training_config(path).get("model", {}).get("frame_noise_correlation", 0.0))


def default_frames(path: str) -> int:
    """The video length a model folder generates by default: the frames it trained on, else DEFAULT_FRAMES."""
    return trained_frames(path) or DEFAULT_FRAMES


@dataclasses.dataclass
class TextToVideo(LatentDiffusion):
    """A latent text-to-video model (TemporalUNet + image VAE + CLIP), with the text and VAE pieces
    of `LatentDiffusion` (tokenize, encode_text, encode_image, decode). `num_frames` is the default video length;
    `frame_noise_correlation` the default share of the noise's variance common to all frames (the
    initial latents' and the stochastic samplers' step noise: `jaxdiff.diffusion.frame_correlated_noise`),
    which should be what the U-Net trained with."""

    num_frames: int = DEFAULT_FRAMES
    frame_noise_correlation: float = 0.0

    @classmethod
    def from_pretrained(cls, path: str, num_frames: int | None = None, verify: bool = True) -> "TextToVideo":
        """From a diffusers text-to-video folder (unet/ holds a UNet3DConditionModel). The default video
        length is `num_frames`, else `default_frames(path)`; the frame noise correlation the one the
        folder's training.json records (0 without one). `verify`: see `TextToImage.from_pretrained`."""
        from jaxdiff.models.temporal_unet import TemporalUNet

        return cls(*cls._components(path, denoiser_type=TemporalUNet, verify=verify),
                   num_frames=num_frames or default_frames(path),
                   frame_noise_correlation=trained_noise_correlation(path))

    @property
    def latent_channels(self) -> int:
        """The video U-Net's latent channels (its in_channels also count the conditioning frame's)."""
        return self.denoiser.config.latent_channels

    def decode_video(self, vae_params, latents):
        """Latent videos [B, T, h, w, C] -> videos in [0, 1], [B, T, H, W, 3]: the VAE decodes each frame."""
        b, t = latents.shape[:2]
        frames = self.decode(vae_params, latents.reshape(b * t, *latents.shape[2:]))
        return frames.reshape(b, t, *frames.shape[1:])

    def video_latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
        if frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {frames}")
        b, h, w, c = self.latent_shape(batch, height, width)
        return (b, frames, h, w, c)

    def _build(self, steps: int, sampler: tuple, image: bool, keep_first_frame: bool, correlation: float,
               progress: bool):
        """The whole generation as one function of traced inputs, for `runner.program`."""
        kwargs, schedule = self.runner.sampler_kwargs(sampler, progress), self.schedule
        kwargs["noise_fn"] = functools.partial(diffusion.frame_correlated_noise, correlation=correlation, axis=2)
        conditioned = bool(self.denoiser.config.conditioning_frame_channels)

        def generate(params, ids, uncond_ids, noise, init_image, rng, scale, rescale):
            denoiser_params, vae_params, text_params = params
            first = self.encode_image(vae_params, init_image) if image else None   # [B, h, w, C]
            extra = {"cond_frames": first} if conditioned and image else {}
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
                 num_frames: int | None = None, steps: int = 25, guidance_scale: float = 7.5,
                 guidance_rescale: float = 0.0, seed: int = 0, height: int | None = None, width: int | None = None,
                 noise=None, frame_noise_correlation: float | None = None, init_image=None,
                 keep_first_frame: bool = True, progress: bool = False, mesh=None, **sampler_kwargs) -> dict:
        """Runs the program; returns {'videos' [B, T, H, W, 3] in [0, 1], 'latents' [B, T, h, w, C]}.

        `init_image` [B, H, W, 3] (or [H, W, 3] for every prompt) in [0, 1] makes it image-to-video;
        `noise` [B, T, h, w, C] overrides the seed's initial latents; `frame_noise_correlation` (in [0, 1))
        the model's default share of the noise common to all frames. With a `mesh` (a
        `jax.sharding.Mesh` with a 'data' axis) the videos are split over that axis and the params are
        replicated.
        """
        prompts, negative = prompt_lists(prompts, negative_prompts)
        check_seed(seed)
        check_guidance(guidance_scale, guidance_rescale)
        frames = self.num_frames if num_frames is None else int(num_frames)
        shape = self.video_latent_shape(len(prompts), frames, height or self.default_size, width or self.default_size)
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
        correlation = self.frame_noise_correlation if frame_noise_correlation is None else frame_noise_correlation
        if not (isinstance(correlation, (int, float)) and 0.0 <= correlation < 1.0):
            raise ValueError(f"frame_noise_correlation must be in [0, 1), got {correlation!r}")
        correlation = float(correlation)
        if noise is None:
            noise = diffusion.frame_correlated_noise(jax.random.key(seed), shape, correlation)
        sampler = sampler_options(self.sampler_defaults, sampler_kwargs)
        setup = (steps, sampler, init_image is not None, keep_first_frame, correlation, progress)
        program = self.runner.program((*setup, id(self.schedule)), lambda: self._build(*setup))
        batch = [self.tokenize(prompts), self.tokenize(negative), jnp.asarray(noise), init_image]
        videos, latents = self.runner.run(program, self.params, batch, jax.random.key(seed + 1),
                                          jnp.float32(guidance_scale), jnp.float32(guidance_rescale),
                                          steps=steps, progress=progress, mesh=mesh)
        return {"videos": videos, "latents": latents}

    def __call__(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                 return_latents: bool = False, **kwargs):
        """Videos [B, T, H, W, 3] in [0, 1] (and the final latents if asked)."""
        out = self.generate(prompts, negative_prompts, **kwargs)
        return (out["videos"], out["latents"]) if return_latents else out["videos"]
