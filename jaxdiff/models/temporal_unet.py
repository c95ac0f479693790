"""The text-conditional video U-Net of ModelScope text-to-video (Wang et al. 2023, "ModelScope
Text-to-Video Technical Report"), as diffusers' UNet3DConditionModel builds it: the 2-D U-Net's
blocks (`jaxdiff.models.layers`) on frames flattened into the batch, interleaved with temporal
layers that mix the frames at every spatial position.

Call convention: `unet.apply({'params': p}, x, t, context, cond_frames=None)` with
x [B, T, H, W, C] (NTHWC), t [B] (or a scalar) timesteps on the training scale,
context [B, L, cross_attention_dim]; returns [B, T, H, W, out_channels].

Layer order (diffusers' UNet3DConditionModel, channels-last):

    conv_in -> transformer_in (temporal self-attention)
    down i:  [resnet -> temp_conv (-> spatial transformer -> temp_attention)] x layers, downsample
    mid:     resnet -> temp_conv -> spatial transformer -> temp_attention -> resnet -> temp_conv
    up i:    [concat skip -> resnet -> temp_conv (-> spatial transformer -> temp_attention)] x (layers+1), upsample
    GroupNorm -> SiLU -> conv_out

- TemporalConv (diffusers' TemporalConvLayer): four (GroupNorm -> SiLU -> 3x1x1 conv over
  frames) with a residual; GroupNorm statistics are taken over (T, H, W) per video.
- TemporalTransformer (diffusers' TransformerTemporalModel): GroupNorm over (T, H, W) ->
  linear -> transformer blocks whose two attention layers are both self-attention across
  the T frames of one pixel (sequence [B*H*W, T, C]) -> linear, with a residual.

Both end in a zero-initialised layer (TemporalConv's last conv, as diffusers; the transformer's
`proj_out`, where diffusers does not zero it), so a freshly initialised temporal layer is the
identity and `inflate` turns a trained image U-Net into a video U-Net that, before any
fine-tuning, equals the image U-Net applied to every frame.

jaxdiff extensions (off by default, so a diffusers checkpoint computes exactly what diffusers does):

- `frame_position_embedding="sinusoidal"`: diffusers' UNet3D has no frame position embedding
  (its temporal attention only sees the order through the temporal convolutions); with this
  option a fixed sinusoidal embedding of the frame index (Vaswani et al. 2017, interleaved
  sin/cos as diffusers' SinusoidalPositionalEmbedding) is added to the tokens after every
  temporal transformer's `proj_in`. diffusers cannot run such a model; `to_diffusers(...,
  jaxdiff_fields=True)` still writes it in diffusers' layout, for jaxdiff to load.
- `conditioning_frame_channels = K > 0` (image-to-video): the last K of `in_channels` are a
  conditioning input built by `frame_conditioning`: the conditioning frame's latent
  (K - 1 channels) repeated over all T frames, and one indicator channel that is 1 on frame 0
  when a conditioning frame is given and 0 everywhere otherwise (no image: all K channels 0,
  which is what classifier-free image dropout trains). diffusers loads the export as a plain
  UNet3DConditionModel with in_channels input channels (it ignores the extra config field).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.models.checks import CheckpointError, check_supported
from jaxdiff.models.layers import (TimestepEmbedding, TransformerBlock, TransformerSpec, conv, constrain_image, dense,
                                   group_norm, param_shapes, timestep_embedding)
from jaxdiff.models.resolution_blocks import DownBlock, MidBlock, UpBlock

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock3D", "DownBlock3D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock3D", "UpBlock3D")
FRAME_POSITION_EMBEDDINGS = (None, "sinusoidal")
# Logical names of a temporal convolution's kernel [3, 1, 1, C_in, C_out].
TEMPORAL_CONV_AXES = ("conv_time", "conv_height", "conv_width", "conv_in", "conv_out")

_UNSUPPORTED_DIFFUSERS_FIELDS = {
    "act_fn": {"silu", "swish"},
    "time_cond_proj_dim": {None},
}
# Fields of the config dataclass that diffusers' UNet3DConditionModel does not have.
_JAXDIFF_FIELDS = ("num_attention_heads", "transformer_in_heads", "temporal_conv_norm_eps", "attention_norm_eps",
                   "transformer_norm_eps", "frame_position_embedding", "conditioning_frame_channels")


@dataclasses.dataclass(frozen=True)
class TemporalUNetConfig:
    """Video U-Net hyper-parameters, named as in diffusers' UNet3DConditionModel config.

    Unlike UNet2DConditionModel, diffusers' UNet3D reads `attention_head_dim` as the width of a
    head: a block of C channels has C // attention_head_dim heads, and `transformer_in` has
    `transformer_in_heads` (8) heads of width `attention_head_dim`. `num_attention_heads`
    (per block) overrides the heads of the blocks, e.g. for an image U-Net inflated with
    `inflate` whose blocks have different head widths; it is stored resolved.
    """
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: tuple[str, ...] = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int = 64
    num_attention_heads: Any = None
    transformer_in_heads: int = 8
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    # Fixed in diffusers: TemporalConvLayer's GroupNorms (PyTorch's default eps), the GroupNorm
    # before every (spatial or temporal) transformer, and the LayerNorms inside them.
    temporal_conv_norm_eps: float = 1e-5
    attention_norm_eps: float = 1e-6
    transformer_norm_eps: float = 1e-5
    frame_position_embedding: str | None = None
    conditioning_frame_channels: int = 0
    sample_size: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        for field in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        for field in ("layers_per_block", "attention_head_dim", "transformer_in_heads", "norm_num_groups",
                      "cross_attention_dim", "in_channels", "out_channels"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TemporalUNetConfig.{field}={value!r}: need one positive int")
        for field, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                      ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            if len(types) != n:
                raise ValueError(f"TemporalUNetConfig.{field} has {len(types)} entries but block_out_channels has {n}")
            for t in types:
                if t not in allowed:
                    raise ValueError(f"TemporalUNetConfig.{field}: unsupported block type {t!r}; "
                                     f"supported: {', '.join(allowed)}")
        heads = self.num_attention_heads
        if heads is None:
            bad = [ch for ch in self.block_out_channels if ch % self.attention_head_dim]
            if bad:
                raise ValueError(f"TemporalUNetConfig: block channels {bad} not divisible by "
                                 f"attention_head_dim={self.attention_head_dim} (the width of a head)")
            heads = tuple(ch // self.attention_head_dim for ch in self.block_out_channels)
        heads = (heads,) * n if isinstance(heads, (int, np.integer)) else tuple(heads)
        if len(heads) != n or not all(isinstance(h, (int, np.integer)) and h > 0 for h in heads):
            raise ValueError(f"TemporalUNetConfig.num_attention_heads={self.num_attention_heads!r}: need None, "
                             f"an int or {n} positive ints")
        object.__setattr__(self, "num_attention_heads", tuple(int(h) for h in heads))
        for ch, h in zip(self.block_out_channels, self.num_attention_heads):
            if ch % self.norm_num_groups:
                raise ValueError(f"TemporalUNetConfig: block channels {ch} not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
            if ch % h:
                raise ValueError(f"TemporalUNetConfig: block channels {ch} not divisible by {h} heads")
        if self.frame_position_embedding not in FRAME_POSITION_EMBEDDINGS:
            raise ValueError(f"TemporalUNetConfig.frame_position_embedding={self.frame_position_embedding!r}; "
                             f"choose one of: {FRAME_POSITION_EMBEDDINGS}")
        k = self.conditioning_frame_channels
        if k and not (2 <= k < self.in_channels):
            raise ValueError(f"TemporalUNetConfig.conditioning_frame_channels={k}: need 0 (no image conditioning) "
                             f"or 2 .. in_channels-1={self.in_channels - 1} (latent channels + 1 indicator)")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy video x (in_channels minus the conditioning input)."""
        return self.in_channels - self.conditioning_frame_channels

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "TemporalUNetConfig":
        """Builds a config from a diffusers UNet3DConditionModel `config.json` dict.

        Raises CheckpointError naming the field for features we do not implement and for
        fields we do not know.
        """

        config = dict(config)
        check_supported(config, _UNSUPPORTED_DIFFUSERS_FIELDS, "UNet3DConditionModel")
        if config.get("norm_num_groups", 32) is None:
            raise CheckpointError("UNet3DConditionModel config field norm_num_groups=None (no output norm) is not "
                                  "supported; supported: an int")
        if isinstance(config.get("attention_head_dim"), list):
            raise CheckpointError(f"UNet3DConditionModel config field attention_head_dim="
                                  f"{config['attention_head_dim']!r}: diffusers builds transformer_in with it, so "
                                  f"only one int is supported")
        # jaxdiff's own fields are read too: to_diffusers_config(jaxdiff_fields=True) writes them.
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for field, value in config.items():
            if field.startswith("_") or field in _UNSUPPORTED_DIFFUSERS_FIELDS:
                continue
            if field not in known:
                raise CheckpointError(f"UNet3DConditionModel config field {field}={value!r} is unknown to jaxdiff")
            kwargs[field] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise CheckpointError(str(e)) from e

    def _diffusers_gaps(self) -> dict[tuple[str, ...], str]:
        """The settings diffusers' UNet3DConditionModel cannot express: {fields: why}."""
        widths = {ch // h for ch, h in zip(self.block_out_channels, self.num_attention_heads)}
        gaps = {}
        if widths != {self.attention_head_dim}:
            gaps[("num_attention_heads",)] = (f"head widths {sorted(widths)} per block (diffusers: every block's head "
                                              f"width is attention_head_dim={self.attention_head_dim})")
        if self.transformer_in_heads != 8:
            gaps[("transformer_in_heads",)] = f"transformer_in_heads={self.transformer_in_heads} (diffusers: 8)"
        eps = ("temporal_conv_norm_eps", "attention_norm_eps", "transformer_norm_eps")
        if tuple(getattr(self, f) for f in eps) != (1e-5, 1e-6, 1e-5):
            gaps[eps] = f"{', '.join(eps)} other than 1e-5, 1e-6, 1e-5"
        if self.frame_position_embedding is not None:
            gaps[("frame_position_embedding",)] = (f"frame_position_embedding={self.frame_position_embedding!r} "
                                                   f"(diffusers: none)")
        return gaps

    def to_diffusers_config(self, jaxdiff_fields: bool = False) -> dict:
        """The diffusers `config.json` dict (UNet3DConditionModel). Raises ValueError for settings
        diffusers cannot express (per-block head widths, frame position embeddings, other norm eps),
        unless `jaxdiff_fields`: then those settings are written as extra fields under their
        TemporalUNetConfig names, which `from_diffusers_config` reads back. diffusers cannot run such
        a model (it refuses a `num_attention_heads` and ignores the other extra fields, with a warning);
        jaxdiff loads it exactly."""
        gaps = self._diffusers_gaps()
        if gaps and not jaxdiff_fields:
            raise ValueError("UNet3DConditionModel cannot express this TemporalUNetConfig: " + "; ".join(gaps.values()))
        extra = {f for fields in gaps for f in fields}
        if self.conditioning_frame_channels:
            # Not a diffusers field (diffusers warns and ignores it, and loads a plain U-Net with
            # in_channels inputs); read back by from_diffusers_config.
            extra.add("conditioning_frame_channels")
        out = {"_class_name": "UNet3DConditionModel", "act_fn": "silu"}
        for f in dataclasses.fields(self):
            if f.name in _JAXDIFF_FIELDS and f.name not in extra:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


# ----------------------------------------------------------------------------- conditioning input

def frame_conditioning(cond_latent, num_frames: int, channels: int, present=None, batch: int | None = None,
                       height: int | None = None, width: int | None = None, dtype=jnp.float32):
    """The image-to-video conditioning input: [B, T, h, w, channels].

    Channels 0 .. channels-2 hold the conditioning frame's latent repeated over all frames; the last
    channel is 1 on frame 0 for videos whose first frame is given, 0 elsewhere.

    Args:
      cond_latent: [B, h, w, channels - 1] latent of the conditioning (first) frame, or None (no image:
        all zeros, the unconditional input; then pass batch, height, width).
      present: optional [B] (bool or 0/1): per video, whether its conditioning frame is used (0 zeroes
        both the latent and the indicator, e.g. for image dropout in training). Default: all 1.
    """
    if cond_latent is None:
        return jnp.zeros((batch, num_frames, height, width, channels), dtype)
    b, h, w, c = cond_latent.shape
    if c != channels - 1:
        raise ValueError(f"cond_frames has {c} channels; this model's conditioning input needs {channels - 1} "
                         f"(conditioning_frame_channels={channels} = latent channels + 1 indicator)")
    present = jnp.ones((b,), dtype) if present is None else jnp.asarray(present).astype(dtype)
    latent = jnp.broadcast_to(cond_latent.astype(dtype)[:, None], (b, num_frames, h, w, c))
    first = (jnp.arange(num_frames) == 0).astype(dtype)
    indicator = jnp.broadcast_to(first[None, :, None, None, None], (b, num_frames, h, w, 1))
    return jnp.concatenate([latent, indicator], axis=-1) * present[:, None, None, None, None]


# ----------------------------------------------------------------------------- temporal layers

def _unflatten_frames(x, num_frames: int):
    """[B*T, H, W, C] -> [B, T, H, W, C] (frames of one video are consecutive, as in diffusers)."""
    if num_frames is None or x.shape[0] % num_frames:
        raise ValueError(f"temporal layer needs num_frames dividing the batch {x.shape[0]}, got {num_frames}")
    return x.reshape(x.shape[0] // num_frames, num_frames, *x.shape[1:])


def frame_position_embedding(num_frames: int, dim: int):
    """Sinusoidal embedding of frame indices, sin on even and cos on odd channels: [T, dim] float32."""
    pos = np.arange(num_frames, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-np.log(10000.0) / dim))
    pe = np.zeros((num_frames, dim), np.float64)
    pe[:, 0::2] = np.sin(pos * div)
    pe[:, 1::2] = np.cos(pos * div)[:, : dim // 2]
    return jnp.asarray(pe, jnp.float32)


class TemporalConv(nn.Module):
    """Four (GroupNorm -> SiLU -> 3x1x1 convolution over frames) with a residual (diffusers' TemporalConvLayer).

    The last convolution is zero-initialised: a new layer is the identity. Submodule names spell
    diffusers' nn.Sequential indices (`conv1.0` norm, `conv1.2` conv; `conv2..4`: `.0` and `.3`).
    x: [B*T, H, W, C] -> [B*T, H, W, C].
    """
    groups: int
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, num_frames: int):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        video = _unflatten_frames(x, num_frames)
        c = x.shape[-1]
        h = video
        for k in range(1, 5):
            conv_index = 2 if k == 1 else 3   # conv2..4 have a Dropout at index 2
            last = k == 4
            h = nn.silu(group_norm(self.groups, self.eps, name=f"conv{k}_0", **kw)(h))
            h = nn.Conv(c, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)), name=f"conv{k}_{conv_index}",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.zeros_init() if last else nn.initializers.lecun_normal(),
                            TEMPORAL_CONV_AXES),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                        **kw)(h)
        return constrain_image((video + h).reshape(x.shape))


class TemporalTransformer(nn.Module):
    """Self-attention across frames at every pixel, with a residual (diffusers' TransformerTemporalModel).

    GroupNorm over (T, H, W) -> linear to heads*head_dim -> [+ frame position embedding] ->
    transformer blocks (both attention layers self-attention, as diffusers' double_self_attention)
    over sequences [B*H*W, T, heads*head_dim] -> zero-initialised linear back to C.
    x: [B*T, H, W, C] -> [B*T, H, W, C].
    """
    heads: int
    head_dim: int
    groups: int
    num_layers: int = 1
    norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    frame_position_embedding: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, num_frames: int):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        video = _unflatten_frames(x, num_frames)
        b, t, hh, ww, c = video.shape
        inner = self.heads * self.head_dim
        h = group_norm(self.groups, self.norm_eps, name="norm", **kw)(video)
        h = h.transpose(0, 2, 3, 1, 4).reshape(b * hh * ww, t, c)
        h = dense(inner, ("channels", "embed"), name="proj_in", **kw)(h)
        if self.frame_position_embedding == "sinusoidal":
            h = h + frame_position_embedding(t, inner)[None].astype(h.dtype)
        for i in range(self.num_layers):
            h = TransformerBlock(inner, self.heads, self.head_dim, cross_attention=True, norm_eps=self.layer_norm_eps,
                                 name=f"transformer_blocks_{i}", **kw)(h)
        h = dense(c, ("embed", "channels"), kernel_init=nn.initializers.zeros_init(), name="proj_out", **kw)(h)
        h = h.reshape(b, hh, ww, t, c).transpose(0, 3, 1, 2, 4)
        return constrain_image((video + h).reshape(x.shape))


@dataclasses.dataclass(frozen=True)
class TemporalSpec:
    """The temporal layers of one resolution block (`temporal=` of layers.DownBlock/UpBlock/MidBlock)."""
    groups: int
    heads: int
    head_dim: int
    conv_norm_eps: float = 1e-5
    attention_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    frame_position_embedding: str | None = None

    def conv(self, **kw) -> TemporalConv:
        return TemporalConv(self.groups, self.conv_norm_eps, **kw)

    def attention(self, **kw) -> TemporalTransformer:
        return TemporalTransformer(self.heads, self.head_dim, self.groups, norm_eps=self.attention_norm_eps,
                                   layer_norm_eps=self.layer_norm_eps,
                                   frame_position_embedding=self.frame_position_embedding, **kw)


# ----------------------------------------------------------------------------- the model

class TemporalUNet(nn.Module):
    """Text-conditional video U-Net (diffusers' UNet3DConditionModel). See the module docstring for the call."""
    config: TemporalUNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def example_inputs(self) -> tuple[tuple, dict]:
        """The smallest (args, kwargs) this U-Net accepts, for tracing its init (`layers.param_shapes`)."""
        c = self.config
        size = 2 ** (len(c.block_out_channels) - 1)
        return (jnp.zeros((1, 2, size, size, c.latent_channels)), jnp.zeros((1,)),
                jnp.zeros((1, 1, c.cross_attention_dim))), {}

    def _transformer(self, i: int) -> TransformerSpec:
        # diffusers' UNet3D blocks always use linear projections and one transformer layer.
        c = self.config
        return TransformerSpec(heads=c.num_attention_heads[i], num_layers=1, use_linear_projection=True,
                               group_norm_eps=c.attention_norm_eps, layer_norm_eps=c.transformer_norm_eps)

    def _temporal(self, i: int) -> TemporalSpec:
        c = self.config
        heads = c.num_attention_heads[i]
        return TemporalSpec(c.norm_num_groups, heads, c.block_out_channels[i] // heads, c.temporal_conv_norm_eps,
                            c.attention_norm_eps, c.transformer_norm_eps, c.frame_position_embedding)

    @nn.compact
    def __call__(self, x, t, context, cond_frames=None, cond_present=None):
        """x: [B, T, H, W, latent_channels]; cond_frames: [B, H, W, conditioning_frame_channels - 1] or None;
        cond_present: optional [B] (see `frame_conditioning`). Returns [B, T, H, W, out_channels]."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(groups=c.norm_num_groups, eps=c.norm_eps, **kw)
        if x.ndim != 5:
            raise ValueError(f"TemporalUNet input must be [B, T, H, W, C] (NTHWC), got shape {x.shape}")
        b, frames, height, width, channels = x.shape
        n = len(c.block_out_channels)
        factor = 2 ** (n - 1)
        if height % factor or width % factor:
            raise ValueError(f"TemporalUNet input height and width {(height, width)} must be multiples of {factor}")
        if channels != c.latent_channels:
            raise ValueError(f"TemporalUNet input has {channels} channels; this model takes {c.latent_channels} "
                             f"(in_channels={c.in_channels} - conditioning_frame_channels="
                             f"{c.conditioning_frame_channels})")
        if context is None:
            raise ValueError("TemporalUNet has cross-attention blocks: pass context=[B, L, cross_attention_dim]")
        if c.conditioning_frame_channels:
            cond = frame_conditioning(cond_frames, frames, c.conditioning_frame_channels, cond_present, b, height,
                                      width, x.dtype)
            x = jnp.concatenate([x, cond], axis=-1)
        elif cond_frames is not None:
            raise ValueError("this TemporalUNet has conditioning_frame_channels=0: it takes no cond_frames")

        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        temb = timestep_embedding(t, c.block_out_channels[0], True, 0.0).astype(self.dtype)
        temb = TimestepEmbedding(c.time_embed_dim, name="time_embedding", **kw)(temb)
        # Frames ride in the batch for every 2-D layer: [B*T, ...], frames of a video consecutive. The caption
        # stays [B, L, D]: cross-attention shares each video's keys and values across its frames' queries.
        temb = jnp.repeat(temb, frames, axis=0)
        context = context.astype(self.dtype)

        h = x.astype(self.dtype).reshape(b * frames, height, width, c.in_channels)
        h = constrain_image(conv(c.block_out_channels[0], name="conv_in", **kw)(h))
        h = TemporalTransformer(c.transformer_in_heads, c.attention_head_dim, c.norm_num_groups,
                                norm_eps=c.attention_norm_eps, layer_norm_eps=c.transformer_norm_eps,
                                frame_position_embedding=c.frame_position_embedding, name="transformer_in",
                                **kw)(h, frames)

        skips = [h]
        for i, block_type in enumerate(c.down_block_types):
            h, block_skips = DownBlock(
                c.block_out_channels[i], c.layers_per_block,
                transformer=self._transformer(i) if block_type == "CrossAttnDownBlock3D" else None,
                add_downsample=i < n - 1, downsample_padding=c.downsample_padding, temporal=self._temporal(i),
                name=f"down_blocks_{i}", **block_kw)(h, temb, context, num_frames=frames)
            skips.extend(block_skips)

        h = MidBlock(c.block_out_channels[-1], output_scale_factor=c.mid_block_scale_factor,
                     transformer=self._transformer(n - 1), num_layers=1, temporal=self._temporal(n - 1),
                     name="mid_block", **block_kw)(h, temb, context, num_frames=frames)

        for i, block_type in enumerate(c.up_block_types):
            level = n - 1 - i
            num_layers = c.layers_per_block + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            h = UpBlock(c.block_out_channels[level], num_layers,
                        transformer=self._transformer(level) if block_type == "CrossAttnUpBlock3D" else None,
                        add_upsample=i < n - 1, temporal=self._temporal(level), name=f"up_blocks_{i}",
                        **block_kw)(h, block_skips, temb, context, num_frames=frames)

        h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(h))
        h = conv(c.out_channels, name="conv_out", **kw)(h)
        return h.reshape(b, frames, height, width, c.out_channels)


# ----------------------------------------------------------------------------- inflation

# UNetConfig (2-D) fields that a video U-Net cannot take from an image U-Net: value needed.
_INFLATABLE = {"flip_sin_to_cos": True, "freq_shift": 0, "resnet_time_scale_shift": "default",
               "num_class_embeds": None, "center_input_sample": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
               "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_norm_eps": 1e-6, "transformer_norm_eps": 1e-5}


def inflated_config(unet_config, **overrides) -> TemporalUNetConfig:
    """The TemporalUNetConfig whose spatial layers are those of a 2-D `UNetConfig`.

    `overrides` set the video-only fields (frame_position_embedding, conditioning_frame_channels,
    transformer_in_heads, attention_head_dim for transformer_in's head width, ...). Raises
    ValueError naming any 2-D feature the video U-Net does not have.
    """
    u = unet_config
    problems = [f"{k}={getattr(u, k)!r} (need {v!r})" for k, v in _INFLATABLE.items() if getattr(u, k) != v]
    if u.time_embedding_dim not in (None, 4 * u.block_out_channels[0]):
        problems.append(f"time_embedding_dim={u.time_embedding_dim} (need None)")
    if set(u.transformer_layers_per_block) != {1}:
        problems.append(f"transformer_layers_per_block={u.transformer_layers_per_block} (need 1)")
    if len(set(u.layers_per_block)) != 1:
        problems.append(f"layers_per_block={u.layers_per_block} (need the same for every block)")
    if problems:
        raise ValueError("cannot inflate this U-Net into a TemporalUNet: " + "; ".join(problems))
    k = overrides.get("conditioning_frame_channels", 0)
    fields = dict(
        in_channels=u.in_channels + k, out_channels=u.out_channels, block_out_channels=u.block_out_channels,
        down_block_types=tuple(t.replace("2D", "3D") for t in u.down_block_types),
        up_block_types=tuple(t.replace("2D", "3D") for t in u.up_block_types),
        layers_per_block=u.layers_per_block[0], num_attention_heads=u.num_attention_heads,
        attention_head_dim=u.block_out_channels[0] // u.num_attention_heads[0],
        cross_attention_dim=u.cross_attention_dim, norm_num_groups=u.norm_num_groups, norm_eps=u.norm_eps,
        downsample_padding=u.downsample_padding, mid_block_scale_factor=u.mid_block_scale_factor,
        sample_size=u.sample_size)
    return TemporalUNetConfig(**{**fields, **overrides})


def _is_temporal(path: tuple[str, ...]) -> bool:
    return path[0] == "transformer_in" or any(p.startswith(("temp_convs_", "temp_attentions_")) for p in path)


def _zero_ended(path: tuple[str, ...]) -> bool:
    """The output layers that make a new temporal layer the identity."""
    return path[-2] in ("conv4_3", "proj_out") and _is_temporal(path)


def _fresh_temporal_param(path: tuple[str, ...], shape, dtype, key):
    """A new temporal layer's param, as its module's initialisers make it (without compiling an init)."""
    if path[-1] == "scale":
        return jnp.ones(shape, dtype)
    if path[-1] == "bias" or _zero_ended(path):
        return jnp.zeros(shape, dtype)
    return nn.initializers.lecun_normal()(key, shape, dtype)


def inflate(unet, unet_params, key=None, **overrides):
    """An image U-Net (UNet2DCondition + params) -> (TemporalUNet, params) that equals it per frame.

    Spatial weights are copied (1x1-convolution projections of SD 1.x-style transformers become
    the linear projections UNet3D uses; with `conditioning_frame_channels` the new conv_in input
    channels get zero weights). Temporal layers get their modules' initialisers from `key`
    (LeCun-normal kernels, zero biases, unit norm scales) and zero output layers, so at inflation
    the video U-Net's output on [B, T, H, W, C] is the image U-Net's output on each frame.
    `overrides`: see `inflated_config`.
    """
    module = TemporalUNet(inflated_config(unet.config, **overrides), dtype=unet.dtype, param_dtype=unet.param_dtype)
    template = traverse_util.flatten_dict(param_shapes(module))
    image = traverse_util.flatten_dict(nn.meta.unbox(unet_params))
    keys = jax.random.split(jax.random.key(0) if key is None else key, len(template))
    out, used = {}, set()
    for k, (path, leaf) in zip(keys, sorted(template.items())):
        if _is_temporal(path):
            out[path] = _fresh_temporal_param(path, leaf.shape, leaf.dtype, k)
            continue
        if path not in image:
            raise ValueError(f"inflate: the image U-Net has no param {'/'.join(path)}")
        value = jnp.asarray(image[path])
        used.add(path)
        if path == ("conv_in", "kernel") and value.shape != leaf.shape:
            extra = leaf.shape[2] - value.shape[2]
            value = jnp.concatenate([value, jnp.zeros((*value.shape[:2], extra, value.shape[3]), value.dtype)], 2)
        elif value.ndim == 4 and len(leaf.shape) == 2 and value.shape[:2] == (1, 1):
            value = value[0, 0]          # 1x1 conv projection -> linear projection
        if value.shape != leaf.shape:
            raise ValueError(f"inflate: param {'/'.join(path)} has shape {value.shape} in the image U-Net, "
                             f"{leaf.shape} in the video U-Net")
        out[path] = value.astype(leaf.dtype)
    left = sorted("/".join(p) for p in set(image) - used)
    if left:
        raise ValueError(f"inflate: image U-Net params with no place in the video U-Net: {left[:10]}")
    return module, traverse_util.unflatten_dict(out)
