"""AutoencoderKLWan (Wan 2.1's causal video VAE) against diffusers, through golden files made by
tests/fixtures/make_wan_vae_fixtures.py; causality across chunks; weight round trips; config validation."""
import dataclasses
import functools
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

import jaxdiff as jd
from jaxdiff.convert.common import CheckpointError
from jaxdiff.models import AutoencoderKLWan, AutoencoderKLWanConfig
from jaxdiff.models.wan_vae import denormalize_latents, normalize_latents

FIXTURES = Path(__file__).parent / "fixtures" / "wan_vae"
NAMES = ["wan21", "mixed"]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.cache
def load(name):
    vae, params = jd.convert.from_diffusers(str(FIXTURES / name))
    return vae, params, dict(np.load(FIXTURES / name / "io.npz"))


def encode(name, x):
    vae, params, _ = load(name)
    return jax.jit(functools.partial(vae.apply, method=vae.encode))({"params": params}, x)


def decode(name, z):
    vae, params, _ = load(name)
    return jax.jit(functools.partial(vae.apply, method=vae.decode))({"params": params}, z)


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers(name):
    """1 + 4k frames (k = 2) through the chunked encoder and several latent frames through the decoder: the
    causal cache crosses chunk boundaries on both sides."""
    _, _, io = load(name)
    mean, logvar = encode(name, io["x"])
    decoded = decode(name, io["z"])
    assert (mean.shape, decoded.shape) == (io["mean"].shape, io["decoded"].shape)
    errs = {"mean": rel_err(mean, io["mean"]), "logvar": rel_err(logvar, io["logvar"]),
            "decoded": rel_err(decoded, io["decoded"])}
    print(f"{name}: relative errors vs diffusers {errs}")
    assert max(errs.values()) <= 1e-5


def test_is_causal():
    """A prefix of 1 + 4j frames encodes to the prefix of the latents, and a prefix of latents decodes to the
    prefix of the video: later frames never reach earlier outputs (a second path through the first chunks)."""
    vae, _, io = load("wan21")
    t = vae.config.scale_factor_temporal
    mean, _ = encode("wan21", io["x"][:, :5])
    assert rel_err(mean, io["mean"][:, :1 + 4 // t]) <= 1e-5
    decoded = decode("wan21", io["z"][:, :2])
    assert rel_err(decoded, io["decoded"][:, :1 + t]) <= 1e-5


def test_frame_count_is_refused():
    _, _, io = load("wan21")
    with pytest.raises(ValueError, match=r"a video of 8 frames; the causal encoder takes 1 \+ 4k frames") as e:
        encode("wan21", io["x"][:, :8])
    assert "\n" not in str(e.value)


def test_config_comes_from_the_folder():
    vae, _, _ = load("mixed")
    c = vae.config
    assert (c.decoder_dim, c.num_res_blocks, c.temperal_downsample) == (3, 2, (True, False))
    assert (c.scale_factor_temporal, c.scale_factor_spatial, c.latents_std) == (2, 4, (0.5, 2.0, 1.0))


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip(name, tmp_path):
    """to_diffusers writes the folder it was loaded from (diffusers loading it is checked by the generator)."""
    vae, params, _ = load(name)
    jd.convert.to_diffusers(vae, params, str(tmp_path))
    again, params2 = jd.convert.from_diffusers(str(tmp_path))
    assert again.config == vae.config
    flat, flat2 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
    assert flat.keys() == flat2.keys()
    for key in flat:
        np.testing.assert_array_equal(flat[key], flat2[key])
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((FIXTURES / name / "config.json").read_text())
    assert {k: v for k, v in written.items() if not k.startswith("_")} == \
        {k: v for k, v in original.items() if not k.startswith("_")}


def test_latent_normalisation_is_wan_pipelines():
    """diffusers' Wan pipelines: (z - mean) * (1 / std) after encoding, z / (1 / std) + mean before decoding."""
    vae, _, io = load("wan21")
    c = vae.config
    mean, std = np.asarray(c.latents_mean, np.float32), np.asarray(c.latents_std, np.float32)
    z = io["z"]
    np.testing.assert_allclose(normalize_latents(z, c), (z - mean) * (1 / std), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(denormalize_latents(z, c), z / (1 / std) + mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(denormalize_latents(normalize_latents(z, c), c), z, rtol=1e-6, atol=1e-6)


def config_of(name):
    return json.loads((FIXTURES / name / "config.json").read_text())


@pytest.mark.parametrize("field,value,message", [
    ("frame_rate", 16, "field frame_rate=16 is unknown to jaxdiff"),
    ("is_residual", True, "field is_residual=True (Wan 2.2's VAE) is not supported"),
    ("patch_size", 2, "field patch_size=2 (Wan 2.2's VAE) is not supported"),
    ("attn_scales", [0.5], "field attn_scales=[0.5] is not supported"),
    ("scale_factor_temporal", 8, "scale_factor_temporal=8, but dim_mult and temperal_downsample give 4"),
    ("temperal_downsample", [True, True, True], "halves time more than twice"),
    ("latents_std", [1.0], "latents_std has 1 values for z_dim=4"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(CheckpointError, match=re.escape(message)) as e:
        AutoencoderKLWanConfig.from_diffusers_config({**config_of("wan21"), field: value})
    assert "\n" not in str(e.value)


def test_default_config_is_wan21():
    """The defaults are diffusers' (Wan 2.1's VAE), and survive a diffusers config round trip."""
    c = AutoencoderKLWanConfig()
    assert (c.base_dim, c.z_dim, c.dim_mult, c.temperal_downsample) == (96, 16, (1, 2, 4, 4), (False, True, True))
    assert AutoencoderKLWanConfig.from_diffusers_config(c.to_diffusers_config()) == c
    assert isinstance(jd.convert.diffusers.module_from_config(c.to_diffusers_config()), AutoencoderKLWan)
    assert dataclasses.replace(c, decoder_base_dim=64).decoder_dim == 64
