"""Denoising diffusion and flow matching, in pixel space or in a frozen VAE's latent space, with a
U-Net or a DiT, optionally conditioned on a frozen CLIP text encoder (latent diffusion,
Rombach et al. 2022) with caption dropout for classifier-free guidance (Ho & Salimans 2022).

config.model:
  backbone: unet | dit;  unet / dit: the backbone's config fields
  space: pixel | latent; vae: AutoencoderKLConfig fields + checkpoint (a vae run's workdir)
  text_encoder: CLIPTextConfig fields + checkpoint (a clip run's workdir); absent: unconditional
  schedule, num_train_timesteps, prediction_type (epsilon | v_prediction | sample | flow),
  weighting (simple | snr | min_snr | edm), min_snr_gamma, timestep_distribution, caption_dropout,
  sample_method, sample_steps, guidance_scale
A frozen part without a checkpoint is randomly initialised (for tests and smoke runs) and says so.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxdiff import diffusion, guidance, losses, samplers, schedules
from jaxdiff.models import AutoencoderKL, AutoencoderKLConfig, CLIPTextModel, DiT, DiTConfig, \
    UNet2DCondition, UNetConfig
from jaxdiff.models.vae import sample_posterior
from jaxdiff.training.checkpoint import load_params
from jaxdiff.training.config import choice
from jaxdiff.training.recipes.clip import text_config_for
from jaxdiff.training.task import Task, init_boxed, rebox

BACKBONES = ("unet", "dit")
SPACES = ("pixel", "latent")
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")

log = logging.getLogger(__name__)


def schedule_for(m) -> schedules.Schedule:
    """The noise schedule; flow prediction and the flow_matching schedule go together."""
    schedule = schedules.get(m.schedule, m.num_train_timesteps)
    choice(m.prediction_type, PREDICTIONS, "model.prediction_type")
    if (schedule.kind == "flow") != (m.prediction_type == "flow"):
        raise ValueError(f"config.model.prediction_type={m.prediction_type!r} does not fit "
                         f"config.model.schedule={m.schedule!r}: use prediction_type='flow' with exactly the "
                         f"flow_matching schedule")
    return schedule


def denoising_loss(apply_fn, x0, key, schedule, m, context=None):
    """The denoising (or flow matching) loss of `apply_fn(x_t, timestep, context)` on clean data x0 [B, ...].

    Timesteps from `m.timestep_distribution`; the model sees the schedule's timestep value
    (i for discrete schedules, sigma * N for flow matching), as samplers give it."""
    k_t, k_noise = jax.random.split(key)
    t = losses.sample_timesteps(k_t, x0.shape[0], schedule, m.get("timestep_distribution", "uniform"))
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    out = apply_fn(x_t, schedule.table("timesteps", t), context)
    loss, _ = losses.diffusion_loss(out, x0, noise, t, schedule, prediction_type=m.prediction_type,
                                    weighting=m.weighting, min_snr_gamma=m.get("min_snr_gamma", 5.0))
    return loss


def _frozen(module, boxed_abstract, checkpoint: str, subtree: str, what: str):
    """Trained weights from a run's checkpoint (EMA) or, without one, a random init (warned)."""
    if not checkpoint:
        log.warning("%s: no checkpoint given, using a frozen random init", what)
        return None
    params = load_params(checkpoint, "ema")
    return rebox(params[subtree] if subtree else params, boxed_abstract)


def build(c, spec) -> Task:
    m = c.model
    dtype = jnp.dtype(c.dtype)
    schedule = schedule_for(m)
    choice(m.backbone, BACKBONES, "model.backbone")
    latent = choice(m.space, SPACES, "model.space") == "latent"
    text = "text_encoder" in m
    size = spec.image_size

    vae = vae_cfg = None
    frozen_init = {}
    if latent:
        vae_cfg = AutoencoderKLConfig(**{k: v for k, v in m.vae.items() if k != "checkpoint"})
        vae = AutoencoderKL(vae_cfg, dtype=dtype)
        frozen_init["vae"] = (vae, (jnp.zeros((1, size, size, vae_cfg.in_channels)),), m.vae.get("checkpoint", ""),
                              "vae")
        size //= vae_cfg.downsample_factor
    if text:
        text_cfg = text_config_for(m.text_encoder.to_dict(), spec)
        encoder = CLIPTextModel(text_cfg, dtype=dtype)
        frozen_init["text"] = (encoder, (jnp.zeros((1, spec.max_length), jnp.int32),),
                               m.text_encoder.get("checkpoint", ""), "text_model")
        empty = jnp.asarray(spec.empty_tokens, jnp.int32)

    frozen = {}
    for name, (module, args, ckpt, subtree) in frozen_init.items():
        key = jax.random.fold_in(jax.random.key(c.seed), len(frozen) + 1)
        abstract = jax.eval_shape(lambda k: init_boxed(module, k, *args), key)
        frozen[name] = _frozen(module, abstract, ckpt, subtree, f"{m.space} diffusion's {name}") or \
            init_boxed(module, key, *args)

    channels = vae_cfg.latent_channels if latent else 3
    if m.backbone == "unet":
        net = UNet2DCondition(UNetConfig(**{**m.unet.to_dict(), "in_channels": channels, "out_channels": channels,
                                            "sample_size": size}), dtype=dtype)
    else:
        net = DiT(DiTConfig(**{**m.dit.to_dict(), "in_channels": channels, "out_channels": channels,
                               "sample_size": size}), dtype=dtype)
    ctx_dim = text_cfg.hidden_size if text else None

    def encode_text(frozen, tokens):
        return encoder.apply({"params": frozen["text"]}, tokens)[0]

    def to_latent(frozen, images, key):
        mean, logvar = vae.apply({"params": frozen["vae"]}, images, method=vae.encode)
        z = sample_posterior(key, mean, logvar)
        return (z - (vae_cfg.shift_factor or 0.0)) * vae_cfg.scaling_factor

    def init(key):
        x = jnp.zeros((1, size, size, channels))
        ctx = jnp.zeros((1, spec.max_length, ctx_dim)) if text else None
        return init_boxed(net, key, x, jnp.zeros((1,)), ctx)

    def loss(params, frozen, batch, key, step):
        k_post, k_drop, k_loss = jax.random.split(key, 3)
        x0 = batch["image"]
        if latent:
            x0 = to_latent(frozen, x0, k_post)
        context = None
        if text:
            drop = jax.random.bernoulli(k_drop, m.caption_dropout, (x0.shape[0],))
            context = encode_text(frozen, jnp.where(drop[:, None], empty[None], batch["tokens"]))
        apply_fn = lambda x, t, ctx: net.apply({"params": params}, x, t, ctx)
        value = denoising_loss(apply_fn, x0, k_loss, schedule, m, context)
        return value, {}

    def sample(params, frozen, key):
        n = len(spec.preview_prompts) if text else 8
        noise = jax.random.normal(key, (n, size, size, channels))
        apply_fn = lambda x, t, ctx: net.apply({"params": params}, x, t, ctx)
        if text:
            context = encode_text(frozen, jnp.asarray(spec.tokenize(list(spec.preview_prompts))))
            model_fn = guidance.cfg(apply_fn, context, encode_text(frozen, jnp.broadcast_to(empty, (n, empty.size))),
                                    m.guidance_scale)
        else:
            model_fn = lambda x, t: apply_fn(x, t, None)
        x = samplers.sample(model_fn, schedule, noise, key=jax.random.fold_in(key, 1), method=m.sample_method,
                            steps=m.sample_steps, prediction_type=m.prediction_type)
        if latent:
            x = vae.apply({"params": frozen["vae"]}, x / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0),
                          method=vae.decode)
        return jnp.clip(x / 2 + 0.5, 0.0, 1.0)

    return Task(init=init, loss=loss, frozen=frozen or None, sample=sample)
