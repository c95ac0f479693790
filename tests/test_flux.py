"""FluxTransformer2D against diffusers' FluxTransformer2DModel, through golden files made by
tests/fixtures/make_flux_fixtures.py (diffusers' pipeline packing and position ids); round trips; errors."""
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

import jaxdiff as jd
from jaxdiff.models.flux import pack, position_ids, unpack

FIXTURES = Path(__file__).parent / "fixtures" / "flux"
WEIGHTS = "diffusion_pytorch_model.safetensors"
NAMES = ["flux_dev", "flux_schnell"]


@functools.cache
def load(name):
    return jd.convert.from_diffusers(str(FIXTURES / name))


@functools.cache
def apply_fn(name):
    return jax.jit(load(name)[0].apply)


def run(name, io):
    return np.asarray(apply_fn(name)({"params": load(name)[1]}, io["z"], io["t"], io["context"], io["pooled"],
                                     guidance=io.get("guidance")))


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers(name):
    io = dict(np.load(FIXTURES / name / "io.npz"))
    out = run(name, io)
    assert out.shape == io["sample"].shape
    rel = np.abs(out - io["sample"]).max() / np.abs(io["sample"]).max()
    assert rel <= 1e-5, f"{name}: max relative error {rel:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_exact(name, tmp_path):
    module, params = load(name)
    jd.convert.to_diffusers(module, params, str(tmp_path / "out"))
    module2, params2 = jd.convert.from_diffusers(str(tmp_path / "out"))
    assert module2.config == module.config
    a, b = (traverse_util.flatten_dict(jax.device_get(p)) for p in (params, params2))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    original, exported = load_file(str(FIXTURES / name / WEIGHTS)), load_file(str(tmp_path / "out" / WEIGHTS))
    assert original.keys() == exported.keys()
    for k in original:
        np.testing.assert_array_equal(original[k], exported[k], err_msg=k)


def test_guidance_and_batch_of_two():
    io = dict(np.load(FIXTURES / "flux_dev" / "io.npz"))
    both = run("flux_dev", io)
    for i in range(2):
        alone = run("flux_dev", {k: v[i:i + 1] for k, v in io.items()})
        np.testing.assert_allclose(alone[0], both[i], rtol=1e-5, atol=1e-5)
    assert np.abs(run("flux_dev", dict(io, guidance=io["guidance"][::-1].copy())) - both).max() > 1e-3
    module, params = load("flux_dev")
    with pytest.raises(ValueError, match="guidance_embeds=True got guidance=None"):
        jax.eval_shape(lambda: module.apply({"params": params}, io["z"], io["t"], io["context"], io["pooled"]))
    with pytest.raises(ValueError, match="in_channels / 4 = 4"):
        jax.eval_shape(lambda: module.apply({"params": params}, io["z"][..., :3], io["t"], io["context"],
                                            io["pooled"], guidance=io["guidance"]))


def test_packing_and_position_ids():
    z = jax.random.normal(jax.random.key(0), (1, 4, 6, 3))
    tokens = pack(z)
    # token (row 1, col 2) holds pixels (2..3, 4..5), channels ordered (c, dy, dx)
    np.testing.assert_array_equal(tokens[0, 1 * 3 + 2], jnp.transpose(z[0, 2:4, 4:6, :], (2, 0, 1)).reshape(-1))
    np.testing.assert_array_equal(unpack(tokens, 4, 6), z)
    ids = position_ids(2, 3, 2)
    np.testing.assert_array_equal(ids, [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2],
                                        [0, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("change, match", [
    (dict(patch_size=2), r"patch_size=2 is not supported; allowed: 1"),
    (dict(in_channels=10), r"in_channels=10 must be a multiple of 4"),
    (dict(axes_dims_rope=(2, 2, 2)), r"axes_dims_rope=\(2, 2, 2\) must be 3 even sizes summing to attention_head_dim=8"),
])
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(load("flux_dev")[0].config, **change)
