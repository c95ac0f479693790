"""MMDiT, the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024, "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis"), as diffusers' SD3Transformer2DModel.

Text and image tokens keep separate weights (their own adaLN modulation, q/k/v projections and MLP)
but attend jointly: one attention over the concatenated sequence (section 4.1 of the paper). The
last block only feeds the text stream into that attention ("context_pre_only"). SD3.5 adds an
optional second, image-only self-attention per block (`dual_attention_layers`, conditioned by the
same adaLN; diffusers' SD35AdaLayerNormZeroX) and q/k normalisation (`qk_norm`).

Call: `mmdit.apply({'params': p}, x, t, context, pooled)` with x [B, H, W, in_channels] latents
(H and W multiples of patch_size), t [B] timesteps on the 0..1000 scale (sigma * 1000), context
[B, L, joint_attention_dim] text tokens and pooled [B, pooled_projection_dim] pooled text embedding.
Returns [B, H, W, out_channels] (the flow velocity). At initialisation every adaLN modulation and
the output projection are zero (adaLN-Zero, as in DiT), so the output is exactly zero.

Position embeddings are the fixed 2-D sin-cos table of a pos_embed_max_size^2 grid whose positions
are scaled by base_size / pos_embed_max_size (base_size = sample_size / patch_size), centre-cropped
to the input's patch grid; diffusers stores that table in the checkpoint (`pos_embed.pos_embed`),
jaxdiff computes it (`position_table`) and the converter checks the two agree.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.checks import config_from_diffusers, config_to_diffusers
from jaxdiff.models.dit import unpatchify
from jaxdiff.models.layers import (FeedForward, TimestepEmbedding, checkpointed, conv, constrain_tokens, dense,
                                   layer_norm, timestep_embedding)
from jaxdiff.models.transformer_layers import (AdaLayerNormZero, apply_rotary, modulate, rms_norm,
                                               sincos_position_embedding_2d)

QK_NORMS = (None, "layer_norm", "rms_norm")
NORM_EPS = 1e-6   # diffusers fixes every norm of SD3 to 1e-6


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """SD3 transformer hyper-parameters, named as in diffusers' config (defaults: SD3-medium's shape
    with diffusers' defaults; SD3.5-medium sets dual_attention_layers=(0, ..., 12), qk_norm='rms_norm')."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        for field in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                      "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                      "pooled_projection_dim", "out_channels"):
            if not (isinstance(getattr(self, field), int) and getattr(self, field) > 0):
                raise ValueError(f"SD3Config.{field}={getattr(self, field)!r} must be a positive int")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"SD3Config.qk_norm={self.qk_norm!r} is not supported; choose one of: "
                             f"{', '.join(map(repr, QK_NORMS))}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"SD3Config.caption_projection_dim={self.caption_projection_dim} must equal "
                             f"num_attention_heads * attention_head_dim = {self.inner_dim} (text and image "
                             f"tokens share the joint attention's width)")
        if self.inner_dim % 4:
            raise ValueError(f"SD3Config: num_attention_heads * attention_head_dim = {self.inner_dim} must be a "
                             f"multiple of 4 (2-D sin-cos position embedding)")
        if self.sample_size % self.patch_size:
            raise ValueError(f"SD3Config.sample_size={self.sample_size} not divisible by "
                             f"patch_size={self.patch_size}")
        if self.pos_embed_max_size is not None and not (isinstance(self.pos_embed_max_size, int)
                                                        and self.pos_embed_max_size > 0):
            raise ValueError(f"SD3Config.pos_embed_max_size={self.pos_embed_max_size!r} must be a positive int "
                             f"or None")
        bad = [i for i in self.dual_attention_layers if not (isinstance(i, int) and 0 <= i < self.num_layers)]
        if bad:
            raise ValueError(f"SD3Config.dual_attention_layers has {bad}; allowed: block indices 0.."
                             f"{self.num_layers - 1} (num_layers={self.num_layers})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def base_size(self) -> int:
        """The patch grid the position scale is set for: sample_size / patch_size."""
        return self.sample_size // self.patch_size

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "SD3Config":
        """From a diffusers SD3Transformer2DModel `config.json` dict; an unknown field or an unsupported
        value raises CheckpointError naming it."""
        # diffusers: out_channels None means in_channels
        same = {"out_channels": config.get("in_channels", cls.in_channels)} if config.get("out_channels", 0) is None \
            else {}
        return config_from_diffusers(cls, config, "SD3Transformer2DModel", **same)

    def to_diffusers_config(self) -> dict:
        return config_to_diffusers(self, "SD3Transformer2DModel")


def position_grid(n: int, grid: int, base_size: int, offset: int = 0) -> np.ndarray:
    """Positions of `n` patches along one axis, starting at `offset` in a grid of `grid` patches scaled to
    `base_size`: (offset + i) / (grid / base_size), in float32 as diffusers' get_2d_sincos_pos_embed."""
    return (np.arange(offset, offset + n, dtype=np.float32) / np.float32(grid / base_size)).astype(np.float32)


def position_table(config: SD3Config) -> np.ndarray:
    """diffusers' stored `pos_embed.pos_embed` buffer: the full [1, M*M, D] float32 table, M = pos_embed_max_size."""
    m = config.pos_embed_max_size
    pos = position_grid(m, m, config.base_size)
    return sincos_position_embedding_2d(config.inner_dim, pos, pos).astype(np.float32)[None]


def patch_positions(config: SD3Config, rows: int, cols: int) -> np.ndarray:
    """[rows*cols, D] float32 position embedding of a rows x cols patch grid: the centre crop of the
    pos_embed_max_size table, or (pos_embed_max_size=None) a table scaled to the grid itself."""
    m = config.pos_embed_max_size
    if m is None:
        row_pos, col_pos = position_grid(rows, rows, config.base_size), position_grid(cols, cols, config.base_size)
    else:
        if rows > m or cols > m:
            raise ValueError(f"SD3Transformer2D: a {rows}x{cols} patch grid exceeds pos_embed_max_size={m}")
        row_pos = position_grid(rows, m, config.base_size, offset=(m - rows) // 2)
        col_pos = position_grid(cols, m, config.base_size, offset=(m - cols) // 2)
    return sincos_position_embedding_2d(config.inner_dim, row_pos, col_pos).astype(np.float32)


class PatchEmbed(nn.Module):
    """p x p patches -> linear embedding (a stride-p convolution, `proj`) + fixed sin-cos positions.
    x: [B, H, W, C] -> [B, (H/p)*(W/p), D], tokens in row-major order."""
    config: SD3Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, p = self.config, self.config.patch_size
        _, height, width, _ = x.shape
        proj = conv(c.inner_dim, kernel=p, stride=p, padding=((0, 0), (0, 0)), name="proj", dtype=self.dtype,
                    param_dtype=self.param_dtype)
        tokens = proj(x).reshape(x.shape[0], (height // p) * (width // p), c.inner_dim)
        return tokens + jnp.asarray(patch_positions(c, height // p, width // p), self.dtype)[None]


class TimestepTextEmbedding(nn.Module):
    """The conditioning vector: MLP(sinusoid(t)) + MLP(pooled text) (+ MLP(sinusoid(guidance)) for
    guidance-distilled Flux), diffusers' CombinedTimestep(Guidance)TextProjEmbeddings.
    t: [B] (0..1000), pooled: [B, P], guidance: [B] or None -> [B, dim]."""
    dim: int
    guidance_embeds: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t, pooled, guidance=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mlp = lambda name, v: TimestepEmbedding(self.dim, name=name, **kw)(v.astype(self.dtype))
        cond = mlp("timestep_embedder", timestep_embedding(t, 256, flip_sin_to_cos=True))
        if self.guidance_embeds:
            cond = cond + mlp("guidance_embedder", timestep_embedding(guidance, 256, flip_sin_to_cos=True))
        # diffusers' PixArtAlphaTextProjection with SiLU: the same linear -> SiLU -> linear shape
        return cond + mlp("text_embedder", pooled)


class JointAttention(nn.Module):
    """Multi-head attention over image tokens and, when given, text tokens with their own projections
    (`add_*_proj`), attending as one sequence (MMDiT's joint attention, Esser et al. 2024 fig. 2b).

    q and k are normalised per head (`qk_norm`: LayerNorm or RMSNorm, section 5.3.2) before RoPE
    (`rotary`, Flux) and attention. x: [B, N, D], context: [B, L, D] or None, rotary: (cos, sin)
    [N + L, head_dim / 2] or None -> (out [B, N, D], context_out [B, L, D] or None). `pre_only`: no
    output projection (Flux's single blocks project after the MLP); `context_pre_only`: the text
    stream's output is not used, so it has no projection and None is returned for it.
    """
    heads: int
    head_dim: int
    qk_norm: str | None = None
    context_pre_only: bool = False
    pre_only: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _norm(self, name):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.qk_norm is None:
            return lambda h: h
        return rms_norm(NORM_EPS, **kw) if self.qk_norm == "rms_norm" else layer_norm(NORM_EPS, **kw)

    def _qkv(self, h, prefix: str, suffix: str, norm_prefix: str):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.head_dim
        split = lambda y: y.reshape(*y.shape[:-1], self.heads, self.head_dim)
        q, k, v = (split(dense(inner, ("embed", "heads"), name=f"{prefix}{n}{suffix}", **kw)(h)) for n in "qkv")
        return self._norm(f"{norm_prefix}q")(q), self._norm(f"{norm_prefix}k")(k), v

    @nn.compact
    def __call__(self, x, context=None, rotary=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, dim = x.shape[1], x.shape[-1]
        q, k, v = self._qkv(x, "to_", "", "norm_")
        if context is not None:
            cq, ck, cv = self._qkv(context, "add_", "_proj", "norm_added_")
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        out = dot_product_attention(q, k, v)
        out = out.reshape(*out.shape[:2], self.heads * self.head_dim)
        out, context_out = out[:, :n], (out[:, n:] if context is not None else None)
        if not self.pre_only:
            out = dense(dim, ("heads", "embed"), name="to_out_0", **kw)(out)
        if context_out is not None:
            context_out = None if self.context_pre_only else \
                dense(dim, ("heads", "embed"), name="to_add_out", **kw)(context_out)
        return out, context_out


def ada_norm_continuous(x, cond, name: str, kw: dict):
    """LayerNorm modulated by (scale, shift), in that order, from silu(cond) (diffusers' AdaLayerNormContinuous,
    the output norm of MMDiT and Flux). Called inside a compact method: the layer is the caller's `name`."""
    h, (scale, shift) = AdaLayerNormZero(2, NORM_EPS, name=name, **kw)(x, cond)
    return modulate(h, shift, scale)


class JointTransformerBlock(nn.Module):
    """One MMDiT block: adaLN-Zero-modulated joint attention and MLPs for the image and text streams
(also Flux's double-stream block, with RoPE).

    x: [B, N, D] image tokens, context: [B, L, D] text tokens, cond: [B, D] -> (x', context'), with
    context' None when `context_pre_only` (the last block: text enters its attention, nothing leaves).
    `dual_attention` (SD3.5): a second, image-only self-attention `attn2` with its own shift, scale and
    gate on the same normalised x.
    """
    dim: int
    heads: int
    head_dim: int
    context_pre_only: bool = False
    dual_attention: bool = False
    qk_norm: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, cond, rotary=None):
        """rotary: optional RoPE (cos, sin) [N + L, head_dim / 2] for the joint sequence (image tokens first)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = lambda name, **a: JointAttention(self.heads, self.head_dim, self.qk_norm, name=name, **a, **kw)
        mlp = lambda name: FeedForward(self.dim, 4, "gelu_tanh", name=name, **kw)
        x, context = constrain_tokens(x), constrain_tokens(context)

        h, mod = AdaLayerNormZero(9 if self.dual_attention else 6, NORM_EPS, name="norm1", **kw)(x, cond)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        if self.context_pre_only:
            ch = ada_norm_continuous(context, cond, "norm1_context", kw)
        else:
            ch, cmod = AdaLayerNormZero(6, NORM_EPS, name="norm1_context", **kw)(context, cond)
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmod
            ch = modulate(ch, c_shift_msa, c_scale_msa)

        out, context_out = attention("attn", context_pre_only=self.context_pre_only)(
            modulate(h, shift_msa, scale_msa), ch, rotary)
        x = x + gate_msa * out
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            x = x + gate_msa2 * attention("attn2")(modulate(h, shift_msa2, scale_msa2))[0]
        norm2 = layer_norm(NORM_EPS, affine=False, name="norm2", **kw)
        x = constrain_tokens(x + gate_mlp * mlp("ff")(modulate(norm2(x), shift_mlp, scale_mlp)))
        if self.context_pre_only:
            return x, None

        context = context + c_gate_msa * context_out
        norm2_context = layer_norm(NORM_EPS, affine=False, name="norm2_context", **kw)
        context = context + c_gate_mlp * mlp("ff_context")(modulate(norm2_context(context), c_shift_mlp, c_scale_mlp))
        return x, constrain_tokens(context)


class SD3Transformer2D(nn.Module):
    """The SD3 / SD3.5 MMDiT; see the module docstring for the call."""
    config: SD3Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = ""   # activation checkpointing of each block: a layers.REMAT_POLICIES name, "" off

    def example_inputs(self) -> tuple[tuple, dict]:
        """The smallest (args, kwargs) this model accepts (one patch, one text token), for tracing its init."""
        c = self.config
        return (jnp.zeros((1, c.patch_size, c.patch_size, c.in_channels)), jnp.zeros((1,)),
                jnp.zeros((1, 1, c.joint_attention_dim)), jnp.zeros((1, c.pooled_projection_dim))), {}

    @nn.compact
    def __call__(self, x, t, context, pooled):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, _ = x.shape
        p = c.patch_size
        if height % p or width % p:
            raise ValueError(f"SD3Transformer2D input height and width {(height, width)} must be multiples of "
                             f"patch_size={p}")

        tokens = constrain_tokens(PatchEmbed(c, name="pos_embed", **kw)(x.astype(self.dtype)))
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        cond = TimestepTextEmbedding(c.inner_dim, name="time_text_embed", **kw)(t, pooled)
        context = dense(c.caption_projection_dim, ("mlp", "embed"), name="context_embedder",
                        **kw)(context.astype(self.dtype))

        block = checkpointed(JointTransformerBlock, self.remat)
        for i in range(c.num_layers):
            tokens, context = block(
                c.inner_dim, c.num_attention_heads, c.attention_head_dim, context_pre_only=i == c.num_layers - 1,
                dual_attention=i in c.dual_attention_layers, qk_norm=c.qk_norm, name=f"transformer_blocks_{i}",
                **kw)(tokens, context, cond)

        tokens = ada_norm_continuous(tokens, cond, "norm_out", kw)
        out = dense(p * p * c.out_channels, ("embed", "patch"), kernel_init=nn.initializers.zeros_init(),
                    name="proj_out", **kw)(tokens)
        return unpatchify(out, p, height, width)

