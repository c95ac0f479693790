"""DiT: closed-form properties (no reference library has a text-conditional DiT to compare with)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import DiT, DiTConfig
from jaxdiff.models.dit import patchify, sincos_position_embedding_2d, unpatchify
from jaxdiff.models.layers import TransformerBlock

CONFIG = DiTConfig(sample_size=8, patch_size=2, in_channels=3, out_channels=6, hidden_size=32, depth=2, num_heads=4,
                   num_classes=5, context_dim=12)


def inputs(batch=3, key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    x = jax.random.normal(k1, (batch, 8, 8, 3))
    t = jnp.linspace(0, 999, batch)
    context = jax.random.normal(k2, (batch, 4, 12))
    labels = jnp.arange(batch) % (CONFIG.num_classes + 1)  # includes the null label 5
    return x, t, context, labels


@functools.cache
def init_params(config=CONFIG):
    x, t, context, labels = inputs(1)
    return nn.meta.unbox(jax.jit(DiT(config).init)(jax.random.key(0), x, t, context, class_labels=labels)["params"])


@functools.cache
def trained_like_params(config=CONFIG):
    """Init params with every leaf perturbed, so no part of the network is switched off."""
    params = init_params(config)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


@functools.cache
def apply_fn(config=CONFIG):
    return jax.jit(DiT(config).apply)


def test_output_is_exactly_zero_at_init():
    x, t, context, labels = inputs()
    out = apply_fn()({"params": init_params()}, x, t, context, class_labels=labels)
    assert out.shape == (3, 8, 8, 6)
    np.testing.assert_array_equal(out, 0.0)


def test_adaln_zero_block_is_identity_at_init():
    block = TransformerBlock(32, 4, 8, cross_attention=True, norm_eps=1e-6, qkv_bias=True, activation="gelu_tanh",
                             adaln_zero=True)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    context, cond = jnp.ones((2, 3, 12)), jax.random.normal(jax.random.key(2), (2, 32))
    params = block.init(jax.random.key(0), x, context, cond)
    out = block.apply(params, x, context, cond)
    # the cross-attention is not gated (as in PixArt), so only self-attention + MLP vanish:
    # zero its output projection too to check that the gates alone switch the rest off
    p = nn.meta.unbox(params)["params"]
    p["attn2"]["to_out_0"] = jax.tree.map(jnp.zeros_like, p["attn2"]["to_out_0"])
    np.testing.assert_array_equal(block.apply({"params": p}, x, context, cond), x)
    assert not np.allclose(out, x)  # with the cross-attention on, the block does act


def test_patchify_round_trip_and_layout():
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    # token 3 = patch row 1, column 1 (3 rows x 2 columns of patches), flattened (dy, dx, c)
    np.testing.assert_array_equal(tokens[:, 3], x[:, 2:4, 2:4, :].reshape(2, 12))
    np.testing.assert_array_equal(unpatchify(tokens, 2, 6, 4), x)


def test_sincos_position_embedding_closed_form():
    dim, rows, cols = 16, 3, 5
    pos = sincos_position_embedding_2d(dim, rows, cols)
    freqs = 10000.0 ** (-np.arange(4) / 4)
    r, c = 2, 3
    want = np.concatenate([np.sin(c * freqs), np.cos(c * freqs), np.sin(r * freqs), np.cos(r * freqs)])
    np.testing.assert_allclose(pos[r * cols + c], want, rtol=1e-12)


def test_batch_equivariance_and_independence():
    params = trained_like_params()
    x, t, context, labels = inputs()
    out = apply_fn()({"params": params}, x, t, context, class_labels=labels)
    perm = jnp.array([2, 0, 1])
    out_perm = apply_fn()({"params": params}, x[perm], t[perm], context[perm], class_labels=labels[perm])
    np.testing.assert_allclose(out_perm, out[perm], rtol=1e-5, atol=1e-5)
    # changing example 1 leaves examples 0 and 2 unchanged
    x2 = x.at[1].set(-x[1])
    out2 = apply_fn()({"params": params}, x2, t, context, class_labels=labels)
    np.testing.assert_allclose(out2[jnp.array([0, 2])], out[jnp.array([0, 2])], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out2[1], out[1], atol=1e-3)


@pytest.mark.parametrize("what", ["t", "context", "class_labels"])
def test_every_condition_reaches_the_output(what):
    params = trained_like_params()
    x, t, context, labels = inputs()
    args = dict(t=t, context=context, class_labels=labels)
    changed = dict(args, **{what: {"t": t + 100.0, "context": -context, "class_labels": (labels + 1) % 6}[what]})
    a = apply_fn()({"params": params}, x, **args)
    b = apply_fn()({"params": params}, x, **changed)
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_gradient_matches_finite_differences():
    """Directional derivatives of a scalar loss wrt the input and a weight, float64."""
    config = DiTConfig(sample_size=4, patch_size=2, in_channels=2, out_channels=2, hidden_size=16, depth=1,
                       num_heads=2, num_classes=3, context_dim=4)
    with jax.enable_x64(True):
        model = DiT(config, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2), jnp.float64)
        t, labels = jnp.array([5.0, 700.0]), jnp.array([0, 3])
        context = jax.random.normal(jax.random.key(1), (2, 3, 4), jnp.float64)
        # random values for every parameter (at init the zero layers would hide most of the network)
        shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(2), x, t, context, class_labels=labels))
        leaves, tree = jax.tree.flatten(shapes["params"])
        keys = jax.random.split(jax.random.key(3), len(leaves))
        params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, s.shape, s.dtype) for s, k in zip(leaves, keys)])
        w = jax.random.normal(jax.random.key(4), (2, 4, 4, 2), jnp.float64)

        @jax.jit
        def loss(params, x):
            return jnp.sum(w * model.apply({"params": params}, x, t, context, class_labels=labels))

        g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        v_x = jax.random.normal(jax.random.key(5), x.shape, jnp.float64)
        v_p = jax.tree.map(lambda p: jnp.ones_like(p) / np.sqrt(p.size), params)
        eps = 1e-5
        shift = lambda s: jax.tree.map(lambda p, v: p + s * v, params, v_p)
        fd_x = (loss(params, x + eps * v_x) - loss(params, x - eps * v_x)) / (2 * eps)
        fd_p = (loss(shift(eps), x) - loss(shift(-eps), x)) / (2 * eps)
        ad_x = jnp.vdot(g_x, v_x)
        ad_p = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(g_params), jax.tree.leaves(v_p)))
        np.testing.assert_allclose(ad_x, fd_x, rtol=1e-6)
        np.testing.assert_allclose(ad_p, fd_p, rtol=1e-6)


def test_condition_arguments_are_checked():
    x, t, context, labels = inputs()
    params = init_params()
    with pytest.raises(ValueError, match="context"):
        jax.eval_shape(lambda: DiT(CONFIG).apply({"params": params}, x, t, class_labels=labels))
    with pytest.raises(ValueError, match="class_labels"):
        jax.eval_shape(lambda: DiT(CONFIG).apply({"params": params}, x, t, context))
    with pytest.raises(ValueError, match="patch_size"):
        jax.eval_shape(lambda: DiT(CONFIG).apply({"params": params}, x[:, :7, :7], t, context, class_labels=labels))
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(hidden_size=30, num_heads=4)
