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


def formula(q, k, v, mask, bias, scale):
    """The plain formula in jnp (differentiated by jax's own autodiff): the second code path for the gradients."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale + (0 if bias is None else bias)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("lq, per_query", [(12, True), (11, True), (11, False), (3, False)])
def test_query_blocks_and_their_gradients_match_autodiff_of_the_formula(monkeypatch, lq, per_query):
    """Blocked queries (strided blocks, zero-padded when Lq is not a multiple) with a per-query causal-style mask and
    bias, or shared ones; values and gradients wrt q, k, v and the bias against jax's autodiff in float64."""
    from jaxdiff.models import attention
    monkeypatch.setattr(attention, "BLOCK_LOGITS", 2 * 3 * 4 * 7)  # 4 query rows per block of 2 x 3 heads x 7 keys
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(4), 5)
        q = jax.random.normal(keys[0], (2, lq, 3, 4), jnp.float64)
        k, v = (jax.random.normal(key, (2, 7, 3, 4), jnp.float64) for key in keys[1:3])
        rows = lq if per_query else 1
        bias = jax.random.normal(keys[3], (1, 3, rows, 7), jnp.float64)
        mask = jnp.asarray(np.arange(7)[None, None, None, :] <= (np.arange(rows) % 7)[None, None, :, None]
                           + np.array([0, 3])[:, None, None, None])
        cotangent = jax.random.normal(keys[4], q.shape, jnp.float64)
        assert attention._num_blocks(q, k) == -(-lq // 4)
        ours = jax.vjp(lambda *a: dot_product_attention(*a[:3], mask, bias=a[3], scale=0.7), q, k, v, bias)
        theirs = jax.vjp(lambda *a: formula(*a[:3], mask, a[3], 0.7), q, k, v, bias)
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-12, atol=1e-14)
        for got, want in zip(ours[1](cotangent), theirs[1](cotangent)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_bfloat16_blocks_and_gradients_stay_close_to_float32(monkeypatch):
    from jaxdiff.models import attention
    monkeypatch.setattr(attention, "BLOCK_LOGITS", 64)
    keys = jax.random.split(jax.random.key(5), 4)
    q, k, v, g = (jax.random.normal(key, (1, 16, 2, 8)) for key in keys)
    loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v).astype(jnp.float32) * g)
    full = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    half = jax.grad(loss, argnums=(0, 1, 2))(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    for a, b in zip(full, half):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(b, np.float32), a, atol=6e-2 * float(jnp.abs(a).max()))
