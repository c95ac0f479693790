"""Blocks of the transformer family over patch tokens (DiT, MMDiT, Flux, T5): RMS norm, adaLN modulation,
2-D sin-cos and rotary position embeddings."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import Dtype, dense, layer_norm


def rms_norm(eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.RMSNorm:
    """RMSNorm (Zhang & Sennrich 2019) with a learnt scale, statistics in float32."""
    return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), name=name)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with shift and scale [B, 1, D] broadcast over the tokens."""
    return x * (1 + scale) + shift


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero (Peebles & Xie 2023): LayerNorm without affine parameters, plus `chunks` modulation
    vectors [B, 1, D] (shifts, scales, gates) from a zero-initialised linear map of silu(cond).

    diffusers' AdaLayerNormZero (6 chunks), SD35AdaLayerNormZeroX (9), AdaLayerNormZeroSingle (3) and
    AdaLayerNormContinuous (2: scale, shift) are this one layer; the caller applies the chunks (`modulate`).
    x: [B, L, D], cond: [B, C] -> (norm(x), [chunks x [B, 1, D]]).
    """
    chunks: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = dense(self.chunks * x.shape[-1], ("embed", "mlp"), kernel_init=nn.initializers.zeros_init(),
                    name="linear", **kw)(nn.silu(cond))
        h = layer_norm(self.eps, affine=False, name="norm", **kw)(x)
        return h, jnp.split(mod[:, None, :], self.chunks, axis=-1)


def sincos_position_embedding_2d(dim: int, rows, cols) -> np.ndarray:
    """Fixed 2-D sin-cos embedding [len(rows)*len(cols), dim] (float64 table): the first half encodes the
    column position, the second the row position, each as [sin | cos] at frequencies 10000^(-k/(dim/4)).

    rows, cols: a count n (positions 0..n-1) or a 1-D array of positions (MMDiT's scaled, cropped grid).
    Tokens are in row-major order.
    """
    rows = np.arange(rows) if np.ndim(rows) == 0 else np.asarray(rows)
    cols = np.arange(cols) if np.ndim(cols) == 0 else np.asarray(cols)
    freqs = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    def embed(pos):
        angles = pos.reshape(-1)[:, None] * freqs[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    row, col = np.meshgrid(rows.astype(np.float64), cols.astype(np.float64), indexing="ij")
    return np.concatenate([embed(col), embed(row)], axis=1)


def rotary_table(ids: np.ndarray, axes_dim: Sequence[int], theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """Multi-axis rotary position embedding (Su et al. 2021; Flux's 3-axis RoPE): axis a of each token's
    position ids rotates its own `axes_dim[a]` channels at frequencies theta^(-2k / axes_dim[a]).

    ids: [L, n_axes] positions. Returns (cos, sin), each [L, sum(axes_dim) / 2] float32, tables built in float64.
    """
    angles = [np.outer(np.asarray(ids[:, a], np.float64), 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
              for a, d in enumerate(axes_dim)]
    angles = np.concatenate(angles, axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rotary(x, rotary):
    """Rotary position embedding (Su et al. 2021) on consecutive channel pairs (x0, x1) -> (x0 cos - x1 sin,
    x1 cos + x0 sin). x: [B, L, H, D], rotary: (cos, sin) [L, D/2]."""
    cos, sin = (r[None, :, None, :].astype(jnp.float32) for r in rotary)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
