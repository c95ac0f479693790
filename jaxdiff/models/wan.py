"""The Wan 2.1 video diffusion transformer (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video
Generative Models"), as diffusers' WanTransformer3DModel: text-to-video, image-to-video (and first-last-frame)
checkpoints, and Wan 2.2's, which use the same model.

The latent video is cut into (1, 2, 2) patches by a strided 3-D convolution; each block is self-attention
with 3-D RoPE (the head's channels split over frame, row and column) and RMS q/k normalisation over the
whole inner width (not per head), cross-attention to the text (without modulation), and a GELU MLP. Only
the self-attention and the MLP are modulated: each block adds its learnt `scale_shift_table` [1, 6, D] to
one shared projection of the time embedding (shift, scale, gate for each), instead of a linear map per block
as adaLN-Zero. Image-to-video checkpoints (`image_dim`, `added_kv_proj_dim`) embed CLIP image states and
give the cross-attention a second set of keys and values for them, whose attention output is added to the
text's. Norms, modulation and residual sums are float32 whatever the compute dtype, as diffusers keeps them.

Call: `wan.apply({'params': p}, x, t, context, image_context=None)` with x [B, T, H, W, in_channels] latents
(T, H, W multiples of patch_size), t [B] timesteps on the 0..1000 scale (sigma * 1000), or [B, N] one per
patch token (N = T*H*W / prod(patch_size), Wan 2.2 TI2V's `expand_timesteps`), context [B, L, text_dim]
UMT5 states, image_context [B, S, image_dim] CLIP image states for image-to-video checkpoints (first- and
last-frame checkpoints, `pos_embed_seq_len` set: both frames' states concatenated, S = pos_embed_seq_len).
Returns [B, T, H, W, out_channels] (the flow velocity).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.checks import config_from_diffusers, config_to_diffusers
from jaxdiff.models.layers import (TimestepEmbedding, checkpointed, constrain_tokens, dense, layer_norm,
                                   timestep_embedding)
from jaxdiff.models.temporal_unet import TEMPORAL_CONV_AXES
from jaxdiff.models.transformer_layers import apply_rotary, modulate, rms_norm, rotary_table

QK_NORMS = ("rms_norm_across_heads",)
IMAGE_NORM_EPS = 1e-5   # the image embedder's LayerNorms keep PyTorch's default, not the config's eps
TABLE_AXES = (None, None, "embed")   # scale_shift_table [1, k, D], the image position table [1, S, D]


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Wan transformer hyper-parameters, named as in diffusers' config (defaults: Wan 2.1 14B text-to-video;
    1.3B: num_attention_heads=12, ffn_dim=8960, num_layers=30; image-to-video 14B: in_channels=36,
    image_dim=1280, added_kv_proj_dim=5120)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if len(self.patch_size) != 3 or not all(isinstance(p, int) and p > 0 for p in self.patch_size):
            raise ValueError(f"WanConfig.patch_size={self.patch_size!r} must be 3 positive ints (frames, rows, cols)")
        for field in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim", "ffn_dim",
                      "num_layers", "rope_max_seq_len"):
            if not (isinstance(getattr(self, field), int) and getattr(self, field) > 0):
                raise ValueError(f"WanConfig.{field}={getattr(self, field)!r} must be a positive int")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"WanConfig.qk_norm={self.qk_norm!r} is not supported; allowed: "
                             f"{', '.join(map(repr, QK_NORMS))} (what diffusers' WanAttention computes)")
        if self.attention_head_dim % 2:
            raise ValueError(f"WanConfig.attention_head_dim={self.attention_head_dim} must be even (RoPE pairs)")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(f"WanConfig: image_dim={self.image_dim} and added_kv_proj_dim={self.added_kv_proj_dim} "
                             f"must be both set (image-to-video) or both None (text-to-video)")
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.inner_dim:
            raise ValueError(f"WanConfig.added_kv_proj_dim={self.added_kv_proj_dim} must equal num_attention_heads * "
                             f"attention_head_dim = {self.inner_dim} (the image embedder's width)")
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError(f"WanConfig.pos_embed_seq_len={self.pos_embed_seq_len} needs image_dim (an "
                             f"image-to-video checkpoint)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def video_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """The head channels RoPE gives to frames, rows and columns (diffusers' WanRotaryPosEmbed split)."""
        rows = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * rows, rows, rows

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "WanConfig":
        """From a diffusers WanTransformer3DModel `config.json` dict; an unknown field or an unsupported
        value raises CheckpointError naming it."""
        return config_from_diffusers(cls, config, "WanTransformer3DModel")

    def to_diffusers_config(self) -> dict:
        return config_to_diffusers(self, "WanTransformer3DModel")


def position_ids(frames: int, rows: int, cols: int) -> np.ndarray:
    """[frames*rows*cols, 3] RoPE ids (frame, row, col) of the patch tokens, in their (f, h, w) order."""
    return np.stack(np.meshgrid(np.arange(frames), np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 3)


def modulation_table(module: nn.Module, rows: int, dim: int):
    """A learnt `scale_shift_table` [1, rows, dim] (N(0, 1/dim) at init, as diffusers) in float32. Called inside a
    compact method."""
    init = nn.with_logical_partitioning(nn.initializers.normal(dim ** -0.5), TABLE_AXES)
    table = module.param("scale_shift_table", init, (1, rows, dim), module.param_dtype)
    return table.astype(jnp.float32)


def fp32_layer_norm(x, eps: float, *, affine: bool, param_dtype: Any, name: str):
    """diffusers' FP32LayerNorm: statistics, affine map and result in float32. Called inside a compact method."""
    return layer_norm(eps, affine=affine, dtype=jnp.float32, param_dtype=param_dtype, name=name)(
        x.astype(jnp.float32))


class GELULinear(nn.Module):
    """diffusers' GELU layer: linear (`proj`) then GELU, exact or tanh-approximated. [..., C] -> [..., features]."""
    features: int
    approximate: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = dense(self.features, ("embed", "mlp"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return nn.gelu(h, approximate=self.approximate)


class GELUFeedForward(nn.Module):
    """diffusers' FeedForward with a plain GELU and any hidden and output width (Wan's ffn_dim is no multiple of
    its width, which `layers.FeedForward` needs). [..., C] -> [..., out]."""
    hidden: int
    out: int
    approximate: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GELULinear(self.hidden, self.approximate, name="net_0", **kw)(x)
        return dense(self.out, ("mlp", "embed"), name="net_2", **kw)(h)


class TextProjection(nn.Module):
    """linear -> tanh GELU -> linear (diffusers' PixArtAlphaTextProjection). [B, L, C] -> [B, L, dim]."""
    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.gelu(dense(self.dim, ("embed", "mlp"), name="linear_1", **kw)(x), approximate=True)
        return dense(self.dim, ("mlp", "embed"), name="linear_2", **kw)(h)


class ImageEmbedding(nn.Module):
    """CLIP image states -> the cross-attention's image tokens (diffusers' WanImageEmbedding): an optional learnt
    position table (first-last-frame checkpoints), LayerNorm, GELU MLP, LayerNorm. [B, S, C] -> [B, S, dim]."""
    dim: int
    pos_embed_seq_len: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.pos_embed_seq_len is not None:
            table = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.zeros_init(), TABLE_AXES),
                               (1, self.pos_embed_seq_len, x.shape[-1]), self.param_dtype)
            x = x + table
        h = fp32_layer_norm(x, IMAGE_NORM_EPS, affine=True, param_dtype=self.param_dtype, name="norm1")
        h = GELUFeedForward(x.shape[-1], self.dim, approximate=False, name="ff", **kw)(h.astype(self.dtype))
        h = fp32_layer_norm(h, IMAGE_NORM_EPS, affine=True, param_dtype=self.param_dtype, name="norm2")
        return h.astype(self.dtype)


class ConditionEmbedding(nn.Module):
    """Time, text and image conditioning (diffusers' WanTimeTextImageEmbedding).

    t: [B] or [B, N] -> temb [..., D] = MLP(sinusoid(t)) (float32) and its projection [..., 6 D] that every
    block's modulation starts from; context [B, L, text_dim] -> [B, L, D]; image [B, S, image_dim] -> [B, S, D].
    """
    config: WanConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t, context, image=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        sinusoid = timestep_embedding(t.reshape(-1), c.freq_dim, flip_sin_to_cos=True).reshape(*t.shape, -1)
        # diffusers keeps the time MLP in float32 whatever the model's dtype
        temb = TimestepEmbedding(c.inner_dim, dtype=jnp.float32, param_dtype=self.param_dtype,
                                 name="time_embedder")(sinusoid)
        projection = dense(6 * c.inner_dim, ("embed", "mlp"), name="time_proj", **kw)(nn.silu(temb.astype(self.dtype)))
        context = TextProjection(c.inner_dim, name="text_embedder", **kw)(context.astype(self.dtype))
        if image is not None:
            image = ImageEmbedding(c.inner_dim, c.pos_embed_seq_len, name="image_embedder", **kw)(image)
        return temb, projection, context, image


class WanAttention(nn.Module):
    """Multi-head attention with RMS-normalised q and k over the whole inner width (`rms_norm_across_heads`).

    Self-attention (context None) takes RoPE (cos, sin) [N, head_dim / 2]; cross-attention attends to the
    text, and with `added_kv` also, separately, to the image tokens (`add_k_proj`, `add_v_proj`, `norm_added_k`;
    no RoPE), the two outputs summed. x: [B, N, D], context: [B, L, D], image: [B, S, D] -> [B, N, D].
    """
    heads: int
    head_dim: int
    eps: float
    added_kv: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, rotary=None, image=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.head_dim
        heads = lambda y: y.reshape(*y.shape[:-1], self.heads, self.head_dim)
        project = lambda name, y: dense(inner, ("embed", "heads"), name=name, **kw)(y)
        norm = lambda name, y: rms_norm(self.eps, name=name, **kw)(y)
        source = x if context is None else context
        q = heads(norm("norm_q", project("to_q", x)))
        k = heads(norm("norm_k", project("to_k", source)))
        v = heads(project("to_v", source))
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        out = dot_product_attention(q, k, v)
        if self.added_kv:
            k_image = heads(norm("norm_added_k", project("add_k_proj", image)))
            out = out + dot_product_attention(q, k_image, heads(project("add_v_proj", image)))
        return dense(x.shape[-1], ("heads", "embed"), name="to_out_0", **kw)(out.reshape(*out.shape[:2], inner))


class WanTransformerBlock(nn.Module):
    """Modulated self-attention with RoPE, cross-attention (an affine LayerNorm before it when `cross_attn_norm`),
    modulated GELU MLP. x: [B, N, D], context: [B, L, D], image: [B, S, D] or None, projection: [B, 1 or N, 6 D]
    (the shared time projection), rotary: (cos, sin) [N, head_dim / 2] -> [B, N, D]."""
    config: WanConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, image, projection, rotary):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = lambda name, **a: WanAttention(c.num_attention_heads, c.attention_head_dim, c.eps, name=name,
                                                   **a, **kw)
        norm = lambda name, y, affine=False: fp32_layer_norm(y, c.eps, affine=affine, param_dtype=self.param_dtype,
                                                             name=name)
        mod = modulation_table(self, 6, c.inner_dim).reshape(1, 1, -1) + projection.astype(jnp.float32)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        x = constrain_tokens(x)

        h = modulate(norm("norm1", x), shift_msa, scale_msa).astype(self.dtype)
        x = (x.astype(jnp.float32) + attention("attn1")(h, rotary=rotary) * gate_msa).astype(self.dtype)
        h = norm("norm2", x, affine=True).astype(self.dtype) if c.cross_attn_norm else x
        x = x + attention("attn2", added_kv=image is not None)(h, context, image=image)
        h = modulate(norm("norm3", x), shift_mlp, scale_mlp).astype(self.dtype)
        mlp = GELUFeedForward(c.ffn_dim, c.inner_dim, approximate=True, name="ffn", **kw)
        return constrain_tokens((x.astype(jnp.float32) + mlp(h).astype(jnp.float32) * gate_mlp).astype(self.dtype))


class WanTransformer3D(nn.Module):
    """Wan's video transformer; see the module docstring for the call."""
    config: WanConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = ""   # activation checkpointing of each block: a layers.REMAT_POLICIES name, "" off

    def example_inputs(self) -> tuple[tuple, dict]:
        """The smallest (args, kwargs) this model accepts (one patch, one text token), for tracing its init."""
        c = self.config
        kwargs = {} if c.image_dim is None else \
            {"image_context": jnp.zeros((1, c.pos_embed_seq_len or 1, c.image_dim))}
        return (jnp.zeros((1, *c.patch_size, c.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, c.text_dim))), kwargs

    def _check(self, x, t, image_context) -> None:
        c = self.config
        if x.ndim != 5 or any(n % p for n, p in zip(x.shape[1:4], c.patch_size)) or x.shape[-1] != c.in_channels:
            raise ValueError(f"WanTransformer3D input {x.shape}: expected [B, T, H, W, {c.in_channels}] with T, H, W "
                             f"multiples of patch_size={c.patch_size}")
        grid = [n // p for n, p in zip(x.shape[1:4], c.patch_size)]
        if max(grid) > c.rope_max_seq_len:
            raise ValueError(f"WanTransformer3D input {x.shape}: a {grid} patch grid exceeds rope_max_seq_len="
                             f"{c.rope_max_seq_len}")
        if jnp.ndim(t) == 2 and t.shape[1] != math.prod(grid):
            raise ValueError(f"WanTransformer3D per-token timesteps {t.shape}: expected [B, {math.prod(grid)}] "
                             f"(one per patch of the {grid} grid)")
        if (image_context is None) != (c.image_dim is None):
            raise ValueError(f"WanTransformer3D with image_dim={c.image_dim} got image_context="
                             f"{'None' if image_context is None else 'an array'}")
        if c.pos_embed_seq_len is not None and image_context.shape[1] != c.pos_embed_seq_len:
            raise ValueError(f"WanTransformer3D image_context {image_context.shape}: expected "
                             f"pos_embed_seq_len={c.pos_embed_seq_len} tokens (first and last frame's states)")

    @nn.compact
    def __call__(self, x, t, context, image_context=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self._check(x, t, image_context)
        b = x.shape[0]
        frames, rows, cols = (n // p for n, p in zip(x.shape[1:4], c.patch_size))

        tokens = nn.Conv(c.inner_dim, c.patch_size, strides=c.patch_size, padding="VALID", name="patch_embedding",
                         kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), TEMPORAL_CONV_AXES),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                         **kw)(x.astype(self.dtype))
        tokens = constrain_tokens(tokens.reshape(b, frames * rows * cols, c.inner_dim))
        t = jnp.asarray(t)
        t = t if t.ndim == 2 else jnp.broadcast_to(t, (b,))[:, None]   # [B, 1 or N]
        temb, projection, context, image = ConditionEmbedding(c, name="condition_embedder", **kw)(
            t, context, image_context)
        rotary = rotary_table(position_ids(frames, rows, cols), c.rope_dims)

        block = checkpointed(WanTransformerBlock, self.remat)
        for i in range(c.num_layers):
            tokens = block(c, name=f"blocks_{i}", **kw)(tokens, context, image, projection, rotary)

        table = modulation_table(self, 2, c.inner_dim)
        shift, scale = table[:, 0] + temb, table[:, 1] + temb
        h = modulate(fp32_layer_norm(tokens, c.eps, affine=False, param_dtype=self.param_dtype, name="norm_out"),
                     shift, scale).astype(self.dtype)
        out = dense(math.prod(c.patch_size) * c.video_out_channels, ("embed", "patch"), name="proj_out", **kw)(h)
        return einops.rearrange(out, "b (f h w) (p q r c) -> b (f p) (h q) (w r) c", f=frames, h=rows, w=cols,
                                p=c.patch_size[0], q=c.patch_size[1], r=c.patch_size[2])
