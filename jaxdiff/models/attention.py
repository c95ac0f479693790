"""Scaled dot-product attention shared by every model (U-Net, VAE, CLIP, DiT, video)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_weights(q, k, mask=None):
    """softmax(q k^T / sqrt(d)) [B, H, Lq, Lk], computed in float32 (or wider: float64 inputs stay float64).

    q: [B, Lq, H, D]; k: [B, Lk, H, D]; mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True = attend.
    """
    scale = q.shape[-1] ** -0.5
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(acc).min)
    return jax.nn.softmax(logits, axis=-1)


def attend(weights, v):
    """Attention weights [B, H, Lq, Lk] applied to values [B, Lk, H, D] -> [B, Lq, H, D] in v's dtype."""
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def dot_product_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v with the logits and softmax in float32 (`attention_weights`).

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True = attend.
    Returns: [B, Lq, H, D] in q's dtype.
    """
    return attend(attention_weights(q, k, mask), v)
