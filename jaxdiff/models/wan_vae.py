"""Wan 2.1's causal video VAE (Wan team 2025), diffusers' AutoencoderKLWan. Videos are channels-last.

    vae.apply({'params': p}, x, method=vae.encode) -> (mean, logvar)   x: [B, 1 + 4k, H, W, in_channels]
    vae.apply({'params': p}, z, method=vae.decode) -> video            z: [B, n, H/s, W/s, z_dim]

with s = scale_factor_spatial = 2 ** (len(dim_mult) - 1) and t = scale_factor_temporal = 2 ** (number of temporal
downsamples): 1 + 4k frames encode to 1 + 4k/t latent frames, n latent frames decode to 1 + t (n - 1) frames
(clamped to [-1, 1]). Every convolution with a time extent is causal (padded on the past side only), so the first
frame is coded alone, like an image.

Chunked causal processing, as in diffusers: the encoder takes the first frame alone, then chunks of four frames;
the decoder takes one latent frame at a time. A chunk sees the past through a cache, carried from chunk to chunk:
each causal conv keeps the last two frames of its input, each temporal downsampler the last frame of its input.
Every block is a pure function `(x, cache) -> (y, cache)`; the cache is None for the first chunk, which builds it,
and `lax.scan` (Flax's `nn.scan`, params broadcast) carries it over the remaining chunks, so activation memory
is that of one chunk whatever the video's length. The first chunk also differs in the resamplers: its frame skips the time
convolutions (a temporal downsampler passes it through, a temporal upsampler does not double it).

The diffusion model sees normalised latents, as diffusers' Wan pipelines use them:
`normalize_latents(z, config) = (z - latents_mean) / latents_std` after encoding, `denormalize_latents` (its
inverse, `z * latents_std + latents_mean`) before decoding; both statistics are config fields, per channel.

Wan 2.2's VAE (is_residual, patch_size) is not implemented. The decoder computes in float32 whatever `dtype` says.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.checks import CheckpointError, check_supported
from jaxdiff.models.layers import conv
from jaxdiff.models.vae import LOGVAR_RANGE

Dtype = Any

CONV3D_AXES = ("conv_time", "conv_height", "conv_width", "conv_in", "conv_out")
VIDEO_AXES = ("batch", None, "height", "width", "channels")
ENCODE_CHUNK = 4          # frames per encoder chunk after the first frame (diffusers' constant)
RMS_EPS = 1e-12           # torch.nn.functional.normalize's floor on the norm

_UNSUPPORTED_DIFFUSERS_FIELDS = {"attn_scales": {()}, "dropout": {0.0}}
_WAN22_FIELDS = {"is_residual": (False,), "patch_size": (None, 1)}

# diffusers' defaults: Wan 2.1's latent statistics
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLWanConfig:
    """AutoencoderKLWan hyper-parameters, named as in diffusers' config (`temperal_downsample` spelt as there).

    `temperal_downsample[i]`: whether the encoder's i-th downsampler also halves time (the decoder mirrors it).
    `scale_factor_temporal` / `scale_factor_spatial` are what the architecture does (checked); pipelines read
    them, and `latents_mean` / `latents_std` (see `normalize_latents`), which the module itself does not use.
    """
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8

    def __post_init__(self):
        for field in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"AutoencoderKLWanConfig: temperal_downsample={list(self.temperal_downsample)} needs "
                             f"one entry per downsampler, len(dim_mult) - 1 = {len(self.dim_mult) - 1}")
        if sum(self.temperal_downsample) > 2:
            raise ValueError(f"AutoencoderKLWanConfig: temperal_downsample={list(self.temperal_downsample)} halves "
                             f"time more than twice; the encoder's chunks of {ENCODE_CHUNK} frames allow at most 2")
        for field in ("latents_mean", "latents_std"):
            if len(getattr(self, field)) != self.z_dim:
                raise ValueError(f"AutoencoderKLWanConfig: {field} has {len(getattr(self, field))} values for "
                                 f"z_dim={self.z_dim}")
        for field, value in (("scale_factor_temporal", 2 ** sum(self.temperal_downsample)),
                             ("scale_factor_spatial", 2 ** (len(self.dim_mult) - 1))):
            if getattr(self, field) != value:
                raise ValueError(f"AutoencoderKLWanConfig: {field}={getattr(self, field)}, but dim_mult and "
                                 f"temperal_downsample give {value}")

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    # the image VAE's names (`AutoencoderKLConfig`), which the pipelines read
    @property
    def downsample_factor(self) -> int:
        return self.scale_factor_spatial

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @classmethod
    def from_diffusers_config(cls, config: dict) -> AutoencoderKLWanConfig:
        """From a diffusers AutoencoderKLWan `config.json` dict; unsupported or unknown fields raise
        CheckpointError naming the field."""
        config = dict(config)
        for field, allowed in _WAN22_FIELDS.items():
            if config.get(field, allowed[0]) not in allowed:
                raise CheckpointError(f"AutoencoderKLWan config field {field}={config[field]!r} (Wan 2.2's VAE) is "
                                      f"not supported; supported: Wan 2.1's, is_residual=False, patch_size=None")
        check_supported(config, _UNSUPPORTED_DIFFUSERS_FIELDS, "AutoencoderKLWan")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for field, value in config.items():
            if field.startswith("_") or field in _UNSUPPORTED_DIFFUSERS_FIELDS or field in _WAN22_FIELDS:
                continue
            if field not in known:
                raise CheckpointError(f"AutoencoderKLWan config field {field}={value!r} is unknown to jaxdiff")
            kwargs[field] = value
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise CheckpointError(str(e)) from e

    def to_diffusers_config(self) -> dict:
        out = {"_class_name": "AutoencoderKLWan", "attn_scales": [], "dropout": 0.0, "is_residual": False,
               "patch_size": None}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def normalize_latents(z, config: AutoencoderKLWanConfig):
    """Encoder latents -> the diffusion model's: (z - latents_mean) / latents_std per channel. z: [..., z_dim]."""
    return (z - jnp.asarray(config.latents_mean, z.dtype)) / jnp.asarray(config.latents_std, z.dtype)


def denormalize_latents(z, config: AutoencoderKLWanConfig):
    """The diffusion model's latents -> the decoder's: z * latents_std + latents_mean per channel."""
    return z * jnp.asarray(config.latents_std, z.dtype) + jnp.asarray(config.latents_mean, z.dtype)


# ----------------------------------------------------------------------------- layers

def conv3d(features: int, kernel: tuple[int, int, int], strides: tuple[int, int, int] = (1, 1, 1), *,
           spatial_padding: int = 0, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.Conv:
    """A 3-D convolution unpadded in time (callers add the causal past), padded `spatial_padding` in H and W."""
    p = spatial_padding
    return nn.Conv(features, kernel, strides=strides, padding=((0, 0), (p, p), (p, p)), dtype=dtype,
                   param_dtype=param_dtype,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV3D_AXES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                   name=name)


def pointwise_conv3d(features: int, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.Conv:
    """A 1x1x1 convolution (causal by construction: it needs no cache)."""
    return conv3d(features, (1, 1, 1), dtype=dtype, param_dtype=param_dtype, name=name)


def causal_conv3d(features: int, kernel: tuple[int, int, int] = (3, 3, 3), *, dtype: Dtype, param_dtype: Dtype,
                  name: str | None = None) -> nn.Conv:
    """diffusers' WanCausalConv3d: 'same' in H and W; `causal` pads it in time."""
    return conv3d(features, kernel, spatial_padding=kernel[1] // 2, dtype=dtype, param_dtype=param_dtype, name=name)


def causal(layer: nn.Conv, x, cache=None):
    """`layer` padded only on the past side in time, so output frame t sees input frames <= t.

    x: [B, T, H, W, C]; cache: the k_t - 1 input frames before x, or None at the start of the video (zeros: causal
    zero padding) -> (layer's output [B, T, H, W, features], the cache for the next chunk: the last k_t - 1 frames).
    """
    past = layer.kernel_size[0] - 1
    if cache is None:
        cache = jnp.zeros((x.shape[0], past, *x.shape[2:]), x.dtype)
    x = jnp.concatenate([cache, x], axis=1)
    return layer(x), x[:, -past:]


class ChannelRMSNorm(nn.Module):
    """x / ||x|| * sqrt(C) * gamma over the channels of each pixel (diffusers' WanRMS_norm, no bias), statistics in
    float32. `gamma` keeps diffusers' stored shape, (C, 1, 1, 1) (`images=False`) or (C, 1, 1), so that the
    checkpoint maps one to one. x: [..., C] -> same."""
    images: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        shape = (c, 1, 1) if self.images else (c, 1, 1, 1)
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("norm",) + (None,) * (len(shape) - 1)),
                           shape, self.param_dtype)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, RMS_EPS) * (c ** 0.5) * gamma.reshape(c).astype(jnp.float32)
        return y.astype(self.dtype)


class ResidualBlock(nn.Module):
    """RMSNorm -> SiLU -> causal conv, twice, plus a (1x1x1-projected) shortcut: diffusers' WanResidualBlock.

    x: [B, T, H, W, C_in], cache {conv1, conv2} or None -> ([B, T, H, W, out_dim], cache).
    """
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cache = cache or {}
        shortcut = x
        if x.shape[-1] != self.out_dim:
            shortcut = pointwise_conv3d(self.out_dim, name="conv_shortcut", **kw)(x)
        h = nn.silu(ChannelRMSNorm(name="norm1", **kw)(x))
        h, cache1 = causal(causal_conv3d(self.out_dim, name="conv1", **kw), h, cache.get("conv1"))
        h = nn.silu(ChannelRMSNorm(name="norm2", **kw)(h))
        h, cache2 = causal(causal_conv3d(self.out_dim, name="conv2", **kw), h, cache.get("conv2"))
        return nn.with_logical_constraint(h + shortcut, VIDEO_AXES), {"conv1": cache1, "conv2": cache2}


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual: diffusers' WanAttentionBlock.
    x: [B, T, H, W, C] -> same (frames do not see each other, so it needs no cache)."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, h, w, c = x.shape
        qkv = conv(3 * c, kernel=1, name="to_qkv", **kw)(ChannelRMSNorm(images=True, name="norm", **kw)(x))
        q, k, v = (y.reshape(b * t, h * w, 1, c) for y in jnp.split(qkv, 3, axis=-1))
        y = dot_product_attention(q, k, v).reshape(b, t, h, w, c)
        return x + conv(c, kernel=1, name="proj", **kw)(y)


class MidBlock(nn.Module):
    """Residual block -> frame attention -> residual block (diffusers' WanMidBlock, one layer).
    x: [B, T, H, W, C], cache or None -> (same shape, cache)."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cache = cache or {}
        c = x.shape[-1]
        x, cache0 = ResidualBlock(c, name="resnets_0", **kw)(x, cache.get("resnets_0"))
        x = FrameAttention(name="attentions_0", **kw)(x)
        x, cache1 = ResidualBlock(c, name="resnets_1", **kw)(x, cache.get("resnets_1"))
        return x, {"resnets_0": cache0, "resnets_1": cache1}


class Resample(nn.Module):
    """diffusers' WanResample: halve or double H and W, and with '3d' time too.

    - downsample2d: zero-pad bottom/right, strided 3x3 conv per frame.
    - downsample3d: the same, then a (3, 1, 1) time conv of stride 2 over [last frame of the previous chunk, x]
      (a chunk of 2m frames -> m); the first chunk's frame passes through. Cache: the last frame.
    - upsample2d: nearest x2, 3x3 conv per frame to `out_dim` channels.
    - upsample3d: first a causal (3, 1, 1) time conv to 2C channels, read as two frames per frame (T -> 2T), then
      as upsample2d. The first chunk's frame is not doubled, and the time conv's cache starts after it (zeros).
    x: [B, T, H, W, C], cache or None -> (resampled x, cache). The spatial conv is `resample_1`: item 1 of
    diffusers' nn.Sequential, after the padding or upsampling (item 0, no params).
    """
    mode: str
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        if self.mode == "upsample3d":
            if cache is None:
                cache = jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype)
            else:
                y, cache = causal(causal_conv3d(2 * c, (3, 1, 1), name="time_conv", **kw), x, cache)
                x = einops.rearrange(y, "b t h w (two c) -> b (t two) h w c", two=2)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            return conv(self.out_dim, name="resample_1", **kw)(x), cache
        x = conv(c, stride=2, padding=((0, 1), (0, 1)), name="resample_1", **kw)(x)
        if self.mode == "downsample3d":
            last = x[:, -1:]
            if cache is not None:
                x = conv3d(c, (3, 1, 1), (2, 1, 1), name="time_conv", **kw)(jnp.concatenate([cache, x], axis=1))
            cache = last
        return x, cache


# ----------------------------------------------------------------------------- encoder and decoder

def _encoder_blocks(config: AutoencoderKLWanConfig) -> list[tuple[str, int]]:
    """The encoder's flat `down_blocks` list: ('resnet', out_dim) and ('downsample2d'|'downsample3d', dim)."""
    blocks = []
    for i, mult in enumerate(config.dim_mult):
        blocks += [("resnet", config.base_dim * mult)] * config.num_res_blocks
        if i < len(config.dim_mult) - 1:
            blocks.append(("downsample3d" if config.temperal_downsample[i] else "downsample2d",
                           config.base_dim * mult))
    return blocks


class Encoder(nn.Module):
    """One chunk of video [B, t, H, W, in_channels], cache or None -> ([B, t', H/s, W/s, 2 z_dim], cache)."""
    config: AutoencoderKLWanConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cache, new = cache or {}, {}
        x, new["conv_in"] = causal(causal_conv3d(c.base_dim, name="conv_in", **kw), x.astype(self.dtype),
                                   cache.get("conv_in"))
        for i, (kind, dim) in enumerate(_encoder_blocks(c)):
            name = f"down_blocks_{i}"
            block = ResidualBlock(dim, name=name, **kw) if kind == "resnet" else Resample(kind, dim, name=name, **kw)
            x, new[name] = block(x, cache.get(name))
        x, new["mid_block"] = MidBlock(name="mid_block", **kw)(x, cache.get("mid_block"))
        x = nn.silu(ChannelRMSNorm(name="norm_out", **kw)(x))
        x, new["conv_out"] = causal(causal_conv3d(2 * c.z_dim, name="conv_out", **kw), x, cache.get("conv_out"))
        return x, new


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then an optional upsampler to out_dim // 2 channels (diffusers' WanUpBlock)."""
    out_dim: int
    num_res_blocks: int
    upsample: str | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cache, new = cache or {}, {}
        for j in range(self.num_res_blocks + 1):
            name = f"resnets_{j}"
            x, new[name] = ResidualBlock(self.out_dim, name=name, **kw)(x, cache.get(name))
        if self.upsample is not None:
            x, new["upsamplers_0"] = Resample(self.upsample, self.out_dim // 2, name="upsamplers_0", **kw)(
                x, cache.get("upsamplers_0"))
        return x, new


class Decoder(nn.Module):
    """One chunk of latents [B, n, h, w, z_dim], cache or None -> ([B, n', h*s, w*s, out_channels], cache):
    the first chunk's frame gives one frame, every later latent frame scale_factor_temporal frames."""
    config: AutoencoderKLWanConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, cache=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cache, new = cache or {}, {}
        mults = c.dim_mult[::-1]
        x, new["conv_in"] = causal(causal_conv3d(c.decoder_dim * mults[0], name="conv_in", **kw), z.astype(self.dtype),
                                   cache.get("conv_in"))
        x, new["mid_block"] = MidBlock(name="mid_block", **kw)(x, cache.get("mid_block"))
        for i, mult in enumerate(mults):
            upsample = None
            if i < len(mults) - 1:
                upsample = "upsample3d" if c.temperal_downsample[::-1][i] else "upsample2d"
            name = f"up_blocks_{i}"
            x, new[name] = UpBlock(c.decoder_dim * mult, c.num_res_blocks, upsample, name=name, **kw)(
                x, cache.get(name))
        x = nn.silu(ChannelRMSNorm(name="norm_out", **kw)(x))
        x, new["conv_out"] = causal(causal_conv3d(c.out_channels, name="conv_out", **kw), x, cache.get("conv_out"))
        return x, new


def _scan_chunks(vae: nn.Module, coder: str, x, chunk: int):
    """x [B, 1 + k * chunk, ...] causally through `vae.<coder>` (the encoder or decoder): the first frame alone,
    which builds the cache, then the k chunks under `nn.scan` with the cache as the carry. Returns the outputs
    concatenated along time."""
    first, cache = getattr(vae, coder)(x[:, :1])
    if x.shape[1] == 1:
        return first

    def step(module, cache, xs):
        out, cache = getattr(module, coder)(xs, cache)
        return cache, out

    chunks = einops.rearrange(x[:, 1:], "b (k t) h w c -> k b t h w c", t=chunk)
    _, outs = nn.scan(step, variable_broadcast="params", split_rngs={"params": False})(vae, cache, chunks)
    return jnp.concatenate([first, einops.rearrange(outs, "k b t h w c -> b (k t) h w c")], axis=1)


class AutoencoderKLWan(nn.Module):
    """Causal video encoder -> diagonal Gaussian posterior -> causal video decoder. `__call__` reconstructs
    (used by init)."""
    config: AutoencoderKLWanConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.dtype, self.param_dtype)
        self.decoder = Decoder(c, jnp.float32, self.param_dtype)
        self.quant_conv = pointwise_conv3d(2 * c.z_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        self.post_quant_conv = pointwise_conv3d(c.z_dim, dtype=jnp.float32, param_dtype=self.param_dtype)

    def example_inputs(self) -> tuple[tuple, dict]:
        """The smallest (args, kwargs) that reach every param (`layers.param_shapes`): five frames, so that a
        second chunk runs the time convolutions."""
        s = self.config.scale_factor_spatial
        return (jnp.zeros((1, 1 + ENCODE_CHUNK, s, s, self.config.in_channels)),), {}

    def encode(self, x):
        """x: [B, 1 + 4k, H, W, C] (H, W multiples of scale_factor_spatial) -> (mean, logvar), each
        [B, 1 + 4k / scale_factor_temporal, H/s, W/s, z_dim], logvar clamped to [-30, 20]."""
        frames = x.shape[1]
        if (frames - 1) % ENCODE_CHUNK:
            raise ValueError(f"AutoencoderKLWan.encode: a video of {frames} frames; the causal encoder takes "
                             f"1 + {ENCODE_CHUNK}k frames (1, 5, 9, ...)")
        moments = self.quant_conv(_scan_chunks(self, "encoder", x, ENCODE_CHUNK))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """z: [B, n, h, w, z_dim] (unnormalised latents, see `denormalize_latents`) ->
        [B, 1 + scale_factor_temporal (n - 1), h*s, w*s, out_channels] float32, clamped to [-1, 1]."""
        z = self.post_quant_conv(z.astype(jnp.float32))
        return jnp.clip(_scan_chunks(self, "decoder", z, 1), -1.0, 1.0)

    def __call__(self, x):
        """Reconstruction: decode the posterior mean."""
        return self.decode(self.encode(x)[0])
