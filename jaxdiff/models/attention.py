"""Scaled dot-product attention, the one function every model (U-Net, VAE, CLIP, DiT, video) calls.

Memory-bound on CPU, so computed in query blocks with its own backward pass (FlashAttention's, Dao et al. 2022,
without the key blocking): each block's logits [B, H, Lq/n, Lk] stay small enough for the cache, the forward keeps
only the output and the log-sum-exp per query, and the backward recomputes the block's probabilities and uses
rowsum(dO * O) instead of a reduction over the probabilities. Against XLA's path (jax.nn.dot_product_attention,
which holds and copies the whole [B, H, Lq, Lk] probabilities), alone on the 2-core CPU: 6x faster forward and 7x
faster forward + backward at [2, 1024, 4, 16], 2.9x and 2.6x at [2, 2304, 6, 64]; BENCHMARKS.md has the models.

Long sequences (sequence parallelism): token activations carry the logical axis `length`, which the default rules
split over the mesh's `context` axis. Query block j holds the queries j, j + n, j + 2n, ... (strided, not
contiguous), so every block is spread evenly over the `context` shards and splitting the blocks keeps the split of
the queries. GSPMD then partitions this function the way a hand-written shard_map would: each device keeps its
share of the queries, all-gathers the keys and values over `context` and attends locally; the backward pass sums
the keys' and values' gradients back over `context`. tests/test_parallel.py guards that the compiled Wan training
program all-gathers only k and v. Each device still holds all keys and values; ring attention would avoid that.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Logits per query block (4 MiB in float32): measured best of 32-256 queries at 1024 keys, 2 x 4 heads.
BLOCK_LOGITS = 2 ** 20


def dot_product_attention(q, k, v, mask=None, bias=None, scale=None):
    """softmax(scale q k^T + bias) v; logits, softmax and the accumulation in float32 for bfloat16 / float16 inputs,
    float64 for float64 inputs (gradient checks).

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True = attend. A fully masked row attends uniformly.
      bias: optional additive logit bias broadcastable to [B, H, Lq, Lk] (T5's relative position bias); it gets a
        gradient.
      scale: logit scale; None = 1/sqrt(D) (T5 uses 1: its q initialisation holds the scaling).
    Returns: [B, Lq, H, D] in v's dtype.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[::3] != k.shape[::3]:
        raise ValueError(f"attention wants q [B, Lq, H, D] and k, v [B, Lk, H, D]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask, bias = (None if x is None else jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape) for x in (mask, bias))
    return _attention(scale, q, k, v, mask, bias)


def _num_blocks(q, k) -> int:
    batch, length, heads, _ = q.shape
    return max(1, min(length, math.ceil(batch * heads * length * k.shape[1] / BLOCK_LOGITS)))


def _split(x, axis, n):
    """[..., L, ...] -> [n, ..., ceil(L/n), ...]: block j holds rows j, j + n, ... (zero rows pad the last ones)."""
    length = x.shape[axis]
    per = -(-length // n)
    if per * n != length:
        x = jnp.pad(x, [(0, per * n - length) if a == axis else (0, 0) for a in range(x.ndim)])
    x = x.reshape(x.shape[:axis] + (per, n) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis + 1, 0)


def _merge(x, axis, length):
    """Inverse of `_split` for a stacked [n, ...] result."""
    n = x.shape[0]
    x = jnp.moveaxis(x, 0, axis + 1)
    x = x.reshape(x.shape[:axis] + (x.shape[axis] * n,) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _compute_dtype(q):
    return jnp.promote_types(q.dtype, jnp.float32)


def _block_logits(scale, q, k, mask, bias):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_compute_dtype(q)) * scale
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return logits


def _block_forward(scale, q, k, v, mask, bias):
    """One query block: (output [B, q, H, D] in the compute dtype, log-sum-exp [B, H, q])."""
    logits = _block_logits(scale, q, k, mask, bias)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - top)
    total = jnp.sum(weights, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=logits.dtype)
    return out / jnp.moveaxis(total, 1, 2)[..., None], top[..., 0] + jnp.log(total)


def _block_backward(scale, q, k, v, mask, bias, out, lse, d_out):
    """One query block's gradients (dq, dk, dv, dbias) from the recomputed probabilities."""
    probs = jnp.exp(_block_logits(scale, q, k, mask, bias) - lse[..., None])
    cdt = probs.dtype
    d_v = jnp.einsum("bhqk,bqhd->bkhd", probs.astype(v.dtype), d_out.astype(v.dtype), preferred_element_type=cdt)
    d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=cdt)
    row = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(cdt), out)
    d_logits = probs * (d_probs - row[..., None])
    if mask is not None:
        d_logits = jnp.where(mask, d_logits, 0)
    d_bias = None if bias is None else _sum_to(d_logits, bias.shape).astype(bias.dtype)
    d_logits = d_logits * scale
    d_q = jnp.einsum("bhqk,bkhd->bqhd", d_logits.astype(k.dtype), k, preferred_element_type=cdt)
    d_k = jnp.einsum("bhqk,bqhd->bkhd", d_logits.astype(q.dtype), q, preferred_element_type=cdt)
    return d_q, d_k, d_v, d_bias


def _sum_to(x, shape):
    shape = (1,) * (x.ndim - len(shape)) + tuple(shape)
    axes = tuple(a for a, (m, s) in enumerate(zip(x.shape, shape)) if s == 1 and m != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(scale, q, k, v, mask, bias):
    return _forward(scale, q, k, v, mask, bias)[0]


def _forward(scale, q, k, v, mask, bias):
    n = _num_blocks(q, k)
    if n == 1:
        out, lse = _block_forward(scale, q, k, v, mask, bias)
    else:
        blocks, shared = _blocks(n, q=q, mask=mask, bias=bias)
        out, lse = jax.lax.map(lambda b: _block_forward(scale, b["q"], k, v, **_rows(b, shared)), blocks)
        out, lse = _merge(out, 1, q.shape[1]), _merge(lse, 2, q.shape[1])
    out = out.astype(v.dtype)
    return out, (q, k, v, mask, bias, out, lse)


def _backward(scale, residuals, d_out):
    q, k, v, mask, bias, out, lse = residuals
    n = _num_blocks(q, k)
    cdt = _compute_dtype(q)
    out = out.astype(cdt)
    if n == 1:
        d_q, d_k, d_v, d_bias = _block_backward(scale, q, k, v, mask, bias, out, lse, d_out)
        return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, d_bias
    blocks, shared = _blocks(n, q=q, mask=mask, bias=bias, out=out, lse=lse, d_out=d_out)
    bias_per_block = "bias" in blocks

    def step(carry, b):
        d_qb, d_kb, d_vb, d_biasb = _block_backward(scale, b["q"], k, v, **_rows(b, shared), out=b["out"],
                                                    lse=b["lse"], d_out=b["d_out"])
        d_k, d_v, d_bias = carry
        if not bias_per_block and bias is not None:
            d_bias = d_bias + d_biasb
        return (d_k + d_kb, d_v + d_vb, d_bias), (d_qb, d_biasb if bias_per_block else None)

    zeros = (jnp.zeros(k.shape, cdt), jnp.zeros(v.shape, cdt),
             None if bias is None or bias_per_block else jnp.zeros(bias.shape, bias.dtype))
    (d_k, d_v, d_bias), (d_q, d_bias_blocks) = jax.lax.scan(step, zeros, blocks)
    if bias_per_block:
        d_bias = _merge(d_bias_blocks, 2, q.shape[1])
    return (_merge(d_q, 1, q.shape[1]).astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, d_bias)


_attention.defvjp(_forward, _backward)


# Axis of the query rows: q, out, d_out [B, Lq, H, D]; mask, bias [B, H, Lq, Lk]; lse [B, H, Lq].
_QUERY_AXIS = {"q": 1, "out": 1, "d_out": 1, "mask": 2, "bias": 2, "lse": 2}


def _blocks(n, **arrays):
    """Splits the per-query arrays into n query blocks; (blocks to scan over, arrays every block shares: None or a
    mask / bias with one row for all queries)."""
    blocks, shared = {}, {}
    for name, x in arrays.items():
        if x is None or x.shape[_QUERY_AXIS[name]] == 1:
            shared[name] = x
        else:
            blocks[name] = _split(x, _QUERY_AXIS[name], n)
    return blocks, shared


def _rows(block, shared):
    """The block's mask and bias: its own rows where they were split, else the shared ones."""
    return {name: block[name] if name in block else shared[name] for name in ("mask", "bias")}
