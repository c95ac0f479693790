"""The frozen parts of latent diffusion: the VAE that maps images (and every frame of a video) to scaled
latents and back, and the text encoder; each loaded from a run or model folder, or randomly initialised.
`Text` is the run's text conditioning: the frozen CLIP, and with config.model.t5 a T5 encoder trained beside
the denoiser."""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import AutoencoderKL, AutoencoderKLConfig, CLIPTextModel
from jaxdiff.models.t5 import T5Config, T5EncoderModel
from jaxdiff.models.text_encoders import FluxTextEncoders, WanEncoders
from jaxdiff.models.vae import sample_posterior
from jaxdiff.training import sources
from jaxdiff.training.recipes.clip import text_config_for
from jaxdiff.training.task import init_boxed, rebox

log = logging.getLogger(__name__)


def vae_config(fields: dict) -> AutoencoderKLConfig:
    return AutoencoderKLConfig(**{k: v for k, v in fields.items() if k != "checkpoint"})


def frozen_params(module, example_args, checkpoint: str, part: str, what: str, key):
    """`part`'s trained (EMA) weights from a run or model folder, boxed like `module`'s init; without a
    checkpoint, a random init (warned)."""
    abstract = jax.eval_shape(lambda k: init_boxed(module, k, *example_args), key)
    if not checkpoint:
        log.warning("%s: no checkpoint given, using a frozen random init", what)
        return init_boxed(module, key, *example_args)
    params = sources.ema_params(checkpoint, part)
    shapes = jax.tree.map(lambda a: a.shape, (params, nn.meta.unbox(abstract)))
    if jax.tree.structure(shapes[0]) != jax.tree.structure(shapes[1]) or shapes[0] != shapes[1]:
        raise ValueError(f"{what}: the weights in {checkpoint!r} do not fit this run's config of it (other "
                         f"sizes or layers); make the config's fields those of the run that trained them")
    return rebox(params, abstract)


def per_frame(fn, x):
    """fn on images [N, H, W, C] applied to [..., H, W, C] (videos: every frame)."""
    y = fn(x.reshape(-1, *x.shape[-3:]))
    return y.reshape(*x.shape[:-3], *y.shape[1:])


class Latents:
    """A frozen VAE's scaled latent space: `encode(params, images, key=None)` -> (posterior samples, or means
    without a key - shift) * scaling_factor; `decode(params, z)` its inverse through the decoder."""

    def __init__(self, config: AutoencoderKLConfig, dtype):
        self.config = config
        self.vae = AutoencoderKL(config, dtype=dtype)

    def encode(self, params, images, key=None):
        def encode(x):
            mean, logvar = self.vae.apply({"params": params}, x, method=self.vae.encode)
            return mean if key is None else sample_posterior(key, mean, logvar)
        c = self.config
        return (per_frame(encode, images) - (c.shift_factor or 0.0)) * c.scaling_factor

    def decode(self, params, z):
        c = self.config
        z = z / c.scaling_factor + (c.shift_factor or 0.0)
        return per_frame(lambda x: self.vae.apply({"params": params}, x, method=self.vae.decode), z)

    def frozen(self, fields: dict, image_size: int, what: str, key):
        return frozen_params(self.vae, (jnp.zeros((1, image_size, image_size, self.config.in_channels)),),
                             fields.get("checkpoint", ""), "vae", what, key)


def t5_config_for(fields: dict, spec) -> T5Config:
    """A T5 encoder config from `fields`, with the vocabulary and special ids of the data's tokenizer."""
    return T5Config(**{**fields, "vocab_size": spec.vocab_size, "pad_token_id": spec.pad_token_id,
                       "eos_token_id": spec.eos_token_id})


def text_modules(m, spec, dtype=jnp.float32) -> tuple[CLIPTextModel | None, T5EncoderModel | None, int, int | None]:
    """(the frozen CLIP of config.model.text_encoder, the trained T5 of config.model.t5, each None when absent, the
    width of the text states: T5's if any, else CLIP's, the width of the pooled embedding: CLIP's, or None)."""
    clip = None if m.text_encoder is None else CLIPTextModel(text_config_for(dict(m.text_encoder), spec), dtype=dtype)
    t5 = None if m.t5 is None else T5EncoderModel(t5_config_for(dict(m.t5), spec), dtype=dtype)
    pooled_width = clip.config.hidden_size if clip else None
    return clip, t5, t5.config.d_model if t5 else pooled_width, pooled_width


class Text:
    """The text conditioning of a text-conditioned run: `encode(t5_params, clip_params, tokens)` -> (states [B, L,
    width], pooled [B, pooled_width] or None). The frozen CLIP (config.model.text_encoder) gives both; with
    config.model.t5 the trained T5 encoder gives the states, beside CLIP's pooled state (an MMDiT: as
    `FluxTextEncoders` reads an exported folder's text_encoder/ and text_encoder_2/) or alone (Wan: as `WanEncoders`
    reads UMT5, padding masked). `frozen`: CLIP's params (from its checkpoint), or None without CLIP."""

    def __init__(self, m, spec, dtype, what: str, key):
        self.clip, self.t5, self.width, self.pooled_width = text_modules(m, spec, dtype)
        self.frozen = None if self.clip is None else frozen_params(
            self.clip, (jnp.zeros((1, spec.max_length), jnp.int32),), m.text_encoder.get("checkpoint", ""),
            "text_encoder", what, key)
        self.length, self.pad_token_id = spec.max_length, spec.pad_token_id

    def init_t5(self, key):
        """The trained T5's random init (boxed)."""
        return init_boxed(self.t5, key, jnp.zeros((1, self.length), jnp.int32))

    def encode(self, t5_params, clip_params, tokens):
        if self.t5 is None:
            return self.clip.apply({"params": clip_params}, tokens)
        if self.clip is None:
            mask = (tokens != self.pad_token_id).astype(jnp.int32)
            return WanEncoders(self.t5).apply({"params": {"text_encoder": t5_params}}, (tokens, mask))
        return FluxTextEncoders(self.clip, self.t5).apply(
            {"params": {"text_encoder": clip_params, "text_encoder_2": t5_params}}, (tokens, tokens))
