"""The denoising network of a diffusion config: a U-Net, a DiT, an MMDiT, a video U-Net or a Wan video transformer,
from scratch, fine-tuned from a trained U-Net, MMDiT or Wan transformer (`init_from`; with conditioning channels the
source did not read, e.g. a layout map, its input layer widened by zeros), or inflated from a U-Net into a video U-Net."""
from __future__ import annotations

import json
import logging

import jax.numpy as jnp

from jaxdiff.models import DiT, DiTConfig, SD3Config, SD3Transformer2D, TemporalUNet, TemporalUNetConfig, \
    UNet2DCondition, UNetConfig, WanConfig, WanTransformer3D, inflate
from jaxdiff.models.temporal_unet import inflated_config
from jaxdiff.training import sources
from jaxdiff.training.recipes.diffusion.config import ModelConfig
from jaxdiff.training.recipes.diffusion.latents import vae_config

log = logging.getLogger(__name__)

# Where each backbone reads its input channels: the layer `widened` grows for added conditioning channels.
INPUT_LAYERS = {"unet": ("conv_in",), "mmdit": ("pos_embed", "proj"), "wan": ("patch_embedding",)}


def image_unet(unet_fields: dict, channels: int, size: int, dtype, extra_channels: int = 0) -> UNet2DCondition:
    """The 2-D U-Net of `unet_fields` (UNetConfig fields) on `channels` (+ `extra_channels` of conditioning read,
    not predicted) x size x size inputs."""
    return UNet2DCondition(UNetConfig(**{**unet_fields, "in_channels": channels + extra_channels,
                                         "out_channels": channels, "sample_size": size}), dtype=dtype)


def video_unet(m: ModelConfig, channels: int, size: int, dtype) -> tuple[TemporalUNet, UNet2DCondition | None]:
    """The video U-Net on `channels`-channel latents of size x size, and the image U-Net it inflates: None
    from scratch (`m.temporal_unet`), else that of `m.init_from` (read from its config; no weights loaded)."""
    if m.temporal_unet:
        t = m.temporal_unet
        fields = {"in_channels": channels + t.get("conditioning_frame_channels", 0), "out_channels": channels,
                  "sample_size": size}
        return TemporalUNet(TemporalUNetConfig(**{**t, **fields}), dtype=dtype), None
    unet = source_unet(m, size, dtype)
    return TemporalUNet(inflated_config(unet.config, **(m.temporal or {})), dtype=dtype), unet


def network(m: ModelConfig, channels: int, size: int, dtype, text_width: int | None = None,
            pooled_width: int | None = None, extra_channels: int = 0):
    """The denoising network of `m` on `channels` x size x size latents (no weights: an inflated video U-Net's
    architecture is read from its image run's config). `text_width`: the text states' width (an MMDiT's
    joint_attention_dim, a Wan transformer's text_dim); `pooled_width`: the pooled text embedding's (an MMDiT's
    pooled_projection_dim; default text_width); `extra_channels`: conditioning channels appended to the input
    (image backbones and Wan; the output keeps `channels`)."""
    fields = {"in_channels": channels + extra_channels, "out_channels": channels, "sample_size": size}
    if m.backbone == "wan":
        return WanTransformer3D(WanConfig(**{**m.wan, "in_channels": channels + extra_channels, "out_channels": channels,
                                             "text_dim": text_width}), dtype=dtype, remat=m.remat)
    if m.backbone == "mmdit":
        return SD3Transformer2D(SD3Config(**{**m.mmdit, **fields, "joint_attention_dim": text_width,
                                             "pooled_projection_dim": pooled_width or text_width}),
                                dtype=dtype, remat=m.remat)
    if m.backbone == "dit":
        return DiT(DiTConfig(**{**m.dit, **fields}), dtype=dtype, remat=m.remat)
    if m.backbone == "unet":
        return image_unet(m.unet, channels, size, dtype, extra_channels)
    return video_unet(m, channels, size, dtype)[0]


def backbone(m: ModelConfig, channels: int, size: int, dtype, text_width: int | None = None,
             pooled_width: int | None = None, extra_channels: int = 0):
    """(`network(...)`, None or initial(key, fresh) -> its initial params (plain arrays) given a fresh random init:
    the init_from run's EMA U-Net, MMDiT or Wan transformer as it is (unet, mmdit, wan; its input layer `widened`
    for extra_channels) or inflated (temporal_unet), else Wan's training init (wan) or the network's own."""
    net = network(m, channels, size, dtype, text_width, pooled_width, extra_channels)
    if not m.init_from:
        return net, wan_training_init if m.backbone == "wan" else None
    if m.backbone in INPUT_LAYERS:
        if m.backbone == "unet":
            check_same_unet(m, net, source_unet(m, size, dtype))
        else:
            check_same_transformer(m)
        weights = sources.ema_params(m.init_from, "unet" if m.backbone == "unet" else "transformer")
        return net, lambda key, fresh: widened(weights, fresh, INPUT_LAYERS[m.backbone])
    net, unet = video_unet(m, channels, size, dtype)
    weights = sources.ema_params(m.init_from, "unet")   # host arrays (init runs under a trace, where orbax cannot load)
    return net, lambda key, fresh: inflate(unet, weights, key, **(m.temporal or {}))[1]


def check_same_unet(m: ModelConfig, net: UNet2DCondition, source: UNet2DCondition) -> None:
    differ = sorted(k for k, v in vars(net.config).items() if getattr(source.config, k) != v and k != "in_channels")
    if differ:
        raise ValueError(f"config.model.init_from={m.init_from!r}: that run's U-Net differs from "
                         f"config.model.unet in {', '.join(differ)}; fine-tuning keeps the architecture")


def check_same_transformer(m: ModelConfig) -> None:
    """The init_from run must be a latent run of m's transformer backbone (mmdit, wan) with config.model's fields of
    it, its t5 and its text encoder."""
    r = sources.run_config(m.init_from, "transformer").model
    if r.get("backbone") != m.backbone or r.get("space") != "latent":
        raise ValueError(f"config.model.init_from={m.init_from!r}: need a latent run of backbone {m.backbone!r}; "
                         f"that run has backbone={r.get('backbone')!r}, space={r.get('space')!r}")
    for part in (m.backbone, "t5", "text_encoder"):
        theirs, ours = r.get(part), getattr(m, part)
        theirs = None if theirs is None else theirs.to_dict()
        if part == "text_encoder":   # where a frozen encoder is read from may differ; its shape may not
            theirs, ours = ({k: v for k, v in (d or {}).items() if k != "checkpoint"} for d in (theirs, ours))
        if json.loads(json.dumps(theirs)) != json.loads(json.dumps(ours)):   # (a recorded config's tuples are lists)
            raise ValueError(f"config.model.init_from={m.init_from!r}: that run's config.model.{part} is {theirs}, "
                             f"this run's {ours}; fine-tuning keeps the architecture")


def widened(weights: dict, fresh: dict, layer: tuple[str, ...]) -> dict:
    """`weights` with `layer`'s kernel [..., C_in, C_out] grown to `fresh`'s input channels, the added rows zero, so
    the network computes what it did until the new channels' weights train."""
    *parents, name = layer
    source, target = weights, fresh
    for key in layer:
        source, target = source[key], target[key]
    kernel = source["kernel"]
    added = target["kernel"].shape[-2] - kernel.shape[-2]
    if added == 0:
        return weights
    if added < 0 or target["kernel"].shape[:-2] + target["kernel"].shape[-1:] != kernel.shape[:-2] + kernel.shape[-1:]:
        raise ValueError(f"{'/'.join(layer)}: the source's kernel {kernel.shape} cannot grow into {target['kernel'].shape}")
    grown = {**source, "kernel": jnp.concatenate([jnp.asarray(kernel), jnp.zeros((*kernel.shape[:-2], added,
                                                                                  kernel.shape[-1]), kernel.dtype)], -2)}
    out = dict(weights)
    node = out
    for key in parents:
        node[key] = dict(node[key])
        node = node[key]
    node[name] = grown
    return out


def wan_training_init(key, fresh):
    """The fresh init with the output projection's kernel zero, as the Wan reference's `WanModel.init_weights` trains
    (so the untrained transformer predicts zero velocity, like DiT's and MMDiT's zero output layers); the module's
    own init is diffusers' (random), which loading checkpoints never sees."""
    return {**fresh, "proj_out": {**fresh["proj_out"], "kernel": jnp.zeros_like(fresh["proj_out"]["kernel"])}}


def source_unet(m: ModelConfig, size: int, dtype) -> UNet2DCondition:
    """The image U-Net of the latent text-to-image run or model folder `m.init_from` (from its recorded config)."""
    path = m.init_from
    run = sources.run_config(path, "unet")
    r = run.model
    if run.get("recipe") != "diffusion" or r.get("backbone") != "unet" or r.get("space") != "latent" \
            or "text_encoder" not in r:
        raise ValueError(f"config.model.init_from={path!r}: need a latent text-to-image diffusion run with backbone "
                         f"'unet'; that run has recipe={run.get('recipe')!r}, backbone={r.get('backbone')!r}, "
                         f"space={r.get('space')!r}, text encoder: {'text_encoder' in r}")
    channels = vae_config(r.vae).latent_channels
    if channels != vae_config(m.vae).latent_channels:
        raise ValueError(f"config.model.init_from={path!r}: that run's VAE has {channels} latent channels, "
                         f"config.model.vae has {vae_config(m.vae).latent_channels}")
    # A model folder carries its own VAE and text encoder; a run names theirs.
    differ = [f"{part}.checkpoint" for part in ("vae", "text_encoder")
              if getattr(m, part).get("checkpoint", "") not in ({path} if sources.is_model_folder(path)
                                                                else {r[part].get("checkpoint", "")})]
    objective = m.objective
    differ += [f for f in ("schedule", "prediction_type", "rescale_zero_terminal_snr")
               if r.get(f, False if f.startswith("rescale") else None) != getattr(objective, f)]
    if differ:
        log.warning("U-Net initialised from %s, whose %s differ from this run's", path, ", ".join(differ))
    return image_unet(r.unet.to_dict(), channels, size, dtype)
