"""Denoising diffusion and flow matching, in pixel space or in a frozen VAE's latent space, with a U-Net,
a DiT, an MMDiT (SD3's joint text-image transformer, Esser et al. 2024) or a video model, optionally
conditioned on a frozen CLIP text encoder (latent diffusion, Rombach et al. 2022) or a T5 encoder trained
alongside (`config.model.t5`, MMDiT and Wan) with caption dropout for classifier-free guidance (Ho &
Salimans 2022); text-to-video and image-to-video with a TemporalUNet
(ModelScope, Wang et al. 2023), text-to-video with Wan's video transformer (Wan Team 2025) on videos
batch["image"] [B, T, H, W, 3].

The recipe by concept: `config` (the typed `config.model`), `objective` (schedule, prediction type,
weighting, timesteps), `backbones` (the network, fine-tuned or inflated), `latents` (the frozen VAE and
text encoder); `Diffusion` here puts them together into the trainer's `Task`, which a config with a `lora`
section turns into LoRA training (`jaxdiff.training.lora`: adapters of the U-Net and text encoder).
"""
from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion, guidance, samplers
from jaxdiff.data.layout import downsampled
from jaxdiff.training import sources
from jaxdiff.training.lora import LoRAConfig, lora_task
from jaxdiff.training.recipes.diffusion.backbones import backbone
from jaxdiff.training.recipes.diffusion.config import ModelConfig
from jaxdiff.training.recipes.diffusion.latents import Latents, Text, vae_config
from jaxdiff.training.task import Task, init_boxed, rebox

log = logging.getLogger(__name__)


def build(c, spec) -> Task:
    d = Diffusion(c, spec)
    task = Task(init=d.init, loss=d.loss, frozen=d.frozen or None, sample=d.sample)
    if "lora" not in c:
        return task
    # LoRA (configs/lora.py): adapters of the U-Net (and of the text encoder) train, both stay frozen
    lora = LoRAConfig.of(c.lora)
    if d.m.backbone != "unet":
        raise ValueError(f"config.lora adapts a backbone 'unet' U-Net, not config.model.backbone={d.m.backbone!r}")
    return lora_task(task, lora, d.base(jax.random.fold_in(jax.random.key(c.seed), 3)),
                     {"unet": None, **({"text_encoder": "text"} if d.m.text else {})})


class Diffusion:
    """The parts of one diffusion run (network, frozen VAE and text encoder, schedule) and its pure functions."""

    def __init__(self, c, spec):
        m = self.m = ModelConfig.of(c.model)
        self.c, self.spec, dtype = c, spec, jnp.dtype(c.dtype)
        self.schedule = m.objective.make_schedule()
        if m.video and spec.source != "shapes":
            raise ValueError(f"config.model.backbone={m.backbone!r} trains on videos: config.data.source="
                             f"{spec.source!r} has none; use 'shapes' with a video dataset name such as "
                             f"'moving_shapes/32px-8f'")
        size, channels, self.frozen = spec.image_size, 3, {}
        key = lambda i: jax.random.fold_in(jax.random.key(c.seed), i)
        self.latents = Latents(vae_config(m.vae), dtype) if m.latent else None
        if self.latents:
            self.frozen["vae"] = self.latents.frozen(m.vae, size, f"{m.space} diffusion's vae", key(1))
            size, channels = size // self.latents.config.downsample_factor, self.latents.config.latent_channels
        self.text = None
        if m.text:
            self.text = Text(m, spec, dtype, f"{m.space} diffusion's text", key(2))
            if self.text.frozen is not None:
                self.frozen["text"] = self.text.frozen
            self.empty = jnp.asarray(spec.empty_tokens, jnp.int32)
        self.emphasized = emphasis_ids(m, spec)
        self.mmdit = m.backbone == "mmdit"      # its text is two inputs: the states and the pooled state
        self.layout = spec.layout_channels      # config.data.layout: the layout map's channels, read beside x_t
        if self.layout and (m.backbone == "temporal_unet" or not m.text):
            raise ValueError(f"config.data.layout conditions a text-to-image or Wan text-to-video backbone on the "
                             f"scene's layout map; backbone {m.backbone!r}"
                             f"{'' if m.text else ' without a text encoder'} takes none")
        self.net, self.initial = backbone(m, channels, size, dtype, *((self.text.width, self.text.pooled_width)
                                                                      if m.text else (None, None)),
                                          extra_channels=self.layout)
        # One example's shape: [h, w, C], or [T, h, w, C] for video (T only matters for previews).
        self.example = (num_frames_for(c, m), size, size, channels) if m.video else (size, size, channels)
        self.cond_channels = self.net.config.conditioning_frame_channels if m.backbone == "temporal_unet" else 0
        patch = self.net.config.patch_size if m.backbone == "wan" else ()
        if any(n % p for n, p in zip(self.example, patch)):
            raise ValueError(f"config.model.wan.patch_size={patch} does not tile the latent videos' {self.example[0]} "
                             f"frames of {size}x{size}")

    def parts(self, params):
        """(the network's params, the trained T5's or None): a run with config.model.t5 trains
        {"denoiser": ..., "t5": ...}, any other the network's params alone."""
        return (params["denoiser"], params["t5"]) if self.m.t5 is not None else (params, None)

    def encode_text(self, params, frozen, tokens):
        states, pooled = self.text.encode(self.parts(params)[1], (frozen or {}).get("text"), tokens)
        return (states, pooled) if self.mmdit else states

    def apply(self, params, x, t, ctx, layout=None, **kwargs):
        """The network on x_t (with `layout` [B, (T,) h, w, layout channels] appended to its channels, zero if
        None)."""
        if self.layout:
            layout = jnp.zeros((*x.shape[:-1], self.layout), x.dtype) if layout is None else layout
            x = jnp.concatenate([x, layout.astype(x.dtype)], axis=-1)
        return self.net.apply({"params": self.parts(params)[0]}, x, t, *(ctx if self.mmdit else (ctx,)), **kwargs)

    def fresh(self, key):
        """The network's random init (boxed)."""
        ctx = None
        if self.m.text:
            ctx = jnp.zeros((1, self.spec.max_length, self.text.width))
            ctx = (ctx, jnp.zeros((1, self.text.pooled_width))) if self.mmdit else ctx   # (an MMDiT has CLIP)
        x = jnp.zeros((1, *self.example[:-1], self.example[-1] + self.layout))
        return init_boxed(self.net, key, x, jnp.zeros((1,)), *(ctx if self.mmdit else (ctx,)))

    def init(self, key):
        params = self.fresh(key)
        params = params if self.initial is None else rebox(self.initial(key, nn.meta.unbox(params)), params)
        if self.m.t5 is None:
            return params
        t5 = self.text.init_t5(jax.random.fold_in(key, 1))
        if self.m.init_from:   # the T5 trained beside the source MMDiT
            t5 = rebox(sources.ema_params(self.m.init_from, "t5"), t5)
        return {"denoiser": params, "t5": t5}

    def layout_input(self, batch, key):
        """batch["layout"] [B, (T,) H, W, K] averaged over each latent pixel's H/h x W/w block -> [B, (T,) h, w, K],
        zeroed for a layout_dropout share of the examples."""
        maps = downsampled(batch["layout"], batch["layout"].shape[-3] // self.example[-3])
        keep = ~jax.random.bernoulli(key, self.m.layout_dropout, (maps.shape[0],))
        return jnp.where(keep.reshape(-1, *(1,) * (maps.ndim - 1)), maps, 0.0)

    def base(self, key):
        """The U-Net a LoRA adapts, boxed: init_from's weights, or (smoke runs) a random init, warned."""
        if self.initial is None:
            log.warning("config.model.init_from is empty: LoRA adapters of a randomly initialised U-Net")
            return self.fresh(key)
        abstract = jax.eval_shape(self.fresh, key)
        return rebox(self.initial(key, nn.meta.unbox(abstract)), abstract)

    def loss(self, params, frozen, batch, key, step):
        m = self.m
        k_post, k_drop, k_loss = jax.random.split(key, 3)
        x0 = batch["image"]
        if m.video and x0.ndim != 5:
            raise ValueError(f"config.model.backbone={m.backbone!r} trains on videos [B, T, H, W, 3], but "
                             f"config.data (name={self.c.data.get('name')!r}) gives images of shape {x0.shape}")
        if self.latents:
            x0 = self.latents.encode(frozen["vae"], x0, k_post)
        context, net_kwargs, weights = None, {}, None
        if m.text:
            drop = jax.random.bernoulli(k_drop, m.caption_dropout, (x0.shape[0],))
            context = self.encode_text(params, frozen, jnp.where(drop[:, None], self.empty[None], batch["tokens"]))
        if self.cond_channels:   # image-to-video: frame 0's clean latent, dropped independently of the caption
            keep = ~jax.random.bernoulli(jax.random.fold_in(k_drop, 1), m.image_dropout, (x0.shape[0],))
            net_kwargs = {"cond_frames": x0[:, 0], "cond_present": keep}
        if self.layout:   # the layout map, dropped independently of the caption
            net_kwargs = {"layout": self.layout_input(batch, jax.random.fold_in(k_drop, 2))}
        if self.emphasized is not None:   # captions holding an emphasis word count emphasis_weight times
            hit = jnp.isin(batch["tokens"], self.emphasized).any(axis=-1)
            weights = jnp.where(hit, float(m.emphasis_weight), 1.0)
        apply_fn = lambda x, t, ctx: self.apply(params, x, t, ctx, **net_kwargs)
        return m.objective.loss(apply_fn, x0, k_loss, self.schedule, context, weights), {}

    def sample(self, params, frozen, key):
        """The preview grid: images [N, H, W, 3] in [0, 1] (videos: each one's frames side by side; a layout-
        conditioned model draws from the captions alone, its layout map zero)."""
        m, spec = self.m, self.spec
        n = len(spec.preview_prompts) if m.text else 8
        correlation = m.objective.frame_noise_correlation
        noise = diffusion.frame_correlated_noise(key, (n, *self.example), correlation)
        apply_fn = lambda x, t, ctx: self.apply(params, x, t, ctx)
        if m.text:
            context = self.encode_text(params, frozen, jnp.asarray(spec.tokenize(list(spec.preview_prompts))))
            uncond = self.encode_text(params, frozen, jnp.broadcast_to(self.empty, (n, self.empty.size)))
            model_fn = guidance.cfg(apply_fn, context, uncond, m.guidance_scale)
        else:
            model_fn = lambda x, t: apply_fn(x, t, None)
        x = samplers.sample(model_fn, self.schedule, noise, key=jax.random.fold_in(key, 1), method=m.sample_method,
                            steps=m.sample_steps, prediction_type=m.objective.prediction_type,
                            noise_fn=functools.partial(diffusion.frame_correlated_noise, correlation=correlation,
                                                       axis=2))
        x = jnp.clip((self.latents.decode(frozen["vae"], x) if self.latents else x) / 2 + 0.5, 0.0, 1.0)
        if m.video:   # [N, T, H, W, 3] -> [N, H, T*W, 3]
            x = x.transpose(0, 2, 1, 3, 4).reshape(n, x.shape[2], -1, x.shape[-1])
        return x


def emphasis_ids(m: ModelConfig, spec) -> jax.Array | None:
    """The token ids of `m.emphasis_words`, each a single word of the captions' vocabulary (None without any)."""
    if not m.emphasis_words:
        return None
    if not m.text or spec.tokenize is None:
        raise ValueError("config.model.emphasis_words needs captioned data and a text encoder")
    words = list(m.emphasis_words)
    ids = spec.tokenize(words)
    bad = [w for w, row in zip(words, ids) if row[2] != spec.eos_token_id or row[1] == spec.unk_token_id]
    if bad:
        raise ValueError(f"config.model.emphasis_words: {bad} are not single words of the captions' vocabulary")
    return jnp.asarray(np.asarray(ids[:, 1]))


def num_frames_for(c, m: ModelConfig) -> int:
    """config.model.num_frames, else the frames of a `moving_shapes/{R}px-{T}f...` data name."""
    from jaxdiff.data.moving_shapes import frames_of

    if m.num_frames:
        return int(m.num_frames)
    name = c.data.get("name", "") or ""
    frames = frames_of(name)
    if frames is None:
        raise ValueError(f"config.data.name={name!r} is not a moving_shapes config: set config.model.num_frames (the "
                         f"frames of the preview videos)")
    return frames
