"""Weights in and out as diffusers model folders (`config.json` + `diffusion_pytorch_model.safetensors`).

    unet, params = from_diffusers("sd/unet")            # UNet2DConditionModel -> UNet2DCondition
    video, params = from_diffusers("t2v/unet")          # UNet3DConditionModel -> TemporalUNet
    vae, params = from_diffusers("sd/vae")              # AutoencoderKL -> AutoencoderKL
    mmdit, params = from_diffusers("sd3/transformer")   # SD3Transformer2DModel -> SD3Transformer2D
    flux, params = from_diffusers("flux/transformer")   # FluxTransformer2DModel -> FluxTransformer2D
    to_diffusers(unet, params, "out/unet")              # loadable by diffusers' from_pretrained
    pipe = load_pipeline("sd")                          # a whole StableDiffusionPipeline folder

Params are returned as plain (unboxed) arrays; `to_diffusers` accepts boxed or plain trees.
Flax submodules carry diffusers' attribute names, so a Flax path spells its torch key once
list indices are restored: `down_blocks_0/resnets_1/conv1/kernel` <-> `down_blocks.0.resnets.1.conv1.weight`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert.common import CheckpointError, export_params, import_params, load_state_dict, read_config, \
    save_state_dict, verify_checksums
from jaxdiff.convert.transformers import from_transformers
from jaxdiff.models.layers import param_shapes
from jaxdiff.models.flux import FluxConfig, FluxTransformer2D
from jaxdiff.models.mmdit import SD3Config, SD3Transformer2D, position_table
from jaxdiff.models.temporal_unet import TemporalUNet, TemporalUNetConfig
from jaxdiff.models.unet import UNet2DCondition, UNetConfig
from jaxdiff.models.vae import AutoencoderKL, AutoencoderKLConfig
from jaxdiff.tokenizers import load_tokenizer

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Written as `_diffusers_version`: the config layout we emit is the one of this release.
DIFFUSERS_FORMAT_VERSION = "0.35.0"

# Submodule lists in diffusers (nn.ModuleList); Flax names their items `<list>_<i>`.
_MODULE_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
                 "upsamplers", "to_out", "net", "temp_convs", "temp_attentions", "single_transformer_blocks",
                 # TemporalConvLayer's nn.Sequential items (`conv1.0` GroupNorm, `conv1.2` Conv3d, ...)
                 "conv1", "conv2", "conv3", "conv4")
_LIST_ITEM = re.compile(rf"^({'|'.join(_MODULE_LISTS)})_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# diffusers `_class_name` -> (config class, module class)
_MODELS = {
    "UNet2DConditionModel": (UNetConfig, UNet2DCondition),
    "AutoencoderKL": (AutoencoderKLConfig, AutoencoderKL),
    "UNet3DConditionModel": (TemporalUNetConfig, TemporalUNet),
    "SD3Transformer2DModel": (SD3Config, SD3Transformer2D),
    "FluxTransformer2DModel": (FluxConfig, FluxTransformer2D),
}


def torch_key_of(path: tuple[str, ...]) -> str:
    """Flax param path -> diffusers state-dict key."""
    *modules, leaf = path
    return ".".join([_LIST_ITEM.sub(r"\1.\2", m) for m in modules] + [_LEAF_NAMES[leaf]])


def fixed_buffers(module: nn.Module) -> dict:
    """Tensors a diffusers checkpoint stores but jaxdiff computes (SD3's sin-cos position table), by torch key."""
    if isinstance(module, SD3Transformer2D) and module.config.pos_embed_max_size is not None:
        return {"pos_embed.pos_embed": position_table(module.config)}
    return {}


def _check_fixed_buffers(module: nn.Module, state_dict: dict) -> dict:
    """Drops the fixed buffers from a loaded state dict after checking they hold what jaxdiff computes."""
    state_dict = dict(state_dict)
    for key, want in fixed_buffers(module).items():
        got = state_dict.pop(key, None)
        if got is None or got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=1e-6):
            found = "missing" if got is None else f"shape {got.shape}" if got.shape != want.shape else \
                f"max |difference| {np.abs(got - want).max():.2e}"
            raise CheckpointError(f"tensor {key!r} is not the fixed table jaxdiff computes for this config "
                                  f"(shape {want.shape}): {found}")
    return state_dict


def module_from_config(config: dict, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> nn.Module:
    """The jaxdiff module for a diffusers `config.json` dict (dispatch on `_class_name`)."""
    name = config.get("_class_name")
    if name not in _MODELS:
        raise CheckpointError(f"diffusers model class {name!r} is not supported; supported: {', '.join(_MODELS)}")
    config_cls, module_cls = _MODELS[name]
    return module_cls(config_cls.from_diffusers_config(config), dtype=dtype, param_dtype=param_dtype)


def from_diffusers(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    """Loads a diffusers model folder. Returns (module, params) with params plain arrays in `param_dtype`.

    Reads `diffusion_pytorch_model.safetensors`, or a sharded `*.safetensors.index.json` set.
    Every tensor's shape is checked against the module; a missing or left-over tensor is an
    error naming its key.
    """
    module = module_from_config(read_config(path), dtype, param_dtype)
    weights = os.path.join(path, WEIGHTS_NAME)
    state_dict = _check_fixed_buffers(module, load_state_dict(weights if os.path.isfile(weights) else path))
    template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype), param_shapes(module))
    params = import_params(state_dict, template, torch_key_of)
    return module, jax.tree.map(jnp.asarray, params)


def to_diffusers(module: nn.Module, params, path: str, jaxdiff_fields: bool = False) -> None:
    """Writes `config.json` + `diffusion_pytorch_model.safetensors` that diffusers' `from_pretrained` loads.

    Params are checked against the module's shapes first, so a wrong tree fails here, not in diffusers.
    `jaxdiff_fields` (video U-Nets only): write the settings diffusers cannot express (frame position
    embeddings, per-block heads, ...) as extra config fields instead of refusing them; `from_diffusers`
    loads such a folder exactly, diffusers cannot (see `TemporalUNetConfig.to_diffusers_config`).
    """
    if jaxdiff_fields and not isinstance(module, TemporalUNet):
        raise ValueError(f"jaxdiff_fields=True is for a video U-Net's config; {type(module).__name__} has none")
    state_dict = export_params(nn.meta.unbox(params), torch_key_of)
    import_params(state_dict, param_shapes(module), torch_key_of)  # fails naming any wrong key or shape
    state_dict.update(fixed_buffers(module))
    # safetensors' numpy writer has no bfloat16: store those as float32 (torch casts on load).
    state_dict = {k: v.astype("float32") if v.dtype == jnp.bfloat16 else v for k, v in state_dict.items()}
    config = module.config.to_diffusers_config(jaxdiff_fields=True) if jaxdiff_fields else \
        module.config.to_diffusers_config()
    config["_diffusers_version"] = DIFFUSERS_FORMAT_VERSION
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_state_dict(state_dict, os.path.join(path, WEIGHTS_NAME))


@dataclasses.dataclass
class StableDiffusion:
    """The parts of a latent diffusion pipeline folder (its denoiser: a U-Net or an MMDiT), as jaxdiff modules and
    plain params."""
    denoiser: Any
    denoiser_params: Any
    vae: AutoencoderKL
    vae_params: Any
    text_encoder: nn.Module
    text_params: Any
    tokenizer: Any
    scheduler_config: dict


# The components every pipeline folder needs, beside its denoiser: unet/ (Stable Diffusion) or transformer/ (an
# MMDiT, SD3's denoiser, as jaxdiff's own MMDiT text-to-image folders hold it with one CLIP text encoder).
PIPELINE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
DENOISERS = ("unet", "transformer")


def _part(path: str, part: str, load, *args):
    """load(path/part, *args), a checkpoint error naming the part (unet/, vae/, ...) it comes from."""
    try:
        return load(os.path.join(path, part), *args)
    except CheckpointError as e:
        raise CheckpointError(f"{part}/: {e}") from e


def load_pipeline(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                  denoiser_type: type | tuple = (UNet2DCondition, SD3Transformer2D), verify: bool = True) -> StableDiffusion:
    """Loads a latent diffusion pipeline folder (`model_index.json`, unet/ or transformer/, vae/, text_encoder/,
    tokenizer/, scheduler/): Stable Diffusion, or an MMDiT (SD3Transformer2DModel in transformer/) on one CLIP text
    encoder whose states are its text tokens and whose pooled state its pooled embedding (jaxdiff's MMDiT folders;
    SD3's own three-encoder folders are not supported yet). Other components (safety_checker, feature_extractor)
    are not loaded. `denoiser_type=TemporalUNet` loads a text-to-video folder (diffusers' TextToVideoSDPipeline).

    The text encoder goes through `jaxdiff.convert.from_transformers`, the tokenizer through
    `jaxdiff.tokenizers.load_tokenizer` (CLIP's BPE, or a WordTokenizer for jaxdiff's caption-vocabulary
    models); the scheduler's config is returned as a dict. With `verify` (the default) the weights are
    checked against the folder's checksums.json, when it has one (`jaxdiff.convert.common.verify_checksums`).
    """
    index = read_config(path, "model_index.json")
    given = lambda c: isinstance(index.get(c), list) and index[c][0] is not None
    denoisers = [c for c in DENOISERS if given(c)]
    missing = [c for c in PIPELINE_COMPONENTS if not given(c)] + ([] if len(denoisers) == 1 else ["unet or transformer"])
    if missing:
        raise CheckpointError(f"pipeline {path!r} ({index.get('_class_name')}) lacks components {missing}; "
                              f"a latent diffusion folder needs unet or transformer, {', '.join(PIPELINE_COMPONENTS)}")
    extra = [c for c in ("text_encoder_2", "text_encoder_3") if given(c)]
    if extra:
        raise CheckpointError(f"pipeline {path!r} ({index.get('_class_name')}) has {', '.join(extra)}: pipelines "
                              f"with several text encoders (SDXL, SD3) are not supported yet")
    if verify:
        verify_checksums(path)
    part = denoisers[0]
    denoiser, denoiser_params = _part(path, part, from_diffusers, dtype, param_dtype)
    vae, vae_params = _part(path, "vae", from_diffusers, dtype, param_dtype)
    if not isinstance(denoiser, denoiser_type) or not isinstance(vae, AutoencoderKL):
        raise CheckpointError(f"pipeline {path!r}: {part}/ holds a {type(denoiser).__name__}, vae/ a "
                              f"{type(vae).__name__}")
    text_encoder, text_params = _part(path, "text_encoder", from_transformers, dtype, param_dtype)
    width, c = text_encoder.config.hidden_size, denoiser.config
    wants = {"joint_attention_dim": c.joint_attention_dim, "pooled_projection_dim": c.pooled_projection_dim} \
        if isinstance(denoiser, SD3Transformer2D) else {"cross_attention_dim": c.cross_attention_dim}
    for field, value in wants.items():
        if value != width:
            raise CheckpointError(f"pipeline {path!r}: the text encoder's hidden_size={width} does not match the "
                                  f"{'U-Net' if part == 'unet' else 'MMDiT'}'s {field}={value}")
    return StableDiffusion(denoiser, denoiser_params, vae, vae_params, text_encoder, text_params,
                           load_tokenizer(os.path.join(path, "tokenizer")),
                           read_config(os.path.join(path, "scheduler"), "scheduler_config.json"))
