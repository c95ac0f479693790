"""Scaled dot-product attention, the one function every model (U-Net, VAE, CLIP, DiT, video) calls."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q, k, v, mask=None, bias=None, scale=None):
    """softmax(scale q k^T + bias) v through `jax.nn.dot_product_attention`: on GPU it picks cuDNN's
    fused (flash) kernel where the shapes and dtype allow, elsewhere XLA's path, whose logits and
    softmax are float32 for bfloat16 inputs. float64 inputs (gradient checks) keep float64 throughout,
    which jax.nn's softmax, always float32, would not.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True = attend.
      bias: optional additive logit bias [B or 1, H, Lq, Lk] (T5's relative position bias).
      scale: logit scale; None = 1/sqrt(D) (T5 uses 1: its q initialisation holds the scaling).
    Returns: [B, Lq, H, D] in v's dtype.
    """
    if q.dtype != jnp.float64:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
