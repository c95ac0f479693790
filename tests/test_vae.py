"""AutoencoderKL against diffusers (golden files) and the Gaussian posterior's closed forms."""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.models.vae import posterior_kl, sample_posterior

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.cache
def load(name):
    vae, params = jd.convert.from_diffusers(str(FIXTURES / name))
    return vae, params, dict(np.load(FIXTURES / name / "io.npz"))


def encode(vae, params, x):
    return jax.jit(functools.partial(vae.apply, method=vae.encode))({"params": params}, x)


def decode(vae, params, z):
    return jax.jit(functools.partial(vae.apply, method=vae.decode))({"params": params}, z)


@pytest.mark.parametrize("name", ["vae", "vae_plain"])
def test_matches_diffusers(name):
    vae, params, io = load(name)
    mean, logvar = encode(vae, params, io["x"])
    x = decode(vae, params, io["z"])
    errs = {"mean": rel_err(mean, io["mean"]), "logvar": rel_err(logvar, io["logvar"]),
            "decoded": rel_err(x, io["decoded"])}
    print(f"{name}: relative errors vs diffusers {errs}")
    assert max(errs.values()) <= 1e-5
    assert x.dtype == jnp.float32


def test_config_attributes_come_from_the_folder():
    vae, _, _ = load("vae")
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.5, 0.1)
    plain, _, _ = load("vae_plain")
    assert not plain.config.use_quant_conv and not plain.config.mid_block_add_attention


def test_decode_is_float32_under_bf16_compute():
    vae, params, io = load("vae")
    vae16 = vae.clone(dtype=jnp.bfloat16)
    # the decoder ignores the compute dtype, so decoding is bit-identical to the float32 model
    np.testing.assert_array_equal(decode(vae16, params, io["z"]), decode(vae, params, io["z"]))
    mean16, _ = encode(vae16, params, io["x"])
    assert mean16.dtype == jnp.bfloat16
    assert rel_err(mean16.astype(jnp.float32), io["mean"]) < 3e-2


def test_logvar_is_clamped():
    vae, params, io = load("vae")
    latent = vae.config.latent_channels
    for offset, bound in ((1e4, 20.0), (-1e4, -30.0)):
        bias = params["quant_conv"]["bias"].at[latent:].add(offset)
        shifted = {**params, "quant_conv": {**params["quant_conv"], "bias": bias}}
        mean, logvar = encode(vae, shifted, io["x"])
        np.testing.assert_array_equal(logvar, bound)
        np.testing.assert_allclose(mean, io["mean"], rtol=1e-5, atol=1e-6)


def test_posterior_sample_and_kl_closed_forms():
    mean = jnp.array([[0.5, -1.0]])
    logvar = jnp.array([[np.log(0.25), 0.0]])
    z = jax.vmap(lambda k: sample_posterior(k, mean, logvar))(jax.random.split(jax.random.key(0), 20000))
    np.testing.assert_allclose(z.mean(axis=0), mean, atol=0.02)
    np.testing.assert_allclose(z.std(axis=0), jnp.exp(0.5 * logvar), atol=0.02)
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2
    want = 0.5 * (0.25 + 0.25 - 1 - np.log(0.25)) + 0.5 * (1.0 + 1.0 - 1 - 0.0)
    np.testing.assert_allclose(posterior_kl(mean, logvar), [want], rtol=1e-6)


def test_reconstruction_call_is_encode_then_decode():
    vae, params, io = load("vae_plain")
    mean, _ = encode(vae, params, io["x"])
    np.testing.assert_allclose(jax.jit(vae.apply)({"params": params}, io["x"]), decode(vae, params, mean),
                               rtol=1e-6, atol=1e-6)
