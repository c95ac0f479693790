"""A U-Net's resolution blocks (diffusers' down, up and mid blocks: resnets, optional spatial transformers,
down/upsampling), shared by the U-Net, the video U-Net (with temporal layers) and the VAE."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.layers import (Downsample, Dtype, ResnetBlock, SpatialSelfAttention, SpatialTransformer,
                                   TransformerSpec, Upsample)


# ----------------------------------------------------------------------------- temporal hooks

# A resolution block with `temporal` set (a `jaxdiff.models.temporal_unet.TemporalSpec`) runs on
# frames flattened into the batch, [B*T, H, W, C], and mixes them after every resnet (a temporal
# convolution, `temp_convs_<i>`) and every spatial transformer (temporal self-attention,
# `temp_attentions_<i>`), in the order of diffusers' UNet3DConditionModel blocks. Without it
# (the default) the blocks are the 2-D ones, unchanged.

def _temporal_conv(temporal, i: int, x, num_frames, kw):
    return x if temporal is None else temporal.conv(name=f"temp_convs_{i}", **kw)(x, num_frames)


def _temporal_attention(temporal, i: int, x, num_frames, kw):
    return x if temporal is None else temporal.attention(name=f"temp_attentions_{i}", **kw)(x, num_frames)


def _resnet_layer(block, i: int, x, temb, context, num_frames, kw):
    """Layer i of a Down/UpBlock: resnet (+ temporal conv), then transformer (+ temporal attention).

    Called inside the block's compact `__call__`, so the submodules are the block's own.
    """
    x = ResnetBlock(block.out_channels, block.groups, block.eps, block.time_embedding_norm,
                    name=f"resnets_{i}", **kw)(x, temb)
    x = _temporal_conv(block.temporal, i, x, num_frames, kw)
    if block.transformer is not None:
        x = SpatialTransformer(block.transformer, block.groups, name=f"attentions_{i}", **kw)(x, context)
        x = _temporal_attention(block.temporal, i, x, num_frames, kw)
    return x


# ----------------------------------------------------------------------------- resolution blocks

class DownBlock(nn.Module):
    """One encoder resolution: resnets (each followed by a SpatialTransformer when `transformer`
    is set), then an optional strided downsample.

    Covers diffusers' CrossAttnDownBlock2D, DownBlock2D and (without `temb`) DownEncoderBlock2D.
    x: [B, H, W, C] -> (x', skips) with x' [B, H', W', out_channels] and one skip per
    resnet plus one after the downsample (the U-Net's skip connections).
    """
    out_channels: int
    num_layers: int
    groups: int
    eps: float
    time_embedding_norm: str = "default"
    transformer: TransformerSpec | None = None
    add_downsample: bool = True
    downsample_padding: int = 1
    temporal: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, context=None, num_frames: int | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for i in range(self.num_layers):
            x = _resnet_layer(self, i, x, temb, context, num_frames, kw)
            skips.append(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, self.downsample_padding, name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(nn.Module):
    """One decoder resolution: resnets (each optionally followed by a SpatialTransformer), then an
    optional nearest x2 upsample.

    With `skips` (U-Net: CrossAttnUpBlock2D, UpBlock2D), each resnet first concatenates the
    last unused skip along channels, consuming them from the end. Without (VAE: UpDecoderBlock2D)
    the resnets are plain. x: [B, H, W, C] -> [B, 2H, 2W, out_channels] (or H, W without upsample).
    """
    out_channels: int
    num_layers: int
    groups: int
    eps: float
    time_embedding_norm: str = "default"
    transformer: TransformerSpec | None = None
    add_upsample: bool = True
    temporal: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips: Sequence | None = None, temb=None, context=None, num_frames: int | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if skips is not None and len(skips) != self.num_layers:
            raise ValueError(f"UpBlock with {self.num_layers} resnets got {len(skips)} skip connections")
        for i in range(self.num_layers):
            if skips is not None:
                x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = _resnet_layer(self, i, x, temb, context, num_frames, kw)
        if self.add_upsample:
            x = Upsample(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class MidBlock(nn.Module):
    """Lowest resolution: resnet, then `num_layers` x (attention, resnet).

    The attention is a SpatialTransformer with cross-attention (U-Net's
    UNetMidBlock2DCrossAttn), single-head SpatialSelfAttention (the VAE's UNetMidBlock2D),
    or absent. x: [B, H, W, C] -> [B, H, W, C].
    """
    channels: int
    groups: int
    eps: float
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    transformer: TransformerSpec | None = None
    self_attention: bool = False
    num_layers: int = 1
    temporal: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, context=None, num_frames: int | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = lambda i: ResnetBlock(self.channels, self.groups, self.eps, self.time_embedding_norm,
                                       self.output_scale_factor, name=f"resnets_{i}", **kw)
        x = resnet(0)(x, temb)
        x = _temporal_conv(self.temporal, 0, x, num_frames, kw)
        for i in range(self.num_layers):
            if self.transformer is not None:
                x = SpatialTransformer(self.transformer, self.groups, name=f"attentions_{i}", **kw)(x, context)
                x = _temporal_attention(self.temporal, i, x, num_frames, kw)
            elif self.self_attention:
                x = SpatialSelfAttention(1, self.channels, self.channels, qkv_bias=True, groups=self.groups,
                                         eps=self.eps, output_scale_factor=self.output_scale_factor,
                                         name=f"attentions_{i}", **kw)(x)
            x = resnet(i + 1)(x, temb)
            x = _temporal_conv(self.temporal, i + 1, x, num_frames, kw)
        return x
