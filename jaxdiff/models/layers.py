"""Building blocks shared by the U-Net, the VAE and the transformers (Flax Linen, channels-last): convolutions,
norms, time embeddings, resnets, attention and transformer blocks. A U-Net's resolution blocks are in
`resolution_blocks`, the patch-transformer family's norms and position embeddings in `transformer_layers`.

Submodule names follow diffusers' attribute names (`conv1`, `time_emb_proj`, `to_q`,
`to_out_0`, `resnets_0`, ...) so that a weight's Flax path spells its PyTorch key;
`jaxdiff.convert.diffusers` relies on this.

Every kernel carries logical axis names (`nn.with_logical_partitioning`), so
`model.init(...)['params']` holds `nn.Partitioned` boxes: `nn.meta.unbox` them for plain
arrays. Key activations are constrained to ('batch', 'height', 'width', 'channels') or
('batch', 'length', 'embed') (the default rules split `length` over the mesh's `context` axis);
both are no-ops outside a mesh with axis rules. Transformer blocks can be checkpointed (`checkpointed`).

Dtypes: `dtype` is the compute dtype, `param_dtype` the storage dtype. Norm statistics
are always reduced in float32 (Flax's `force_float32_reductions`), attention softmax too.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import trace_cache
from jaxdiff.models.attention import dot_product_attention

Dtype = Any

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
IMAGE_AXES = ("batch", "height", "width", "channels")
TOKEN_AXES = ("batch", "length", "embed")


# ----------------------------------------------------------------------------- primitives

def conv(features: int, kernel: int = 3, stride: int = 1, padding=None, *, dtype: Dtype, param_dtype: Dtype,
         name: str | None = None) -> nn.Conv:
    """A square convolution, 'same'-sized by symmetric padding unless `padding` is given.

    Symmetric padding `(k - 1) // 2` on each side is what PyTorch's `padding=` does; Flax's
    'SAME' pads asymmetrically for strided convolutions, so it is never used here.
    """
    if padding is None:
        p = (kernel - 1) // 2
        padding = ((p, p), (p, p))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, param_dtype=param_dtype,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                   name=name)


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for a linear layer, [..., in] x [in, out] computed as one [N, in] x [in, out] matmul.

    Same values; the point is the backward pass: XLA:CPU computes the kernel's gradient, a contraction over every
    leading axis of [B, L, in], 2x slower than the same product over one merged axis (a 4-block MLP on [2, 256, 256]:
    forward + backward 77 ms vs 36 ms; an MMDiT-style AdaLN block 125 ms vs 70 ms; docs/speed-cpu.md).
    """
    (contract_lhs, contract_rhs), batch = dimension_numbers
    if lhs.ndim > 2 and rhs.ndim == 2 and tuple(contract_lhs) == (lhs.ndim - 1,) and tuple(contract_rhs) == (0,) \
            and batch == ((), ()):
        out = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision=precision,
                                  preferred_element_type=preferred_element_type)
        return out.reshape(lhs.shape[:-1] + rhs.shape[1:])
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True, dtype: Dtype,
          param_dtype: Dtype, kernel_init=nn.initializers.lecun_normal(), name: str | None = None) -> nn.Dense:
    """A linear layer whose kernel [in, out] carries the logical axis names `axes` (`flat_dot_general`)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, dot_general=flat_dot_general,
                    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
                    name=name)


def group_norm(groups: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm with PyTorch's two-pass variance (Flax's fast E[x^2]-E[x]^2 drifts by ~1e-6)."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                        name=name)


def layer_norm(eps: float, *, affine: bool = True, dtype: Dtype, param_dtype: Dtype,
               name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_scale=affine, use_bias=affine, use_fast_variance=False,
                        dtype=dtype, param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                        name=name)


def param_shapes(module: nn.Module, boxed: bool = False, example=None):
    """Shapes and dtypes of a model's params, without allocating them: its init traced on the module's
    `example_inputs()` (or `example()`'s (args, kwargs)); unboxed, or with `boxed` in their `nn.Partitioned` boxes
    (logical axis names). The inputs are made inside the trace, so nothing runs on a device (an eager op compiles a
    program in every fresh process).

    With JAX's persistent compilation cache on (`jaxdiff.compilation_cache.enable`, as the CLIs run) the result is
    kept beside it (`jaxdiff.trace_cache`), so a second process reads it instead of tracing the init again (0.2-0.4 s
    a model)."""
    params = trace_cache.load_shapes(module)
    if params is None:
        def init():
            args, kwargs = (example or module.example_inputs)()
            return module.init(jax.random.key(0), *args, **kwargs)

        params = jax.eval_shape(init)["params"]
        trace_cache.store_shapes(module, params)
    return params if boxed else nn.meta.unbox(params)


# Activation checkpointing of transformer blocks (`nn.remat`): '' off; 'full' keeps only each block's inputs and
# recomputes the rest in the backward pass; the others are `jax.checkpoint_policies` that also keep what they name.
REMAT_POLICIES = ("", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def checkpointed(block: type[nn.Module], remat: str) -> type[nn.Module]:
    """`block` with its activations checkpointed under the policy `remat` (one of REMAT_POLICIES); same params."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of: {', '.join(map(repr, REMAT_POLICIES))}")
    if not remat:
        return block
    return nn.remat(block, policy=None if remat == "full" else getattr(jax.checkpoint_policies, remat))


def constrain_image(x):
    return nn.with_logical_constraint(x, IMAGE_AXES)


def constrain_tokens(x):
    return nn.with_logical_constraint(x, TOKEN_AXES)


# ----------------------------------------------------------------------------- time embedding

def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / "Attention is all you need".

    frequency_i = max_period ** (-i / (dim/2 - freq_shift)), i < dim/2; output [sin | cos]
    ([cos | sin] with `flip_sin_to_cos`), zero-padded to `dim` when odd.

    The frequency table is computed in float32 with the same operation order as
    diffusers' `get_timestep_embedding`: at t ~ 1000 a one-ulp difference in a frequency
    moves sin(t f) by ~1e-4, which would dominate a parity comparison.

    Args:
      t: [B] timesteps on the training scale (int or float).
    Returns: [B, dim] float32.
    """
    half = dim // 2
    exponent = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32)
    freqs = jnp.exp(jnp.asarray(exponent / np.float32(half - freq_shift)))
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """The MLP on top of the sinusoidal embedding: linear -> SiLU -> linear. [B, C] -> [B, features]."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, emb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        emb = dense(self.features, ("embed", "mlp"), name="linear_1", **kw)(emb)
        return dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(nn.silu(emb))


# ----------------------------------------------------------------------------- convolutional blocks

class ResnetBlock(nn.Module):
    """Pre-activation residual block (GroupNorm -> SiLU -> conv, twice), diffusers' ResnetBlock2D.

    With a time embedding (U-Net), it enters after the first conv: added to the features
    ("default") or as FiLM on the second norm, h * (1 + scale) + shift ("scale_shift").
    Without one (VAE), the block has no `time_emb_proj`.

    x: [B, H, W, C_in], temb: [B, T] or None -> [B, H, W, out_channels].
    """
    out_channels: int
    groups: int
    eps: float
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(self.out_channels, name="conv1", **kw)(h)
        norm2 = group_norm(self.groups, self.eps, name="norm2", **kw)
        if temb is None:
            h = norm2(h)
        elif self.time_embedding_norm == "scale_shift":
            emb = dense(2 * self.out_channels, ("embed", "channels"), name="time_emb_proj", **kw)(nn.silu(temb))
            scale, shift = jnp.split(emb[:, None, None, :], 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            emb = dense(self.out_channels, ("embed", "channels"), name="time_emb_proj", **kw)(nn.silu(temb))
            h = norm2(h + emb[:, None, None, :])
        h = conv(self.out_channels, name="conv2", **kw)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, kernel=1, name="conv_shortcut", **kw)(x)
        return constrain_image((x + h) / self.output_scale_factor)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving H and W. [B, H, W, C] -> [B, H/2, W/2, C].

    `padding` is diffusers' `downsample_padding`: p > 0 pads p on every side (U-Net,
    p = 1); p = 0 pads one row and column on the bottom/right only (VAE encoder).
    """
    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.padding
        pad = ((p, p), (p, p)) if p > 0 else ((0, 1), (0, 1))
        return conv(self.channels, stride=2, padding=pad, name="conv", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution. [B, H, W, C] -> [B, 2H, 2W, C]."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


# ----------------------------------------------------------------------------- attention

class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (self- or cross-attention).

    x: [B, L, out_features], context: [B, S, D_ctx] or None (self-attention) -> [B, L, out_features].
    A context [G, S, D_ctx] with B = G*k is shared by each run of k consecutive sequences of x: its keys
    and values are computed once per group, and the group's queries attend to them together.
    """
    heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        inner = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.to_q = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, **kw)
        self.to_k = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, **kw)
        self.to_v = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, **kw)
        self.to_out_0 = dense(self.out_features, ("heads", "embed"), **kw)

    def __call__(self, x, context=None, mask=None):
        context = x if context is None else context
        shape, groups = x.shape, context.shape[0]
        if groups != shape[0]:
            if shape[0] % groups or mask is not None:
                raise ValueError(f"Attention: a context of {groups} entries for {shape[0]} query sequences (need "
                                 f"one per sequence, or one per equal group of sequences and no mask)")
            x = x.reshape(groups, -1, shape[-1])   # queries are independent: a group's sequences attend as one
        split = lambda y: y.reshape(*y.shape[:-1], self.heads, self.head_dim)
        out = dot_product_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)), mask)
        return self.to_out_0(out.reshape(*out.shape[:-2], self.heads * self.head_dim)).reshape(shape)


class SpatialSelfAttention(Attention):
    """GroupNorm then self-attention over all pixels, with a residual (the VAE's mid-block attention).

    x: [B, H, W, C] -> [B, H, W, C]; `out_features` must be C.
    """
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0

    def setup(self):
        super().setup()
        self.group_norm = group_norm(self.groups, self.eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)
        y = super().__call__(y).reshape(b, h, w, c)
        return constrain_image((x + y) / self.output_scale_factor)


class GELUProjection(nn.Module):
    """Linear layer then GELU; gated (GEGLU, Shazeer 2020) splits it into (h, gate) -> h * gelu(gate).

    GEGLU uses the exact erf GELU; the plain variant the tanh approximation (as in DiT's MLP).
    """
    features: int
    gated: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = dense(self.features * (2 if self.gated else 1), ("embed", "mlp"), name="proj", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
        if self.gated:
            h, gate = jnp.split(h, 2, axis=-1)
            return h * nn.gelu(gate, approximate=False)
        return nn.gelu(h, approximate=True)


class FeedForward(nn.Module):
    """Position-wise MLP: GELUProjection(mult * dim) -> linear back to dim. [..., dim] -> [..., dim]."""
    dim: int
    mult: int = 4
    activation: str = "geglu"   # "geglu" | "gelu_tanh"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.activation not in ("geglu", "gelu_tanh"):
            raise ValueError(f"FeedForward activation {self.activation!r}; choose one of: geglu, gelu_tanh")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GELUProjection(self.dim * self.mult, gated=self.activation == "geglu", name="net_0", **kw)(x)
        return dense(self.dim, ("mlp", "embed"), name="net_2", **kw)(h)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, feed-forward.

    Two flavours share this code:
    - U-Net (diffusers' BasicTransformerBlock): affine LayerNorms, GEGLU, no q/k/v bias.
    - DiT (Peebles & Xie 2023, adaLN-Zero): LayerNorms without affine parameters,
      modulated by `cond` through a zero-initialised linear layer (shift, scale, gate for
      attention and MLP), so each block starts as the identity.

    x: [B, L, dim]; context: [B, S, D_ctx] (needed when `cross_attention`); cond: [B, dim]
    (needed when `adaln_zero`) -> [B, L, dim].
    """
    dim: int
    heads: int
    head_dim: int
    cross_attention: bool = True
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    activation: str = "geglu"
    mlp_mult: int = 4
    adaln_zero: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, cond=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: layer_norm(self.norm_eps, affine=not self.adaln_zero, name=name, **kw)
        attention = lambda name: Attention(self.heads, self.head_dim, self.dim, qkv_bias=self.qkv_bias, name=name, **kw)
        x = constrain_tokens(x)
        if self.adaln_zero:
            mod = dense(6 * self.dim, ("embed", "mlp"), kernel_init=nn.initializers.zeros_init(),
                        name="adaLN_modulation", **kw)(nn.silu(cond))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod[:, None, :], 6, axis=-1)
        h = norm("norm1")(x)
        if self.adaln_zero:
            h = h * (1 + scale_msa) + shift_msa
        h = attention("attn1")(h)
        x = x + (gate_msa * h if self.adaln_zero else h)
        if self.cross_attention:
            x = x + attention("attn2")(norm("norm2")(x), context)
        h = norm("norm3")(x)
        if self.adaln_zero:
            h = h * (1 + scale_mlp) + shift_mlp
        h = FeedForward(self.dim, self.mlp_mult, self.activation, name="ff", **kw)(h)
        return constrain_tokens(x + (gate_mlp * h if self.adaln_zero else h))


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """How a resolution block builds its SpatialTransformer (diffusers' Transformer2DModel)."""
    heads: int
    num_layers: int = 1
    use_linear_projection: bool = False
    group_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5


class SpatialTransformer(nn.Module):
    """GroupNorm -> project in -> transformer blocks over the H*W tokens -> project out, plus a residual.

    The projections are 1x1 convolutions (SD 1.x) or linear layers (SD 2.x,
    `use_linear_projection`); the maths is the same, only the stored layout differs.
    x: [B, H, W, C], context: [B, S, D_ctx], or [G, S, D_ctx] shared by each run of B/G consecutive
    images (a video's frames) -> [B, H, W, C].
    """
    spec: TransformerSpec
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        spec = self.spec
        h = group_norm(self.groups, spec.group_norm_eps, name="norm", **kw)(x)
        if spec.use_linear_projection:
            h = dense(c, ("channels", "embed"), name="proj_in", **kw)(h.reshape(b, hh * ww, c))
        else:
            h = conv(c, kernel=1, name="proj_in", **kw)(h).reshape(b, hh * ww, c)
        for i in range(spec.num_layers):
            h = TransformerBlock(c, spec.heads, c // spec.heads, norm_eps=spec.layer_norm_eps,
                                 name=f"transformer_blocks_{i}", **kw)(h, context)
        if spec.use_linear_projection:
            h = dense(c, ("embed", "channels"), name="proj_out", **kw)(h).reshape(b, hh, ww, c)
        else:
            h = conv(c, kernel=1, name="proj_out", **kw)(h.reshape(b, hh, ww, c))
        return constrain_image(x + h)
