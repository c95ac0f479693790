"""Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers"), optionally cross-attending to text tokens (as PixArt-alpha does).

Call convention, the same as the U-Net's:
`dit.apply({'params': p}, x, t, context=None, class_labels=None)` with x [B, H, W, in_channels]
(NHWC, H and W multiples of patch_size), t [B] training-scale timesteps, context [B, L, context_dim]
when `context_dim` is set, class_labels [B] ints in [0, num_classes] when `num_classes` is set
(label `num_classes` is the "null" class used for classifier-free guidance). Returns
[B, H, W, out_channels].

At initialisation the adaLN modulation and the final projection are zero, so every block is
the identity and the output is exactly zero (section 3.2 of the paper).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.layers import (TimestepEmbedding, TransformerBlock, checkpointed, constrain_tokens, dense,
                                   layer_norm, timestep_embedding)
from jaxdiff.models.transformer_layers import sincos_position_embedding_2d


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """DiT hyper-parameters (DiT-XL/2: hidden_size=1152, depth=28, num_heads=16, patch_size=2)."""
    sample_size: int = 32           # H = W used to initialise; any multiple of patch_size runs
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 4           # 2 * in_channels when the model also predicts the variance
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: int = 4
    num_classes: int | None = None  # class-conditional; one extra "null" embedding is added
    context_dim: int | None = None  # cross-attention to [B, L, context_dim] tokens
    norm_eps: float = 1e-6
    frequency_embedding_size: int = 256

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig.hidden_size={self.hidden_size} must be a multiple of 4 "
                             f"(2-D sin-cos position embedding)")
        if self.sample_size % self.patch_size:
            raise ValueError(f"DiTConfig.sample_size={self.sample_size} not divisible by patch_size={self.patch_size}")


def patchify(x, p: int):
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order."""
    return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)


def unpatchify(tokens, p: int, height: int, width: int):
    """Inverse of `patchify`: [B, (H/p)*(W/p), p*p*C] -> [B, H, W, C]."""
    return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=height // p, w=width // p, p=p, q=p)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a zero-initialised linear map to patch pixels.
    x: [B, N, D], cond: [B, D] -> [B, N, features]."""
    features: int
    norm_eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cond):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros_init())
        shift, scale = jnp.split(dense(2 * x.shape[-1], ("embed", "mlp"), name="adaLN_modulation", **kw)(nn.silu(cond))
                                 [:, None, :], 2, axis=-1)
        x = layer_norm(self.norm_eps, affine=False, name="norm_final", dtype=self.dtype,
                       param_dtype=self.param_dtype)(x)
        return dense(self.features, ("embed", "patch"), name="linear", **kw)(x * (1 + scale) + shift)


class DiT(nn.Module):
    """Diffusion Transformer; see the module docstring for the call."""
    config: DiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = ""   # activation checkpointing of each block: a layers.REMAT_POLICIES name, "" off

    @nn.compact
    def __call__(self, x, t, context=None, class_labels=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, _ = x.shape
        p = c.patch_size
        if height % p or width % p:
            raise ValueError(f"DiT input height and width {(height, width)} must be multiples of patch_size={p}")
        if (context is None) != (c.context_dim is None):
            raise ValueError(f"DiT with context_dim={c.context_dim} got context={'None' if context is None else 'an array'}")

        tokens = dense(c.hidden_size, ("patch", "embed"), kernel_init=nn.initializers.xavier_uniform(),
                       name="x_embedder", **kw)(patchify(x.astype(self.dtype), p))
        pos = sincos_position_embedding_2d(c.hidden_size, height // p, width // p)
        tokens = constrain_tokens(tokens + jnp.asarray(pos, self.dtype)[None])

        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        cond = timestep_embedding(t, c.frequency_embedding_size, flip_sin_to_cos=True).astype(self.dtype)
        cond = TimestepEmbedding(c.hidden_size, kernel_init=nn.initializers.normal(0.02), name="t_embedder",
                                 **kw)(cond)
        if c.num_classes is not None:
            if class_labels is None:
                raise ValueError(f"this DiT has num_classes={c.num_classes}: pass class_labels=[B] ints "
                                 f"({c.num_classes} = unconditional)")
            cond = cond + nn.Embed(c.num_classes + 1, c.hidden_size, name="y_embedder",
                                   embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                               ("vocab", "embed")),
                                   **kw)(class_labels)
        if context is not None:
            context = context.astype(self.dtype)

        block = checkpointed(TransformerBlock, self.remat)
        for i in range(c.depth):
            tokens = block(c.hidden_size, c.num_heads, c.hidden_size // c.num_heads,
                           cross_attention=c.context_dim is not None, norm_eps=c.norm_eps, qkv_bias=True,
                           activation="gelu_tanh", mlp_mult=c.mlp_ratio, adaln_zero=True,
                           name=f"blocks_{i}", **kw)(tokens, context, cond)
        out = FinalLayer(p * p * c.out_channels, c.norm_eps, name="final_layer", **kw)(tokens, cond)
        return unpatchify(out, p, height, width)
