"""Weights in and out as diffusers model folders (`config.json` + `diffusion_pytorch_model.safetensors`).

    unet, params = from_diffusers("sd/unet")            # UNet2DConditionModel -> UNet2DCondition
    video, params = from_diffusers("t2v/unet")          # UNet3DConditionModel -> TemporalUNet
    vae, params = from_diffusers("sd/vae")              # AutoencoderKL -> AutoencoderKL
    mmdit, params = from_diffusers("sd3/transformer")   # SD3Transformer2DModel -> SD3Transformer2D
    flux, params = from_diffusers("flux/transformer")   # FluxTransformer2DModel -> FluxTransformer2D
    wan, params = from_diffusers("wan/transformer")     # WanTransformer3DModel -> WanTransformer3D
    wan_vae, params = from_diffusers("wan/vae")         # AutoencoderKLWan -> AutoencoderKLWan
    to_diffusers(unet, params, "out/unet")              # loadable by diffusers' from_pretrained
    pipe = load_pipeline("sd")                          # a whole pipeline folder (SD 1/2, SDXL, SD3, Flux)

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

from jaxdiff.convert.common import CheckpointError, export_params, import_params, load_state_dict, placement, \
    read_config, save_state_dict, verify_checksums
from jaxdiff.convert.transformers import from_transformers
from jaxdiff.models.clip import CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel
from jaxdiff.models.layers import param_shapes
from jaxdiff.models.flux import FluxConfig, FluxTransformer2D
from jaxdiff.models.mmdit import SD3Config, SD3Transformer2D, position_table
from jaxdiff.models.t5 import T5EncoderModel
from jaxdiff.models.temporal_unet import TemporalUNet, TemporalUNetConfig
from jaxdiff.models.text_encoders import FluxTextEncoders, SD3TextEncoders, SDXLTextEncoders, WanEncoders
from jaxdiff.models.unet import UNet2DCondition, UNetConfig
from jaxdiff.models.vae import AutoencoderKL, AutoencoderKLConfig
from jaxdiff.models.wan import WanConfig, WanTransformer3D
from jaxdiff.models.wan_vae import AutoencoderKLWan, AutoencoderKLWanConfig
from jaxdiff.tokenizers import MultiTokenizer, T5Tokenizer, WanTokenizer, WordTokenizer, load_tokenizer

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Written as `_diffusers_version`: the config layout we emit is the one of this release.
DIFFUSERS_FORMAT_VERSION = "0.35.0"

# Submodule lists in diffusers (nn.ModuleList); Flax names their items `<list>_<i>`.
_MODULE_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
                 "upsamplers", "to_out", "net", "temp_convs", "temp_attentions", "single_transformer_blocks",
                 # TemporalConvLayer's nn.Sequential items (`conv1.0` GroupNorm, `conv1.2` Conv3d, ...)
                 "conv1", "conv2", "conv3", "conv4",
                 "blocks",   # Wan's transformer blocks
                 "resample")  # Wan VAE's resampler nn.Sequential (`resample.1` is its conv)
_LIST_ITEM = re.compile(rf"^({'|'.join(_MODULE_LISTS)})_(\d+)$")
# Flax leaf -> torch leaf; other leaves are raw parameters named alike (Wan's `scale_shift_table`).
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# diffusers `_class_name` -> (config class, module class)
_MODELS = {
    "UNet2DConditionModel": (UNetConfig, UNet2DCondition),
    "AutoencoderKL": (AutoencoderKLConfig, AutoencoderKL),
    "UNet3DConditionModel": (TemporalUNetConfig, TemporalUNet),
    "SD3Transformer2DModel": (SD3Config, SD3Transformer2D),
    "FluxTransformer2DModel": (FluxConfig, FluxTransformer2D),
    "WanTransformer3DModel": (WanConfig, WanTransformer3D),
    "AutoencoderKLWan": (AutoencoderKLWanConfig, AutoencoderKLWan),
}


def torch_key_of(path: tuple[str, ...]) -> str:
    """Flax param path -> diffusers state-dict key."""
    *modules, leaf = path
    return ".".join([_LIST_ITEM.sub(r"\1.\2", m) for m in modules] + [_LEAF_NAMES.get(leaf, leaf)])


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


def from_diffusers(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, mesh=None, rules=None):
    """Loads a diffusers model folder. Returns (module, params) with params plain arrays in `param_dtype`.

    Reads `diffusion_pytorch_model.safetensors`, or a sharded `*.safetensors.index.json` set, lazily: one
    tensor at a time, cast to `param_dtype` (e.g. jnp.bfloat16 to hold a large model in half the memory).
    With a `mesh` (and logical axis `rules`, default `jaxdiff.parallel.DEFAULT_RULES`) each param is placed
    straight into its sharding, each device reading only its own slice of the file, so neither the host nor
    a device holds a whole float32 copy. Every tensor's shape is checked against the module; a missing or
    left-over tensor is an error naming its key.
    """
    module = module_from_config(read_config(path), dtype, param_dtype)
    weights = os.path.join(path, WEIGHTS_NAME)
    state_dict = _check_fixed_buffers(module, load_state_dict(weights if os.path.isfile(weights) else path, lazy=True))
    template, shardings = placement(param_shapes(module, boxed=True), param_dtype, mesh, rules)
    params = import_params(state_dict, template, torch_key_of, shardings=shardings)
    return module, jax.device_put(params)


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
    config = module.config.to_diffusers_config(jaxdiff_fields=True) if jaxdiff_fields else \
        module.config.to_diffusers_config()
    config["_diffusers_version"] = DIFFUSERS_FORMAT_VERSION
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_state_dict(state_dict, os.path.join(path, WEIGHTS_NAME))


@dataclasses.dataclass
class StableDiffusion:
    """The parts of a latent diffusion pipeline folder (its denoiser: a U-Net, an MMDiT or Flux), as jaxdiff modules
    and plain params; several text encoders are one module (`jaxdiff.models.text_encoders`)."""
    denoiser: Any
    denoiser_params: Any
    vae: AutoencoderKL
    vae_params: Any
    text_encoder: nn.Module
    text_params: Any
    tokenizer: Any
    scheduler_config: dict


# The components every pipeline folder needs, beside its denoiser: unet/ (Stable Diffusion) or transformer/ (SD3's
# MMDiT, Flux, or jaxdiff's own MMDiT folders with one CLIP text encoder).
PIPELINE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
DENOISERS = ("unet", "transformer")
# T5's tokens in the reference pipelines (their `max_sequence_length` default)
T5_LENGTH = {SD3Transformer2D: 256, FluxTransformer2D: 512, WanTransformer3D: 512}
# Wan 2.2 pipeline settings (a second, low-noise transformer; per-token timesteps) that jaxdiff does not run
WAN22_SETTINGS = ("boundary_ratio", "expand_timesteps", "transformer_2")


def _part(path: str, part: str, load, *args):
    """load(path/part, *args), a checkpoint error naming the part (unet/, vae/, ...) it comes from."""
    try:
        return load(os.path.join(path, part), *args)
    except CheckpointError as e:
        raise CheckpointError(f"{part}/: {e}") from e


def _need(path: str, what: str, pairs) -> None:
    """Each (component, its loaded module, the module classes allowed) must hold one of those classes."""
    for part, module, allowed in pairs:
        if not isinstance(module, allowed):
            names = " or ".join(c.__name__ for c in (allowed if isinstance(allowed, tuple) else (allowed,)))
            raise CheckpointError(f"pipeline {path!r}: {part}/ holds a {type(module).__name__}; {what} needs {names}")


def _widths(path: str, pairs) -> None:
    """Each (what gives it, its width, what takes it, the width it takes) must agree."""
    for giver, width, taker, wanted in pairs:
        if width != wanted:
            raise CheckpointError(f"pipeline {path!r}: {giver} is {width} wide but {taker} takes {wanted}")


def _given(index: dict, component: str) -> bool:
    """Whether model_index.json names a class for the component (diffusers writes [null, null] for none)."""
    return isinstance(index.get(component), list) and index[component][0] is not None


def _text_conditioning(path: str, index: dict, denoiser, *load_args) -> tuple:
    """(text module, its params, tokenizer) for the folder's text encoders, as its denoiser reads them."""
    given = lambda c: _given(index, c)
    text_time = isinstance(denoiser, UNet2DCondition) and denoiser.config.addition_embed_type == "text_time"
    names = ["text_encoder"] + [c for c in ("text_encoder_2", "text_encoder_3") if given(c)]
    missing = [f"tokenizer{n[len('text_encoder'):]}" for n in names if not given(f"tokenizer{n[len('text_encoder'):]}")]
    if missing:
        raise CheckpointError(f"pipeline {path!r} lacks {', '.join(missing)} for its text encoders")
    loaded = {n: _part(path, n, from_transformers, *load_args) for n in names}
    modules, params = {n: m for n, (m, _) in loaded.items()}, {n: p for n, (_, p) in loaded.items()}
    tokenizers = {n: load_tokenizer(os.path.join(path, "tokenizer" + n[len("text_encoder"):])) for n in names}
    c = denoiser.config
    if len(names) == 1 and text_time:
        raise CheckpointError(f"pipeline {path!r}: its U-Net reads a pooled text embedding and size ids "
                              f"(addition_embed_type='text_time', SDXL's) but the folder has one text encoder; an "
                              f"SDXL folder has text_encoder and text_encoder_2")
    if len(names) == 1 and isinstance(denoiser, WanTransformer3D) and isinstance(modules["text_encoder"],
                                                                                  T5EncoderModel):
        # jaxdiff's Wan folders on a T5 trained with the transformer: read as Wan reads UMT5, over the captions' words
        t5, tokenizer = modules["text_encoder"], tokenizers["text_encoder"]
        _need(path, "a Wan transformer on a trained T5", [("tokenizer", tokenizer, WordTokenizer)])
        _widths(path, [("T5's d_model", t5.config.d_model, "the transformer's text_dim", c.text_dim)])
        return WanEncoders(t5), params, WanTokenizer(tokenizer, tokenizer.model_max_length)
    if len(names) == 1:  # Stable Diffusion 1/2, jaxdiff's MMDiT and Wan folders: one CLIP, its last states (and pooled)
        _need(path, "a one-encoder pipeline", [("text_encoder", modules["text_encoder"], CLIPTextModel)])
        width = modules["text_encoder"].config.hidden_size
        fields = {SD3Transformer2D: ("joint_attention_dim", "pooled_projection_dim"),
                  WanTransformer3D: ("text_dim",)}.get(type(denoiser), ("cross_attention_dim",))
        _widths(path, [("the text encoder's hidden_size", width, f"the denoiser's {field}", getattr(c, field))
                       for field in fields])
        return modules["text_encoder"], params["text_encoder"], tokenizers["text_encoder"]
    if isinstance(denoiser, SD3Transformer2D) and names == ["text_encoder", "text_encoder_2"] \
            and isinstance(modules["text_encoder_2"], T5EncoderModel):
        return _mmdit_t5_conditioning(path, modules, params, tokenizers, c)
    t5 = modules.get({SD3Transformer2D: "text_encoder_3", FluxTransformer2D: "text_encoder_2"}.get(type(denoiser)))
    clips = [tokenizers[n] for n in names if isinstance(modules[n], (CLIPTextModel, CLIPTextModelWithProjection))]
    lengths = [t.model_max_length for t in clips] + ([T5_LENGTH[type(denoiser)]] if t5 is not None else [])
    tokenizer = MultiTokenizer([tokenizers[n] for n in names], lengths)
    if isinstance(denoiser, SD3Transformer2D):  # CLIP-L, CLIP-G (and T5)
        _need(path, "SD3", [(n, modules[n], CLIPTextModelWithProjection) for n in ("text_encoder", "text_encoder_2")]
              + ([("text_encoder_3", t5, T5EncoderModel)] if t5 is not None else []))
        l, g = modules["text_encoder"].config, modules["text_encoder_2"].config
        _widths(path, [("CLIP-L's + CLIP-G's projection_dim", l.projection_dim + g.projection_dim,
                        "the transformer's pooled_projection_dim", c.pooled_projection_dim)]
                + ([("T5's d_model", t5.config.d_model, "the transformer's joint_attention_dim",
                     c.joint_attention_dim)] if t5 is not None else []))
        module = SD3TextEncoders(modules["text_encoder"], modules["text_encoder_2"], t5, c.joint_attention_dim,
                                 T5_LENGTH[SD3Transformer2D])
    elif isinstance(denoiser, FluxTransformer2D):  # CLIP-L's pooled state, T5's states
        _need(path, "Flux", [("text_encoder", modules["text_encoder"], CLIPTextModel),
                             ("text_encoder_2", t5, T5EncoderModel)])
        _widths(path, [("CLIP's hidden_size", modules["text_encoder"].config.hidden_size,
                        "the transformer's pooled_projection_dim", c.pooled_projection_dim),
                       ("T5's d_model", t5.config.d_model, "the transformer's joint_attention_dim",
                        c.joint_attention_dim)])
        module = FluxTextEncoders(modules["text_encoder"], t5)
    elif text_time and names == ["text_encoder", "text_encoder_2"]:  # SDXL: CLIP-L and CLIP-G
        _need(path, "SDXL", [("text_encoder", modules["text_encoder"], CLIPTextModel),
                             ("text_encoder_2", modules["text_encoder_2"], CLIPTextModelWithProjection)])
        l, g = modules["text_encoder"].config, modules["text_encoder_2"].config
        # the pooled embedding is followed by the sinusoids of 6 size ids (original size, crop corner, target size)
        _widths(path, [("CLIP-L's + CLIP-G's hidden_size", l.hidden_size + g.hidden_size,
                        "the U-Net's cross_attention_dim", c.cross_attention_dim),
                       ("CLIP-G's projection_dim + 6 size ids x addition_time_embed_dim",
                        g.projection_dim + 6 * c.addition_time_embed_dim,
                        "the U-Net's projection_class_embeddings_input_dim", c.projection_class_embeddings_input_dim)])
        module = SDXLTextEncoders(modules["text_encoder"], modules["text_encoder_2"],
                                  bool(index.get("force_zeros_for_empty_prompt", True)))
    else:
        raise CheckpointError(f"pipeline {path!r}: a {type(denoiser).__name__} with {', '.join(names)} is not "
                              f"supported; supported: SD3 and Flux folders, and SDXL's (a text_time U-Net on "
                              f"text_encoder and text_encoder_2)")
    return module, params, tokenizer


def _mmdit_t5_conditioning(path: str, modules: dict, params: dict, tokenizers: dict, c) -> tuple:
    """jaxdiff's MMDiT folders with a T5 trained beside the transformer (`config.model.t5`): T5's states are the text
    tokens and CLIP's pooled state the pooled embedding, as Flux reads its two encoders (`FluxTextEncoders`); both
    tokenizers are the captions' WordTokenizer."""
    clip, t5 = modules["text_encoder"], modules["text_encoder_2"]
    _need(path, "an MMDiT on CLIP and T5", [("text_encoder", clip, CLIPTextModel)])
    _widths(path, [("CLIP's hidden_size", clip.config.hidden_size, "the transformer's pooled_projection_dim",
                    c.pooled_projection_dim),
                   ("T5's d_model", t5.config.d_model, "the transformer's joint_attention_dim", c.joint_attention_dim)])
    words = [t for t in tokenizers.values() if isinstance(t, WordTokenizer)]
    if len(words) != 2:
        raise CheckpointError(f"pipeline {path!r}: an MMDiT on CLIP and T5 reads caption-vocabulary tokens; "
                              f"tokenizer/ and tokenizer_2/ must both be WordTokenizers")
    return (FluxTextEncoders(clip, t5), params,
            MultiTokenizer(words, [t.model_max_length for t in words]))


def _wan_conditioning(path: str, index: dict, denoiser: WanTransformer3D, vae: AutoencoderKLWan, *load_args) -> tuple:
    """(WanEncoders, its params, WanTokenizer) of a Wan 2.1 WanPipeline or WanImageToVideoPipeline folder, once its
    parts are checked to fit: UMT5's width is the transformer's text_dim; the transformer reads the VAE's latents
    (text-to-video) or those, a mask channel per frame of a latent frame and the first frame's latents
    (image-to-video: 2 z_dim + scale_factor_temporal); a transformer with image_dim reads CLIP vision's states
    (image_encoder/, image_processor/)."""
    wan22 = [k for k in WAN22_SETTINGS if (_given(index, k) if k == "transformer_2" else index.get(k))]
    if wan22:
        raise CheckpointError(f"pipeline {path!r}: Wan 2.2's {', '.join(f'{k}={index[k]!r}' for k in wan22)} is "
                              f"not supported; supported: Wan 2.1 folders (one transformer, one timestep per video)")
    text_encoder, text_params = _part(path, "text_encoder", from_transformers, *load_args)
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    _need(path, "Wan", [("text_encoder", text_encoder, T5EncoderModel), ("tokenizer", tokenizer, T5Tokenizer)])
    c, z = denoiser.config, vae.config
    _widths(path, [("UMT5's d_model", text_encoder.config.d_model, "the transformer's text_dim", c.text_dim),
                   ("the transformer's output", c.video_out_channels, "the VAE's z_dim", z.z_dim)])
    conditioned = 2 * z.z_dim + z.scale_factor_temporal
    if c.in_channels not in (z.z_dim, conditioned):
        raise CheckpointError(f"pipeline {path!r}: the transformer reads {c.in_channels} channels; with the VAE's "
                              f"z_dim={z.z_dim} a Wan transformer reads {z.z_dim} (text-to-video) or {conditioned} "
                              f"(image-to-video: latents, {z.scale_factor_temporal} mask channels, first-frame "
                              f"latents)")
    params = {"text_encoder": text_params}
    image_encoder = processor = None
    if c.image_dim is not None:
        missing = [part for part in ("image_encoder", "image_processor") if not _given(index, part)]
        if missing:
            raise CheckpointError(f"pipeline {path!r} lacks {', '.join(missing)}: its transformer reads CLIP image "
                                  f"states (image_dim={c.image_dim})")
        image_encoder, params["image_encoder"] = _part(path, "image_encoder", from_transformers, *load_args)
        processor = _part(path, "image_processor", lambda folder: CLIPImageProcessor.from_config(
            read_config(folder, "preprocessor_config.json")))
        _need(path, "a Wan image-to-video transformer", [("image_encoder", image_encoder, CLIPVisionModel)])
        side = image_encoder.config.image_size
        _widths(path, [("CLIP vision's hidden_size", image_encoder.config.hidden_size, "the transformer's image_dim",
                        c.image_dim),
                       ("image_processor/'s crop", max(processor.crop_size), "CLIP vision's image_size", side)])
        if processor.crop_size != (side, side):
            raise CheckpointError(f"pipeline {path!r}: image_processor/ crops {processor.crop_size}, but CLIP vision "
                                  f"takes {side}x{side} images")
    return (WanEncoders(text_encoder, image_encoder, processor), params,
            WanTokenizer(tokenizer, T5_LENGTH[WanTransformer3D]))


def load_pipeline(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                  denoiser_type: type | tuple = (UNet2DCondition, SD3Transformer2D, FluxTransformer2D),
                  verify: bool = True, mesh=None, rules=None) -> StableDiffusion:
    """Loads a latent diffusion pipeline folder (`model_index.json`, unet/ or transformer/, vae/, text_encoder/,
    tokenizer/, scheduler/, and text_encoder_2/, tokenizer_2/, ... where the pipeline has several encoders):
    Stable Diffusion 1/2 (one CLIP); SDXL (StableDiffusionXLPipeline: CLIP-L and CLIP-G, penultimate states, with
    its force_zeros_for_empty_prompt); SD3 / SD3.5 (StableDiffusion3Pipeline: CLIP-L, CLIP-G and T5, or no T5 when
    the folder has none, as diffusers runs it); Flux (FluxPipeline: CLIP-L and T5); jaxdiff's own MMDiT folders
    (SD3Transformer2DModel on one CLIP whose states are its text tokens and whose pooled state its pooled
    embedding, or with a trained T5 in text_encoder_2/ whose states are the text tokens instead). Other
    components (safety_checker, feature_extractor, image_encoder) are not loaded.
    `denoiser_type=(TemporalUNet, WanTransformer3D)` loads text-to-video folders: diffusers' TextToVideoSDPipeline,
    and Wan 2.1's WanPipeline / WanImageToVideoPipeline (UMT5, the causal video VAE, and for image-to-video CLIP
    vision's image_encoder/ with its image_processor/, as one `WanEncoders` module: see `_wan_conditioning`), and
    jaxdiff's own Wan folders (a Wan transformer on an image VAE's per-frame latents and one CLIP's states, or a
    trained T5's, read as UMT5 is).

    Several encoders become one module (`jaxdiff.models.text_encoders`) whose params are keyed by component
    name, with a `MultiTokenizer`. The text encoders go through `jaxdiff.convert.from_transformers`, the
    tokenizers through `jaxdiff.tokenizers.load_tokenizer` (CLIP's BPE, T5's unigram, or a WordTokenizer for
    jaxdiff's caption-vocabulary models); the scheduler's config is returned as a dict. With `verify` (the
    default) the weights are checked against the folder's checksums.json, when it has one. Params are read
    lazily in `param_dtype`, and with a `mesh` placed straight into their shardings (see `from_diffusers`).
    """
    index = read_config(path, "model_index.json")
    denoisers = [c for c in DENOISERS if _given(index, c)]
    missing = [c for c in PIPELINE_COMPONENTS if not _given(index, c)] + (
        [] if len(denoisers) == 1 else ["unet or transformer"])
    if missing:
        raise CheckpointError(f"pipeline {path!r} ({index.get('_class_name')}) lacks components {missing}; "
                              f"a latent diffusion folder needs unet or transformer, {', '.join(PIPELINE_COMPONENTS)}")
    if verify:
        verify_checksums(path)
    part = denoisers[0]
    load_args = (dtype, param_dtype, mesh, rules)
    denoiser, denoiser_params = _part(path, part, from_diffusers, *load_args)
    vae, vae_params = _part(path, "vae", from_diffusers, *load_args)
    wan = isinstance(denoiser, WanTransformer3D)   # on Wan's causal video VAE, or (jaxdiff's) an image VAE per frame
    _need(path, "this pipeline", [(part, denoiser, denoiser_type),
                                  ("vae", vae, (AutoencoderKLWan, AutoencoderKL) if wan else AutoencoderKL)])
    conditioning = _wan_conditioning(path, index, denoiser, vae, *load_args) if isinstance(vae, AutoencoderKLWan) \
        else _text_conditioning(path, index, denoiser, *load_args)
    text_encoder, text_params, tokenizer = conditioning
    return StableDiffusion(denoiser, denoiser_params, vae, vae_params, text_encoder, text_params, tokenizer,
                           read_config(os.path.join(path, "scheduler"), "scheduler_config.json"))
