"""Flux (Black Forest Labs 2024), diffusers' FluxTransformer2DModel: MMDiT double-stream blocks (separate
text and image weights, joint attention) followed by single-stream blocks over the concatenated
sequence (attention and MLP in parallel, one output projection), with 3-axis rotary position
embeddings instead of a position table, and an optional guidance embedding (guidance-distilled
Flux-dev).

Call: `flux.apply({'params': p}, z, t, context, pooled, guidance=None)` with z [B, H, W, C] latents
(H, W even; C = in_channels / 4), t [B] on the 0..1000 scale (sigma * 1000), context
[B, L, joint_attention_dim], pooled [B, pooled_projection_dim] and, when `guidance_embeds`, guidance
[B] guidance scales (e.g. 3.5; embedded as guidance * 1000, as diffusers does). Returns [B, H, W, C_out].
The 2x2 packing of latents into tokens and the position ids (0, row, col) for image tokens, zeros for
text tokens, which diffusers' FluxPipeline prepares outside the model, happen inside.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.checks import config_from_diffusers, config_to_diffusers
from jaxdiff.models.layers import checkpointed, constrain_tokens, dense
from jaxdiff.models.transformer_layers import AdaLayerNormZero, modulate, rotary_table
from jaxdiff.models.mmdit import JointAttention, JointTransformerBlock, TimestepTextEmbedding, ada_norm_continuous


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Flux transformer hyper-parameters, named as in diffusers' config (defaults: FLUX.1's shape).
    in_channels / out_channels count packed channels (4 x the latent's)."""
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if self.patch_size != 1:
            raise ValueError(f"FluxConfig.patch_size={self.patch_size} is not supported; allowed: 1 (latents are "
                             f"packed into 2x2 patches before the model)")
        for field in ("in_channels", "packed_out_channels"):
            if getattr(self, field) % 4:
                raise ValueError(f"FluxConfig.{field}={getattr(self, field)} must be a multiple of 4 (2x2 packing)")
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope) \
                or sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"FluxConfig.axes_dims_rope={self.axes_dims_rope} must be 3 even sizes summing to "
                             f"attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def packed_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "FluxConfig":
        """From a diffusers FluxTransformer2DModel `config.json` dict; an unknown field or an unsupported
        value raises CheckpointError naming it."""
        return config_from_diffusers(cls, config, "FluxTransformer2DModel")

    def to_diffusers_config(self) -> dict:
        return config_to_diffusers(self, "FluxTransformer2DModel")


def pack(z):
    """[B, H, W, C] -> [B, (H/2)*(W/2), C*4], channels ordered (c, dy, dx) as diffusers' FluxPipeline packs."""
    return einops.rearrange(z, "b (h p) (w q) c -> b (h w) (c p q)", p=2, q=2)


def unpack(tokens, height: int, width: int):
    """Inverse of `pack`: [B, (H/2)*(W/2), C*4] -> [B, H, W, C]."""
    return einops.rearrange(tokens, "b (h w) (c p q) -> b (h p) (w q) c", h=height // 2, w=width // 2, p=2, q=2)


def position_ids(rows: int, cols: int, text_len: int) -> np.ndarray:
    """[rows*cols + text_len, 3] RoPE ids: (0, row, col) for the packed image tokens, then zeros for text."""
    row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    image = np.stack([np.zeros(rows * cols), row.reshape(-1), col.reshape(-1)], axis=1)
    return np.concatenate([image, np.zeros((text_len, 3))], axis=0)


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block: one adaLN-Zero LayerNorm, then attention and a GELU MLP in parallel on the joint
    sequence, concatenated through one gated output projection. x: [B, N, D], context: [B, L, D], cond: [B, D],
    rotary: (cos, sin) [N + L, head_dim / 2] -> (x', context')."""
    dim: int
    heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, cond, rotary):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = x.shape[1]
        joint = constrain_tokens(jnp.concatenate([x, context], axis=1))
        h, (shift, scale, gate) = AdaLayerNormZero(3, name="norm", **kw)(joint, cond)
        h = modulate(h, shift, scale)
        mlp = nn.gelu(dense(int(self.dim * self.mlp_ratio), ("embed", "mlp"), name="proj_mlp", **kw)(h),
                      approximate=True)
        attn, _ = JointAttention(self.heads, self.head_dim, "rms_norm", pre_only=True, name="attn", **kw)(
            h, rotary=rotary)
        out = dense(self.dim, ("mlp", "embed"), name="proj_out", **kw)(jnp.concatenate([attn, mlp], axis=-1))
        joint = constrain_tokens(joint + gate * out)
        return joint[:, :n], joint[:, n:]


class FluxTransformer2D(nn.Module):
    """Flux; see the module docstring for the call."""
    config: FluxConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = ""   # activation checkpointing of each block: a layers.REMAT_POLICIES name, "" off

    def example_inputs(self) -> tuple[tuple, dict]:
        """The smallest (args, kwargs) this model accepts (one packed token, one text token), for tracing its init."""
        c = self.config
        kwargs = {"guidance": jnp.zeros((1,))} if c.guidance_embeds else {}
        return (jnp.zeros((1, 2, 2, c.in_channels // 4)), jnp.zeros((1,)), jnp.zeros((1, 1, c.joint_attention_dim)),
                jnp.zeros((1, c.pooled_projection_dim))), kwargs

    @nn.compact
    def __call__(self, z, t, context, pooled, guidance=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, channels = z.shape
        if height % 2 or width % 2 or 4 * channels != c.in_channels:
            raise ValueError(f"FluxTransformer2D input {z.shape}: height and width must be even and channels "
                             f"in_channels / 4 = {c.in_channels // 4}")
        if (guidance is None) == c.guidance_embeds:
            raise ValueError(f"FluxTransformer2D with guidance_embeds={c.guidance_embeds} got guidance="
                             f"{'None' if guidance is None else 'an array'}")

        x = dense(c.inner_dim, ("patch", "embed"), name="x_embedder", **kw)(pack(z.astype(self.dtype)))
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,)) * 1000
        cond = TimestepTextEmbedding(c.inner_dim, c.guidance_embeds, name="time_text_embed", **kw)(t, pooled, guidance)
        context = dense(c.inner_dim, ("mlp", "embed"), name="context_embedder", **kw)(context.astype(self.dtype))
        # tokens run image-first (diffusers puts text first; only the RoPE ids must follow the order)
        rotary = rotary_table(position_ids(height // 2, width // 2, context.shape[1]), c.axes_dims_rope)

        block_kw = dict(dim=c.inner_dim, heads=c.num_attention_heads, head_dim=c.attention_head_dim, **kw)
        double, single = (checkpointed(b, self.remat) for b in (JointTransformerBlock, FluxSingleTransformerBlock))
        for i in range(c.num_layers):
            x, context = double(qk_norm="rms_norm", name=f"transformer_blocks_{i}", **block_kw)(
                x, context, cond, rotary)
        for i in range(c.num_single_layers):
            x, context = single(name=f"single_transformer_blocks_{i}", **block_kw)(x, context, cond, rotary)

        x = ada_norm_continuous(x, cond, "norm_out", kw)
        out = dense(c.packed_out_channels, ("embed", "patch"), kernel_init=nn.initializers.zeros_init(),
                    name="proj_out", **kw)(x)
        return unpack(out, height, width)
