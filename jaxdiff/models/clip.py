"""CLIP: contrastive language-image pre-training (Radford et al. 2021).

Flax modules that mirror transformers' CLIP parameter tree, so weights convert by a
mechanical name mapping (`jaxdiff.convert.transformers`):

- `CLIPTextModel`: causal text transformer; returns (last_hidden_state, pooled at EOS);
- `CLIPTextModelWithProjection`: plus `text_projection` (SDXL's second text encoder);
- `CLIPVisionModel`: ViT image encoder; returns (last_hidden_state, pooled class token);
- `CLIPModel`: both towers, both projections and the learned temperature `logit_scale`;
- `CLIPImageProcessor`: transformers' image preprocessing (resize, center crop, normalise) as a jittable function.

Both towers share one pre-LN `EncoderLayer`. Images are NHWC. Softmax and LayerNorm
statistics run in float32 whatever the compute `dtype`; `param_dtype` is separate.
The pure functions `clip_loss` and `zero_shot_classify` sit at the bottom.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.checks import CheckpointError, check_supported
from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.layers import flat_dot_general

Dtype = Any

# transformers' `eos_token_id` before PR #24773 was the wrong value 2; configs that still
# carry it pool at argmax(input_ids) (the EOS token had the highest id in CLIP's vocab).
LEGACY_EOS_TOKEN_ID = 2

ACTIVATIONS = {
    # Hendrycks & Gimpel's sigmoid approximation of GELU, used by OpenAI's CLIP.
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # torch's default (exact, erf-based) GELU.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


# --------------------------------------------------------------------------- configs


def _positive_int(config, field: str, what: str) -> None:
    value = getattr(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{what} config field {field}={value!r} is not supported; supported: a positive int")


def _check_heads(config, what: str) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise CheckpointError(f"{what} config: hidden_size={config.hidden_size} is not a multiple of "
                              f"num_attention_heads={config.num_attention_heads}")


def _check_model_type(d: Mapping, allowed: tuple[str, ...], what: str) -> None:
    if "model_type" in d and d["model_type"] not in allowed:
        raise CheckpointError(f"{what} config field model_type={d['model_type']!r} is not supported; "
                              f"supported: {', '.join(map(repr, allowed))}")


def _known_fields(cls, d: Mapping) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


_TOWER_ALLOWED = {
    "hidden_act": set(ACTIVATIONS),
    # Dropout is not implemented: refuse a checkpoint that trains with it.
    "attention_dropout": {0, 0.0},
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Text tower hyper-parameters; field names and defaults are transformers' (ViT-B/32)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        check_supported(dataclasses.asdict(self), _TOWER_ALLOWED, "CLIP text")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                      "num_attention_heads", "max_position_embeddings"):
            _positive_int(self, field, "CLIP text")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise CheckpointError(f"CLIP text config field eos_token_id={self.eos_token_id!r} is not supported; "
                                  "supported: a single int")
        _check_heads(self, "CLIP text")

    @classmethod
    def from_transformers_config(cls, d: Mapping) -> "CLIPTextConfig":
        """From a transformers `CLIPTextConfig` dict (config.json); missing fields take transformers' defaults."""
        _check_model_type(d, ("clip_text_model",), "CLIP text")
        check_supported(d, _TOWER_ALLOWED, "CLIP text")
        return cls(**_known_fields(cls, d))

    def to_transformers_config(self) -> dict:
        return {"model_type": "clip_text_model", **dataclasses.asdict(self), "attention_dropout": 0.0}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Vision tower hyper-parameters; field names and defaults are transformers' (ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_supported(dataclasses.asdict(self), _TOWER_ALLOWED, "CLIP vision")
        for field in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                      "num_attention_heads", "num_channels", "image_size", "patch_size"):
            _positive_int(self, field, "CLIP vision")
        _check_heads(self, "CLIP vision")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers_config(cls, d: Mapping) -> "CLIPVisionConfig":
        """From a transformers `CLIPVisionConfig` dict; missing fields take transformers' defaults."""
        _check_model_type(d, ("clip_vision_model",), "CLIP vision")
        check_supported(d, _TOWER_ALLOWED, "CLIP vision")
        return cls(**_known_fields(cls, d))

    def to_transformers_config(self) -> dict:
        return {"model_type": "clip_vision_model", **dataclasses.asdict(self), "attention_dropout": 0.0}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers, the shared embedding width and the initial temperature."""

    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    def __post_init__(self):
        _positive_int(self, "projection_dim", "CLIP")

    @classmethod
    def from_transformers_config(cls, d: Mapping) -> "CLIPConfig":
        """From a transformers `CLIPConfig` dict. Old hub configs carry `text_config_dict` /
        `vision_config_dict`, whose values override `text_config` / `vision_config` (as in transformers)."""
        _check_model_type(d, ("clip",), "CLIP")
        text = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
        vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        return cls(text=CLIPTextConfig.from_transformers_config(text),
                   vision=CLIPVisionConfig.from_transformers_config(vision),
                   **_known_fields(cls, {k: v for k, v in d.items() if k not in ("text", "vision")}))

    def to_transformers_config(self) -> dict:
        return {"model_type": "clip", "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value,
                "text_config": self.text.to_transformers_config(),
                "vision_config": self.vision.to_transformers_config()}


# --------------------------------------------------------------------------- layers


def _dense(features: int, axes: tuple[str | None, str | None], dtype, param_dtype, name: str,
           use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    dot_general=flat_dot_general,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))


def _layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it: `use_fast_variance` loses digits we need for parity.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def _embed(num: int, features: int, axes, dtype, param_dtype, name: str) -> nn.Embed:
    return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype, name=name,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))


def _constrain(x):
    """Activation sharding hint [B, L, D]; a no-op outside a mesh with logical axis rules."""
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (transformers' CLIPAttention)."""

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        d = self.hidden_size
        self.q_proj = _dense(d, ("embed", "heads"), self.dtype, self.param_dtype, "q_proj")
        self.k_proj = _dense(d, ("embed", "heads"), self.dtype, self.param_dtype, "k_proj")
        self.v_proj = _dense(d, ("embed", "heads"), self.dtype, self.param_dtype, "v_proj")
        self.out_proj = _dense(d, ("heads", "embed"), self.dtype, self.param_dtype, "out_proj")

    def __call__(self, x, mask=None):
        """x: [B, L, D]; mask: boolean broadcastable to [B, H, L, L], True = attend. Returns [B, L, D]."""
        split = lambda t: t.reshape(*t.shape[:2], self.num_heads, -1)  # [B, L, H, D/H]
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask)
        return self.out_proj(out.reshape(x.shape))


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.fc1 = _dense(self.intermediate_size, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")
        self.fc2 = _dense(self.hidden_size, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")

    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block shared by the text and vision towers:
    x + attn(LN1(x)), then x + mlp(LN2(x))."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.layer_norm1 = _layer_norm(c.layer_norm_eps, name="layer_norm1", **kw)
        self.self_attn = SelfAttention(c.hidden_size, c.num_attention_heads, **kw)
        self.layer_norm2 = _layer_norm(c.layer_norm_eps, name="layer_norm2", **kw)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, c.hidden_act, **kw)

    def __call__(self, x, mask=None):
        """x: [B, L, D] -> [B, L, D]."""
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return _constrain(x + self.mlp(self.layer_norm2(x)))


class Encoder(nn.Module):
    """A stack of `num_hidden_layers` encoder layers."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.layers = [EncoderLayer(self.config, self.dtype, self.param_dtype)
                       for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x, mask=None, output_hidden_states: bool = False):
        """x [B, L, D] -> the last layer's output, or with `output_hidden_states` every layer's input and output
        (transformers' `hidden_states`: the embeddings first, num_hidden_layers + 1 arrays)."""
        states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return tuple(states) if output_hidden_states else x


# --------------------------------------------------------------------------- text tower


class TextEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.token_embedding = _embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), self.dtype,
                                      self.param_dtype, "token_embedding")
        self.position_embedding = _embed(c.max_position_embeddings, c.hidden_size, (None, "embed"), self.dtype,
                                         self.param_dtype, "position_embedding")

    def __call__(self, input_ids):
        """input_ids: [B, L] int -> [B, L, D]."""
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))


def text_attention_mask(length: int, padding_mask=None):
    """Causal mask, combined with a padding mask when given (as transformers does).

    padding_mask: optional [B, L], 1/True = real token. Returns boolean [1 or B, 1, L, L], True = attend.
    """
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask.astype(bool)[:, None, None, :]
    return mask


def eos_positions(input_ids, eos_token_id: int):
    """Index of the token whose state is the pooled text feature, per row.

    Legacy configs (`eos_token_id == 2`) take argmax(input_ids), since EOS had the largest
    id in CLIP's vocabulary; others take the first position equal to `eos_token_id`
    (the pad token may equal EOS, so later matches are padding). input_ids: [B, L] -> [B].
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModel(nn.Module):
    """CLIP's causal text transformer (transformers' `CLIPTextModel`)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = TextEmbeddings(self.config, **kw)
        self.encoder = Encoder(self.config, **kw)
        self.final_layer_norm = _layer_norm(self.config.layer_norm_eps, name="final_layer_norm", **kw)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False):
        """input_ids: [B, L] int; attention_mask: optional [B, L], 1 = real token, 0 = padding.

        Returns (last_hidden_state [B, L, D], pooled [B, D]: the final state at the EOS token), and with
        `output_hidden_states` a third item: the embeddings and every layer's output, before the final
        LayerNorm (transformers' `hidden_states`; SDXL and SD3 read `[-2]`, the penultimate layer's).
        """
        x = _constrain(self.embeddings(input_ids))
        states = self.encoder(x, text_attention_mask(input_ids.shape[-1], attention_mask), output_hidden_states=True)
        x = self.final_layer_norm(states[-1])
        pooled = jnp.take_along_axis(x, eos_positions(input_ids, self.config.eos_token_id)[:, None, None], axis=1)
        return (x, pooled[:, 0], states) if output_hidden_states else (x, pooled[:, 0])


class CLIPTextModelWithProjection(nn.Module):
    """Text tower plus a bias-free projection of the pooled state (transformers' class of that name)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.text_model = CLIPTextModel(self.config, self.dtype, self.param_dtype)
        self.text_projection = _dense(self.config.projection_dim, ("embed", "embed_proj"), self.dtype,
                                      self.param_dtype, "text_projection", use_bias=False)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False):
        """Returns (last_hidden_state [B, L, D], pooled [B, D], text_embeds [B, P]), and with
        `output_hidden_states` the hidden states as a fourth item (see `CLIPTextModel`)."""
        hidden, pooled, *states = self.text_model(input_ids, attention_mask, output_hidden_states)
        return (hidden, pooled, self.text_projection(pooled), *states)


# --------------------------------------------------------------------------- vision tower


class VisionEmbeddings(nn.Module):
    """Non-overlapping patch projection (conv without bias), a learned class token prepended,
    and learned absolute position embeddings."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.class_embedding = self.param(
            "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(c.hidden_size ** -0.5), ("embed",)),
            (c.hidden_size,), self.param_dtype)
        self.patch_embedding = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size), padding="VALID",
            use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding",
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, None, "embed")))
        self.position_embedding = _embed(c.num_patches + 1, c.hidden_size, (None, "embed"), self.dtype,
                                         self.param_dtype, "position_embedding")

    def __call__(self, pixels):
        """pixels: [B, H, W, C] with H = W = image_size -> [B, 1 + num_patches, D]."""
        c = self.config
        if pixels.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"images of shape {pixels.shape[1:]} (H, W, C) do not match the model's "
                             f"{(c.image_size, c.image_size, c.num_channels)}")
        patches = self.patch_embedding(pixels.astype(self.dtype))
        patches = patches.reshape(patches.shape[0], -1, c.hidden_size)  # row-major, as torch's flatten(2)
        cls = jnp.broadcast_to(self.class_embedding.astype(patches.dtype), (patches.shape[0], 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))


class CLIPVisionModel(nn.Module):
    """CLIP's ViT image encoder (transformers' `CLIPVisionModel`)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = VisionEmbeddings(c, **kw)
        self.pre_layrnorm = _layer_norm(c.layer_norm_eps, name="pre_layrnorm", **kw)  # sic, transformers' name
        self.encoder = Encoder(c, **kw)
        self.post_layernorm = _layer_norm(c.layer_norm_eps, name="post_layernorm", **kw)

    def __call__(self, pixels, output_hidden_states: bool = False):
        """pixels: [B, H, W, C] float. Returns (last_hidden_state [B, 1 + N, D],
        pooled [B, D]: the class token's final state after `post_layernorm`), and with
        `output_hidden_states` a third item: the embeddings (after `pre_layrnorm`) and every layer's output
        (transformers' `hidden_states`; Wan's image-to-video pipeline reads `[-2]`)."""
        x = self.pre_layrnorm(_constrain(self.embeddings(pixels)))
        states = self.encoder(x, output_hidden_states=True)
        x = states[-1]
        pooled = self.post_layernorm(x[:, 0])
        return (x, pooled, states) if output_hidden_states else (x, pooled)


# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: the RGB statistics every CLIP image processor config carries
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# preprocessor_config.json switches that must be on: each step below always runs
_PROCESSOR_STEPS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessor:
    """transformers' `CLIPImageProcessor` on images [B, H, W, 3] in [0, 1] (its rescale by 1/255 done), as a
    jittable function: a bicubic resize so that the shorter side is `shortest_edge` (the longer one truncated
    to keep the aspect ratio), a center crop to `crop_size` (height, width), then (x - image_mean) / image_std.

    transformers resizes the uint8 image with PIL (or torchvision); this resizes floats with jax.image.resize
    (antialiased Keys cubic, as PIL's), so where a resize happens the pixels differ from the reference by about
    the uint8 rounding; an image whose shorter side already is `shortest_edge` matches exactly.
    """

    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, ...] = CLIP_IMAGE_MEAN
    image_std: tuple[float, ...] = CLIP_IMAGE_STD

    def __post_init__(self):
        if not all(isinstance(n, int) and 0 < n <= self.shortest_edge for n in self.crop_size):
            raise ValueError(f"CLIP image processor: crop_size {self.crop_size} must be positive and at most "
                             f"shortest_edge={self.shortest_edge} (no padding)")

    @classmethod
    def from_config(cls, d: Mapping) -> "CLIPImageProcessor":
        """From a transformers `preprocessor_config.json` dict (size {"shortest_edge"}, crop_size {"height",
        "width"}, image_mean, image_std, resample 3 = bicubic); missing fields take transformers' defaults."""
        off = [name for name in _PROCESSOR_STEPS if not d.get(name, True)]
        size, crop = d.get("size", {"shortest_edge": 224}), d.get("crop_size", {"height": 224, "width": 224})
        if off or d.get("resample", 3) != 3 or set(size) != {"shortest_edge"} or set(crop) != {"height", "width"}:
            raise CheckpointError(f"CLIP image processor config {dict(d)!r} is not supported; supported: size "
                                  f"{{'shortest_edge': n}}, crop_size {{'height', 'width'}}, resample 3 (bicubic), "
                                  f"{', '.join(_PROCESSOR_STEPS)} on")
        return cls(int(size["shortest_edge"]), (int(crop["height"]), int(crop["width"])),
                   tuple(d.get("image_mean", CLIP_IMAGE_MEAN)), tuple(d.get("image_std", CLIP_IMAGE_STD)))

    def __call__(self, images):
        """images [B, H, W, 3] in [0, 1] -> CLIP pixel inputs [B, crop height, crop width, 3] float32."""
        b, h, w, c = images.shape
        short, long = sorted((h, w))
        size = (self.shortest_edge, int(self.shortest_edge * long / short))
        size = size if h <= w else size[::-1]
        x = images.astype(jnp.float32)
        if size != (h, w):
            x = jax.image.resize(x, (b, *size, c), method="cubic", antialias=True)
        top, left = (size[0] - self.crop_size[0]) // 2, (size[1] - self.crop_size[1]) // 2
        x = x[:, top:top + self.crop_size[0], left:left + self.crop_size[1]]
        return (x - jnp.asarray(self.image_mean, jnp.float32)) / jnp.asarray(self.image_std, jnp.float32)


# --------------------------------------------------------------------------- both towers


class CLIPOutput(NamedTuple):
    """Similarity logits and the L2-normalised embeddings they come from."""

    logits_per_image: jax.Array  # [B_image, B_text]
    logits_per_text: jax.Array  # [B_text, B_image]
    text_embeds: jax.Array  # [B_text, P], unit norm
    image_embeds: jax.Array  # [B_image, P], unit norm


def l2_normalize(x, axis: int = -1):
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))


class CLIPModel(nn.Module):
    """Text and image towers with projections into a shared space and a learned temperature."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextModel(c.text, **kw)
        self.vision_model = CLIPVisionModel(c.vision, **kw)
        self.text_projection = _dense(c.projection_dim, ("embed", "embed_proj"), name="text_projection",
                                      use_bias=False, **kw)
        self.visual_projection = _dense(c.projection_dim, ("embed", "embed_proj"), name="visual_projection",
                                        use_bias=False, **kw)
        # log of the softmax inverse temperature; CLIP initialises it to log(1 / 0.07).
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), (),
                                      self.param_dtype)

    def encode_text(self, input_ids, attention_mask=None):
        """Projected, unnormalised text features [B, P] (transformers' `get_text_features(...).pooler_output`)."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def encode_image(self, pixels):
        """Projected, unnormalised image features [B, P] (transformers' `get_image_features(...).pooler_output`)."""
        return self.visual_projection(self.vision_model(pixels)[1])

    def __call__(self, input_ids, pixels, attention_mask=None) -> CLIPOutput:
        """input_ids: [B_text, L]; pixels: [B_image, H, W, C]. Cosine similarities times exp(logit_scale)."""
        text = l2_normalize(self.encode_text(input_ids, attention_mask).astype(jnp.float32))
        image = l2_normalize(self.encode_image(pixels).astype(jnp.float32))
        logits_per_text = text @ image.T * jnp.exp(self.logit_scale.astype(jnp.float32))
        return CLIPOutput(logits_per_text.T, logits_per_text, text, image)


# --------------------------------------------------------------------------- pure functions


def clip_loss(logits_per_text, negative_logits_per_image=None):
    """CLIP's symmetric InfoNCE loss: the mean of the text->image and image->text
    cross-entropies with matching pairs on the diagonal (Radford et al. 2021, Fig. 3).

    logits_per_text: [N, N], row i = text i against every image.
    negative_logits_per_image: optional [N, M], image i against M extra captions that match no
    image (hard negatives, NegCLIP: Yuksekgonul et al. 2023); -inf entries are left out. They join
    the image->text softmax only. Returns a float32 scalar.
    """
    logits = logits_per_text.astype(jnp.float32)
    labels = jnp.arange(logits.shape[0])

    def cross_entropy(l):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(l, axis=-1), labels[:, None], axis=-1))

    per_image = logits.T
    if negative_logits_per_image is not None:
        per_image = jnp.concatenate([per_image, negative_logits_per_image.astype(jnp.float32)], axis=-1)
    return (cross_entropy(logits) + cross_entropy(per_image)) / 2


def zero_shot_classify(model: CLIPModel, params, pixels, class_token_ids, attention_mask=None):
    """Zero-shot classification: each image goes to the class whose prompt embedding is nearest.

    Args:
      model: a `CLIPModel`; params: its params tree (without the {'params': ...} wrapper).
      pixels: [B, H, W, C]; class_token_ids: [K, L], one tokenised prompt per class;
      attention_mask: optional [K, L] padding mask for the prompts.
    Returns: (probs [B, K], softmax of the scaled cosine similarities; predicted class [B]).
    """
    out = model.apply({"params": params}, class_token_ids, pixels, attention_mask)
    probs = jax.nn.softmax(out.logits_per_image, axis=-1)
    return probs, jnp.argmax(probs, axis=-1)
