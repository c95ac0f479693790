"""Scaled dot-product attention shared by every model (U-Net, VAE, CLIP, DiT, video)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v with the logits and softmax in float32 (or wider: float64 inputs stay float64).

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True = attend.
    Returns: [B, Lq, H, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(acc).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
