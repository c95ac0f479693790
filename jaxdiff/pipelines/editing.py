"""Editing real images with a text-to-image model: img2img, inpainting, outpainting, inversion editing.

Every function takes (pipe, prompts, images, ...): the prompts that describe the result (for
`invert` and `edit`, the captions of the images as they are; `edit` then takes the target captions).
Images are float [0, 1] (or uint8) NHWC with 3 channels; masks are [B, H, W] or [B, H, W, 1]
with 1 = repaint, 0 = keep. `pipe` must be a `TextToImage`; every function runs through its
`generate` (`invert` through its runner's program cache), one jitted program per static setup.
A layout-to-image model (the shipped shapes model) edits from the captions alone -- an empty layout, which it was
trained to draw from -- unless `layouts=` (one list of objects per image, see `TextToImage.generate`) places them:
a layout drawn for the caption would not be where the image has its objects.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxdiff import samplers
from jaxdiff.pipelines.latent import as_images
from jaxdiff.pipelines.runner import check_guidance, check_seed
from jaxdiff.pipelines.text_to_image import TextToImage
from jaxdiff.samplers.driver import check_number


def _pipe_images(pipe, images, what: str, kwargs: dict) -> jnp.ndarray:
    """The images as float32 [B, H, W, 3], after checking, before any encoding, that `pipe` is a TextToImage
    that takes their size and that the request's seed and guidance (in `kwargs`) are valid."""
    if not isinstance(pipe, TextToImage):
        raise TypeError(f"{what} edits images with a TextToImage pipeline, got a {type(pipe).__name__}")
    check_seed(kwargs.get("seed", 0))
    check_guidance(kwargs.get("guidance_scale", 1.0), kwargs.get("guidance_rescale", 0.0))
    images = as_images(images)
    pipe.check_size(images.shape[1], images.shape[2], "the image")
    return images


def _with_layouts(pipe, kwargs: dict, count: int) -> dict:
    """`kwargs` with layouts=[[]] * count (no layout: the captions alone) for a layout-to-image model, unless given."""
    return {"layouts": [[] for _ in range(count)], **kwargs} if pipe.layout_channels else kwargs


def as_masks(masks, images) -> jnp.ndarray:
    """[B, H, W] or [B, H, W, 1] masks (1 = repaint) matching the images -> float32 [B, H, W, 1] in {0, 1}."""
    m = np.asarray(masks, np.float32)
    if not np.isfinite(m).all():
        raise ValueError("mask holds NaN or inf; it must be 1 (repaint) or 0 (keep)")
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 3:
        m = m[..., None]
    if m.shape != images.shape[:-1] + (1,):
        raise ValueError(f"mask has shape {np.asarray(masks).shape}, which does not match the images "
                         f"{tuple(images.shape)} (expected [B, H, W] or [B, H, W, 1])")
    return jnp.asarray(m > 0.5, jnp.float32)


def latent_mask(masks, factor: int):
    """Pixel masks [B, H, W, 1] -> latent masks [B, H/f, W/f, 1]: a latent is repainted if any of its pixels is."""
    b, h, w, _ = masks.shape
    return masks.reshape(b, h // factor, factor, w // factor, factor, 1).max(axis=(2, 4))


def img2img(pipe: TextToImage, prompts, images, strength: float = 0.6, **kwargs):
    """SDEdit (Meng et al. 2022): noise the image's latents to `strength` of the way, then denoise
    under the prompt. strength 0 returns the input (through the VAE); 1 ignores it. Any TextToImage model: the
    steps run are steps * strength rounded as its diffusers img2img pipeline rounds (`pipe.strength_rounding`:
    down for SD and SDXL, up for SD3 and Flux); the image is encoded to the VAE's posterior mean."""
    images = _pipe_images(pipe, images, "img2img", kwargs)
    check_number("strength", strength, 0.0, 1.0)
    init = pipe.encode_image(pipe.vae_params, images)
    return pipe.generate(prompts, height=images.shape[1], width=images.shape[2], init_latents=init,
                         strength=strength, **_with_layouts(pipe, kwargs, images.shape[0]))["images"]


def inpaint(pipe: TextToImage, prompts, images, masks, *, paste_back: bool = False, **kwargs):
    """Repaints where mask = 1. A 9-channel inpainting U-Net sees [x_t | mask | masked-image latents];
    any other U-Net denoises with the known region blended back at every step (`samplers.mask_blend`).

    Outside the mask the result is the input through the VAE; with paste_back=True, outside the
    (pixel) mask the input pixels are returned exactly.
    """
    images = _pipe_images(pipe, images, "inpaint", kwargs)
    masks = as_masks(masks, images)
    lmask = latent_mask(masks, pipe.vae_scale_factor)
    channels = pipe.denoiser.config.in_channels == 2 * pipe.latent_channels + 1
    known = images * (1.0 - masks) if channels else images
    init = pipe.encode_image(pipe.vae_params, known)
    out = pipe.generate(prompts, height=images.shape[1], width=images.shape[2], init_latents=init,
                        latent_mask=lmask, inpaint="channels" if channels else "blend",
                        **_with_layouts(pipe, kwargs, images.shape[0]))["images"]
    return masks * out + (1.0 - masks) * images if paste_back else out


def outpaint(pipe: TextToImage, prompts, images, margins: Sequence[int], *, fill: float = 0.5, **kwargs):
    """Extends the canvas by (top, right, bottom, left) pixels and paints the new border.

    The original sits unchanged (paste_back) in the middle of the returned [B, H+t+b, W+l+r, 3] images.
    """
    images = _pipe_images(pipe, images, "outpaint", kwargs)
    if len(margins) != 4 or any(int(m) < 0 for m in margins) or not any(margins):
        raise ValueError(f"margins must be 4 non-negative pixel counts (top, right, bottom, left), not all 0; "
                         f"got {tuple(margins)}")
    check_number("fill", fill, 0.0, 1.0)
    top, right, bottom, left = (int(m) for m in margins)
    b, h, w, _ = images.shape
    pipe.check_size(h + top + bottom, w + left + right, "the outpainted canvas")
    canvas = jnp.full((b, h + top + bottom, w + left + right, 3), fill, jnp.float32)
    canvas = canvas.at[:, top:top + h, left:left + w].set(images)
    masks = jnp.ones(canvas.shape[:-1], jnp.float32).at[:, top:top + h, left:left + w].set(0.0)
    return inpaint(pipe, prompts, canvas, masks, paste_back=True, **kwargs)


def invert(pipe: TextToImage, prompts, images, *, steps: int = 50, guidance_scale: float = 1.0, layouts=None,
           **sampler_kwargs):
    """DDIM inversion of real images under their captions (`samplers.ddim_invert` in latent space): the
    latent noise [B, h, w, C] that regenerates them (a layout-to-image model: under `layouts`, default none)."""
    images = _pipe_images(pipe, images, "invert", {"guidance_scale": guidance_scale})
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images; give one per image")
    layouts = _with_layouts(pipe, {} if layouts is None else {"layouts": layouts}, len(prompts)).get("layouts")
    layout = pipe.layout_latents(prompts, layouts, 0, images.shape[1], images.shape[2])
    defaults = {k: v for k, v in pipe.sampler_defaults.items()
                if k in ("prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one")}
    options = {**defaults, **sampler_kwargs}
    schedule = pipe.schedule

    def run(params, ids, uncond_ids, images, layout, scale):
        denoiser_params, vae_params, text_params = params
        model_fn = pipe.guided_model(denoiser_params, text_params, ids, uncond_ids, scale, extra_channels=layout)
        return samplers.ddim_invert(model_fn, schedule, pipe.encode_image(vae_params, images), steps=steps, **options)

    program = pipe.runner.program(("invert", steps, tuple(sorted(options.items())), id(schedule)), lambda: run)
    return pipe.runner.run(program, pipe.params, [pipe.tokenize(prompts), pipe.tokenize([""] * len(prompts)), images,
                                                  None if layout is None else jnp.asarray(layout, jnp.float32)],
                           jnp.float32(guidance_scale), steps=steps, progress=False)


def edit(pipe: TextToImage, source_prompts, images, target_prompts, *, steps: int = 50,
         inversion_guidance: float = 1.0, guidance_scale: float = 3.0, **kwargs):
    """Inversion editing: DDIM-invert the images under `source_prompts` (their captions), then regenerate
    from that noise with DDIM under `target_prompts` ("a red circle" -> "a blue circle"), keeping the rest."""
    images = _pipe_images(pipe, images, "edit", {**kwargs, "guidance_scale": guidance_scale})
    check_number("inversion_guidance", inversion_guidance)
    kwargs = _with_layouts(pipe, kwargs, images.shape[0])
    x_t = invert(pipe, source_prompts, images, steps=steps, guidance_scale=inversion_guidance,
                 layouts=kwargs.get("layouts"))
    return pipe.generate(target_prompts, height=images.shape[1], width=images.shape[2], noise=x_t, steps=steps,
                         guidance_scale=guidance_scale, method="ddim", **kwargs)["images"]
