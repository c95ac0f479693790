"""The text-conditional U-Net of latent diffusion (Rombach et al. 2022), as diffusers'
UNet2DConditionModel builds it: enough of it to express Stable Diffusion 1.x / 2.x, SDXL
(Podell et al. 2023: micro-conditioning on pooled text and size/crop "time ids"),
inpainting (extra input channels) and class-conditional U-Nets.

Call convention: `unet.apply({'params': p}, x, t, context, class_labels=None, text_embeds=None,
time_ids=None)` with x [B, H, W, in_channels] (NHWC), t [B] (or a scalar) timesteps on the
training scale, context [B, L, cross_attention_dim]; returns [B, H, W, out_channels].
An SDXL U-Net (`addition_embed_type="text_time"`) also needs text_embeds [B, D] (the pooled
text embedding) and time_ids [B, N] (SDXL: original size, crop top-left, target size; N = 6).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.checks import CheckpointError, check_supported
from jaxdiff.models.layers import (TimestepEmbedding, TransformerSpec, conv, constrain_image, group_norm,
                                   timestep_embedding)
from jaxdiff.models.resolution_blocks import DownBlock, MidBlock, UpBlock

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
TIME_EMBEDDING_NORMS = ("default", "scale_shift")
ADDITION_EMBED_TYPES = (None, "text_time")

# diffusers config fields that name features we do not implement -> the values we accept
# (their defaults, i.e. the feature switched off). Anything else is an error naming the field.
_UNSUPPORTED_DIFFUSERS_FIELDS = {
    "act_fn": {"silu", "swish"},
    "attention_type": {"default"},
    "class_embed_type": {None},
    "class_embeddings_concat": {False},
    "cross_attention_norm": {None},
    "dropout": {0.0},
    "dual_cross_attention": {False},
    "encoder_hid_dim": {None},
    "encoder_hid_dim_type": {None},
    "mid_block_only_cross_attention": {None, False},
    "resnet_out_scale_factor": {1.0},
    "resnet_skip_time_act": {False},
    "reverse_transformer_layers_per_block": {None},
    "time_cond_proj_dim": {None},
    "time_embedding_act_fn": {None},
    "time_embedding_type": {"positional"},
    "timestep_post_act": {None},
}
# Fields that only matter to the unsupported features above.
_IGNORED_DIFFUSERS_FIELDS = {"addition_embed_type_num_heads"}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """U-Net hyper-parameters, named as in diffusers' UNet2DConditionModel config.

    Per-block fields accept an int (same for every block) and are stored as tuples.
    `num_attention_heads` is the number of heads per block: diffusers' SD configs store it
    under the (misnamed) `attention_head_dim`; `from_diffusers_config` maps it.
    """
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: Any = 2
    num_attention_heads: Any = 8
    transformer_layers_per_block: Any = 1
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    # Kept for export only: our attention logits and softmax are always float32.
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    # GroupNorm before each spatial transformer and LayerNorms inside it (fixed in diffusers).
    attention_norm_eps: float = 1e-6
    transformer_norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embedding_dim: int | None = None
    resnet_time_scale_shift: str = "default"
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    num_class_embeds: int | None = None
    # SDXL's micro-conditioning ("text_time"): the sinusoidal embedding (width addition_time_embed_dim) of each
    # time id, concatenated after the pooled text embedding (projection_class_embeddings_input_dim in all), goes
    # through its own TimestepEmbedding MLP and is added to the time embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    center_input_sample: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        for field in ("layers_per_block", "num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, field)
            value = (value,) * n if isinstance(value, (int, np.integer)) else tuple(value)
            if len(value) != n or not all(isinstance(v, (int, np.integer)) for v in value):
                raise ValueError(f"UNetConfig.{field}={getattr(self, field)!r}: need an int or {n} ints "
                                 f"(one per block of block_out_channels)")
            object.__setattr__(self, field, tuple(int(v) for v in value))
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
        for field, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                      ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            if len(types) != n:
                raise ValueError(f"UNetConfig.{field} has {len(types)} entries but block_out_channels has {n}")
            for t in types:
                if t not in allowed:
                    raise ValueError(f"UNetConfig.{field}: unsupported block type {t!r}; supported: {', '.join(allowed)}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"UNetConfig.mid_block_type={self.mid_block_type!r} is not supported; "
                             f"supported: {MID_BLOCK_TYPES}")
        if self.resnet_time_scale_shift not in TIME_EMBEDDING_NORMS:
            raise ValueError(f"UNetConfig.resnet_time_scale_shift={self.resnet_time_scale_shift!r} is not supported; "
                             f"supported: {TIME_EMBEDDING_NORMS}")
        if not isinstance(self.cross_attention_dim, (int, np.integer)):
            raise ValueError(f"UNetConfig.cross_attention_dim={self.cross_attention_dim!r}: only one int "
                             f"(the same context width for every block) is supported")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"UNetConfig.addition_embed_type={self.addition_embed_type!r} is not supported; "
                             f"supported: {ADDITION_EMBED_TYPES}")
        if self.addition_embed_type == "text_time":
            d, total = self.addition_time_embed_dim, self.projection_class_embeddings_input_dim
            if not (isinstance(d, (int, np.integer)) and isinstance(total, (int, np.integer)) and 0 < d < total):
                raise ValueError(f"UNetConfig: addition_embed_type='text_time' needs ints 0 < addition_time_embed_dim "
                                 f"< projection_class_embeddings_input_dim; got {d!r}, {total!r}")
        for ch, heads in zip(self.block_out_channels, self.num_attention_heads):
            if ch % self.norm_num_groups:
                raise ValueError(f"UNetConfig: block channels {ch} not divisible by norm_num_groups={self.norm_num_groups}")
            if ch % heads:
                raise ValueError(f"UNetConfig: block channels {ch} not divisible by num_attention_heads={heads}")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "UNetConfig":
        """Builds a config from a diffusers UNet2DConditionModel `config.json` dict.

        Raises CheckpointError naming the field for features we do not implement and for
        fields we do not know.
        """

        config = dict(config)
        check_supported(config, _UNSUPPORTED_DIFFUSERS_FIELDS, "UNet2DConditionModel")
        only_cross = config.pop("only_cross_attention", False)
        if any(np.atleast_1d(only_cross)):
            raise CheckpointError(f"UNet2DConditionModel config field only_cross_attention={only_cross!r} is not "
                                  f"supported; supported: False")
        # diffusers' naming bug (issue 2011): `attention_head_dim` holds the number of heads.
        heads = config.pop("num_attention_heads", None) or config.pop("attention_head_dim", 8)
        config.pop("attention_head_dim", None)
        known = {f.name for f in dataclasses.fields(cls)} - {"num_attention_heads", "attention_norm_eps",
                                                            "transformer_norm_eps"}
        kwargs = {}
        for field, value in config.items():
            if field.startswith("_") or field in _UNSUPPORTED_DIFFUSERS_FIELDS or field in _IGNORED_DIFFUSERS_FIELDS:
                continue
            if field not in known:
                raise CheckpointError(f"UNet2DConditionModel config field {field}={value!r} is unknown to jaxdiff")
            kwargs[field] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(num_attention_heads=heads, **kwargs)
        except ValueError as e:
            raise CheckpointError(str(e)) from e

    def to_diffusers_config(self) -> dict:
        """The diffusers `config.json` dict for this U-Net (UNet2DConditionModel)."""
        if (self.attention_norm_eps, self.transformer_norm_eps) != (1e-6, 1e-5):
            raise ValueError("diffusers fixes attention_norm_eps=1e-6 and transformer_norm_eps=1e-5; this config has "
                             f"{self.attention_norm_eps}, {self.transformer_norm_eps}")
        out = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            if f.name in ("num_attention_heads", "attention_norm_eps", "transformer_norm_eps"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        heads = self.num_attention_heads
        out["attention_head_dim"] = heads[0] if len(set(heads)) == 1 else list(heads)
        out["act_fn"] = "silu"
        return out


class UNet2DCondition(nn.Module):
    """Text-conditional U-Net (diffusers' UNet2DConditionModel). See the module docstring for the call."""
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def example_inputs(self) -> tuple[tuple, dict]:
        """The smallest (args, kwargs) this U-Net accepts, for tracing its init (`layers.param_shapes`)."""
        c = self.config
        size = 2 ** (len(c.block_out_channels) - 1)
        args = (jnp.zeros((1, size, size, c.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, c.cross_attention_dim)))
        kwargs = {"class_labels": jnp.zeros((1,), jnp.int32)} if c.num_class_embeds is not None else {}
        if c.addition_embed_type == "text_time":
            # any split of projection_class_embeddings_input_dim gives the same params; one time id is the smallest
            kwargs.update(text_embeds=jnp.zeros((1, c.projection_class_embeddings_input_dim - c.addition_time_embed_dim)),
                          time_ids=jnp.zeros((1, 1)))
        return args, kwargs

    def _transformer(self, i: int) -> TransformerSpec:
        c = self.config
        return TransformerSpec(heads=c.num_attention_heads[i], num_layers=c.transformer_layers_per_block[i],
                               use_linear_projection=c.use_linear_projection,
                               group_norm_eps=c.attention_norm_eps, layer_norm_eps=c.transformer_norm_eps)

    def _text_time_input(self, text_embeds, time_ids):
        """SDXL's added conditioning, before its MLP: [text_embeds | sinusoid of each time id]. -> [B, D + N * d]."""
        c = self.config
        if text_embeds is None or time_ids is None:
            raise ValueError("this U-Net has addition_embed_type='text_time' (SDXL): pass text_embeds=[B, D] and "
                             "time_ids=[B, N] (pooled text embedding and size/crop ids)")
        d, total = c.addition_time_embed_dim, c.projection_class_embeddings_input_dim
        if text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[-1] + time_ids.shape[-1] * d != total:
            raise ValueError(f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} must be [B, D] and [B, N] "
                             f"with D + N * addition_time_embed_dim({d}) = projection_class_embeddings_input_dim({total})")
        n_ids = time_ids.shape[-1]
        time_embeds = timestep_embedding(jnp.reshape(time_ids, (-1,)), d, c.flip_sin_to_cos, c.freq_shift)
        time_embeds = jnp.reshape(time_embeds, (time_ids.shape[0], n_ids * d))
        return jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), time_embeds], axis=-1).astype(self.dtype)

    @nn.compact
    def __call__(self, x, t, context=None, class_labels=None, text_embeds=None, time_ids=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(groups=c.norm_num_groups, eps=c.norm_eps, time_embedding_norm=c.resnet_time_scale_shift, **kw)
        n = len(c.block_out_channels)
        factor = 2 ** (n - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"U-Net input height and width {x.shape[1:3]} must be multiples of {factor}")

        cross = "CrossAttnDownBlock2D" in c.down_block_types or c.mid_block_type == "UNetMidBlock2DCrossAttn"
        if cross and context is None:
            raise ValueError("this U-Net has cross-attention blocks: pass context=[B, L, cross_attention_dim]")

        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).astype(self.dtype)
        temb = TimestepEmbedding(c.time_embed_dim, name="time_embedding", **kw)(temb)
        if c.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError(f"this U-Net has num_class_embeds={c.num_class_embeds}: pass class_labels=[B] ints")
            temb = temb + nn.Embed(c.num_class_embeds, c.time_embed_dim, name="class_embedding",
                                   embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                               ("vocab", "embed")), **kw)(class_labels)
        if c.addition_embed_type == "text_time":
            added = self._text_time_input(text_embeds, time_ids)
            temb = temb + TimestepEmbedding(c.time_embed_dim, name="add_embedding", **kw)(added)

        x = x.astype(self.dtype)
        if c.center_input_sample:
            x = 2 * x - 1
        if context is not None:
            context = context.astype(self.dtype)
        h = constrain_image(conv(c.block_out_channels[0], c.conv_in_kernel, name="conv_in", **kw)(x))

        skips = [h]
        for i, block_type in enumerate(c.down_block_types):
            h, block_skips = DownBlock(
                c.block_out_channels[i], c.layers_per_block[i],
                transformer=self._transformer(i) if block_type == "CrossAttnDownBlock2D" else None,
                add_downsample=i < n - 1, downsample_padding=c.downsample_padding,
                name=f"down_blocks_{i}", **block_kw)(h, temb, context)
            skips.extend(block_skips)

        if c.mid_block_type is not None:
            # diffusers builds "UNetMidBlock2D" here with no attention and num_layers=0: one resnet.
            mid_cross = c.mid_block_type == "UNetMidBlock2DCrossAttn"
            h = MidBlock(c.block_out_channels[-1], output_scale_factor=c.mid_block_scale_factor,
                         transformer=self._transformer(n - 1) if mid_cross else None, num_layers=int(mid_cross),
                         name="mid_block", **block_kw)(h, temb, context)

        for i, block_type in enumerate(c.up_block_types):
            level = n - 1 - i
            num_layers = c.layers_per_block[level] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            h = UpBlock(c.block_out_channels[level], num_layers,
                        transformer=self._transformer(level) if block_type == "CrossAttnUpBlock2D" else None,
                        add_upsample=i < n - 1, name=f"up_blocks_{i}", **block_kw)(h, block_skips, temb, context)

        h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(h))
        return conv(c.out_channels, c.conv_out_kernel, name="conv_out", **kw)(h)

