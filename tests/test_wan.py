"""WanTransformer3D against diffusers' WanTransformer3DModel, through golden files made by
tests/fixtures/make_wan_fixtures.py (text-to-video, image-to-video, first-last-frame); weight round trips;
config and input validation."""
import functools
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

import jaxdiff as jd
from jaxdiff import parallel
from jaxdiff.convert.common import CheckpointError
from jaxdiff.models import WanConfig, WanTransformer3D

FIXTURES = Path(__file__).parent / "fixtures" / "wan"
WEIGHTS = "diffusion_pytorch_model.safetensors"
NAMES = ["t2v", "i2v", "flf2v"]


@functools.cache
def load(name):
    return jd.convert.from_diffusers(str(FIXTURES / name))


@functools.cache
def apply_fn(name):
    module, _ = load(name)
    return jax.jit(module.apply)


def run(name, io, t=None):
    _, params = load(name)
    out = apply_fn(name)({"params": params}, io["x"], io["t"] if t is None else t, io["context"],
                         io.get("image_context"))
    return np.asarray(out)


def relative_error(got, want):
    assert got.shape == want.shape
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers(name):
    io = dict(np.load(FIXTURES / name / "io.npz"))
    rel = relative_error(run(name, io), io["sample"])
    assert rel <= 1e-5, f"{name}: max relative error {rel:.2e}"


def test_per_token_timesteps_match_diffusers():
    """Wan 2.2 TI2V's expand_timesteps: t [B, N], one per patch token; the same t everywhere is t [B]."""
    io = dict(np.load(FIXTURES / "t2v" / "io.npz"))
    rel = relative_error(run("t2v", io, io["t_tokens"]), io["sample_tokens"])
    assert rel <= 1e-5, f"per-token t: max relative error {rel:.2e}"
    uniform = np.repeat(io["t"][:, None], io["t_tokens"].shape[1], axis=1)
    np.testing.assert_allclose(run("t2v", io, uniform), io["sample"], rtol=0, atol=1e-5 * np.abs(io["sample"]).max())


def test_bfloat16_compute_stays_near_float32():
    """bf16 compute with float32 norms, modulation and residual sums, as diffusers keeps them."""
    module, params = load("i2v")
    io = dict(np.load(FIXTURES / "i2v" / "io.npz"))
    half = WanTransformer3D(module.config, dtype=jnp.bfloat16)
    out = jax.jit(half.apply)({"params": params}, io["x"], io["t"], io["context"], io["image_context"])
    assert out.dtype == jnp.bfloat16
    rel = relative_error(np.asarray(out, np.float32), io["sample"])
    assert rel <= 2e-2, f"bfloat16: max relative error {rel:.2e}"   # measured 6.5e-3


def test_configs_cover_the_variants():
    t2v, i2v, flf2v = (load(n)[0].config for n in NAMES)
    assert t2v.image_dim is None and t2v.rope_dims == (4, 4, 4) and t2v.ffn_dim % t2v.inner_dim
    assert i2v.added_kv_proj_dim == i2v.inner_dim and i2v.pos_embed_seq_len is None
    assert flf2v.patch_size == (2, 2, 2) and not flf2v.cross_attn_norm and flf2v.pos_embed_seq_len == 6
    _, params = load("flf2v")
    assert "norm2" not in params["blocks_0"] and "add_k_proj" in params["blocks_0"]["attn2"]
    assert params["condition_embedder"]["image_embedder"]["pos_embed"].shape == (1, 6, 10)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_exact(name, tmp_path):
    module, params = load(name)
    jd.convert.to_diffusers(module, params, str(tmp_path / "out"))
    module2, params2 = jd.convert.from_diffusers(str(tmp_path / "out"))
    assert module2.config == module.config
    a, b = (traverse_util.flatten_dict(jax.device_get(p)) for p in (params, params2))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))
    # the exported file holds diffusers' tensors key for key, bit for bit
    original, exported = load_file(str(FIXTURES / name / WEIGHTS)), load_file(str(tmp_path / "out" / WEIGHTS))
    assert original.keys() == exported.keys()
    for k in original:
        np.testing.assert_array_equal(original[k], exported[k], err_msg=k)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    reference = json.loads((FIXTURES / name / "config.json").read_text())
    assert {k: v for k, v in config.items() if not k.startswith("_")} == \
        {k: v for k, v in reference.items() if not k.startswith("_")}


@pytest.mark.parametrize("change, message", [
    ({"window_size": [-1, -1]}, r"config fields \['window_size'\] are unknown"),
    ({"qk_norm": "rms_norm"}, "qk_norm='rms_norm' is not supported"),
    ({"added_kv_proj_dim": None}, "must be both set"),
    ({"added_kv_proj_dim": 8}, "added_kv_proj_dim=8 must equal"),
])
def test_from_diffusers_names_the_bad_field(tmp_path, change, message):
    folder = tmp_path / "i2v"
    shutil.copytree(FIXTURES / "i2v", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        jd.convert.from_diffusers(str(folder))


def test_bad_inputs_are_refused():
    module, params = load("i2v")
    io = dict(np.load(FIXTURES / "i2v" / "io.npz"))
    shapes = lambda **kw: jax.eval_shape(lambda: module.apply({"params": params}, **{
        "x": io["x"][:1], "t": io["t"][:1], "context": io["context"][:1], "image_context": io["image_context"][:1],
        **kw}))
    with pytest.raises(ValueError, match="image_context=None"):
        shapes(image_context=None)
    with pytest.raises(ValueError, match=r"patch_size=\(1, 2, 2\)"):
        shapes(x=jnp.zeros((1, 2, 5, 6, 6)))
    with pytest.raises(ValueError, match=r"expected \[B, 12\]"):
        shapes(t=jnp.zeros((1, 5)))
    flf2v, flf2v_params = load("flf2v")
    io = dict(np.load(FIXTURES / "flf2v" / "io.npz"))
    with pytest.raises(ValueError, match="pos_embed_seq_len=6"):
        jax.eval_shape(lambda: flf2v.apply({"params": flf2v_params}, io["x"], io["t"], io["context"],
                                           io["image_context"][:, :3]))


def test_logical_axis_names_have_rules():
    """Every param axis name of the Wan transformer has a sharding rule (a name without one would replicate)."""
    module = WanTransformer3D(WanConfig(num_attention_heads=2, attention_head_dim=6, text_dim=8, freq_dim=8,
                                        ffn_dim=8, num_layers=1, in_channels=4, out_channels=4, image_dim=6,
                                        added_kv_proj_dim=12, pos_embed_seq_len=2))
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.example_inputs()[0],
                                               **module.example_inputs()[1]))["params"]
    names = {n for leaf in jax.tree.leaves(boxed, is_leaf=lambda b: isinstance(b, nn.Partitioned))
             if isinstance(leaf, nn.Partitioned) for n in leaf.names if n}
    assert {"embed", "heads", "mlp", "conv_time", "conv_out"} <= names
    assert names <= {name for name, _ in parallel.DEFAULT_RULES}
