"""Scaled dot-product attention, the one function every model (U-Net, VAE, CLIP, DiT, video) calls.

Long sequences (sequence parallelism): token activations carry the logical axis `length`, which the default rules
split over the mesh's `context` axis. GSPMD then partitions this function the way a hand-written shard_map would:
each device keeps its share of the queries, all-gathers the keys and values over `context` and attends locally; the
backward pass sums the keys' and values' gradients back over `context`. Measured (jax 0.10.2, XLA:CPU, a tiny Wan
train step on data 2 x context 4): the compiled program's only all-gathers are each block's k and v, [B/2, N, H, D],
plus all-reduces of their gradients; no token activation [B, N, D] is gathered, and a device's temp memory is
1.17 MB against 10.0 MB on one device. So there is no shard_map here; tests/test_parallel.py guards the pattern.
Each device still holds all keys and values and its [N/context, N] logits; ring attention would avoid the former.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q, k, v, mask=None, bias=None, scale=None):
    """softmax(scale q k^T + bias) v through `jax.nn.dot_product_attention`, whose default (jax 0.10.2) is XLA's
    path on every backend, logits and softmax float32 for bfloat16 inputs. (cuDNN's fused kernel refuses a split
    sequence, "Sharding on sequence dim is not allowed": choosing it would need a shard_map over `context`.)
    float64 inputs (gradient checks) keep float64 throughout, which jax.nn's softmax, always float32, would not.

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
