"""The one attention function every model calls, against the plain formula in float64 numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.attention import dot_product_attention


def reference(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v in float64 numpy; q [B, Lq, H, D], k, v [B, Lk, H, D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_formula(masked):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 5, 3, 8))
    k, v = (jax.random.normal(key, (2, 7, 3, 8)) for key in keys[1:])
    mask = (np.arange(7)[None, None, None, :] < np.array([7, 4])[:, None, None, None]) if masked else None
    out = dot_product_attention(q, k, v, None if mask is None else jnp.asarray(mask))
    assert out.dtype == jnp.float32 and out.shape == (2, 5, 3, 8)
    np.testing.assert_allclose(out, reference(q, k, v, mask), rtol=2e-5, atol=2e-6)


def test_bfloat16_keeps_its_dtype_with_float32_softmax():
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (1, 6, 2, 16)).astype(jnp.bfloat16) for key in keys)
    out = dot_product_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v), atol=3e-2)


def test_float64_stays_float64():
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(2), 3)
        q, k, v = (jax.random.normal(key, (1, 4, 2, 8), jnp.float64) for key in keys)
        out = dot_product_attention(q, k, v)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, reference(q, k, v), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_additive_bias_and_scale_match_the_formula(dtype):
    """T5's call: an additive logit bias [1, H, Lq, Lk] shared by the batch, scale 1, and a padding mask."""
    with jax.enable_x64(dtype == jnp.float64):
        keys = jax.random.split(jax.random.key(3), 4)
        q, k, v = (jax.random.normal(key, (2, 5, 3, 4), dtype) for key in keys[:3])
        bias = jax.random.normal(keys[3], (1, 3, 5, 5), dtype)
        mask = np.arange(5)[None, None, None, :] < np.array([5, 3])[:, None, None, None]
        out = dot_product_attention(q, k, v, jnp.asarray(mask), bias=bias, scale=1.0)
        assert out.dtype == dtype
        q64, k64, bias64 = (np.asarray(a, np.float64) for a in (q, k, bias))
        logits = np.einsum("bqhd,bkhd->bhqk", q64, k64) + bias64
        logits = np.where(mask, logits, -np.inf)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        expected = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), np.asarray(v, np.float64))
        np.testing.assert_allclose(out, expected, rtol=1e-12 if dtype == jnp.float64 else 2e-5,
                                   atol=0 if dtype == jnp.float64 else 2e-6)
