"""SD3Transformer2D (MMDiT) against diffusers' SD3Transformer2DModel, through golden files made by
tests/fixtures/make_mmdit_fixtures.py; weight round trips; config validation."""
import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import jaxdiff as jd
from jaxdiff.convert.common import CheckpointError
from jaxdiff.models import SD3Config, SD3Transformer2D
from jaxdiff.models.mmdit import position_table

FIXTURES = Path(__file__).parent / "fixtures" / "mmdit"
WEIGHTS = "diffusion_pytorch_model.safetensors"
NAMES = ["sd3", "sd35", "sd3_layer_norm"]


@functools.cache
def load(name):
    return jd.convert.from_diffusers(str(FIXTURES / name))


@functools.cache
def apply_fn(name):
    module, _ = load(name)
    return jax.jit(module.apply)


def run(name, io):
    _, params = load(name)
    return np.asarray(apply_fn(name)({"params": params}, io["x"], io["t"], io["context"], io["pooled"]))


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers(name):
    io = dict(np.load(FIXTURES / name / "io.npz"))
    out = run(name, io)
    assert out.shape == io["sample"].shape
    rel = np.abs(out - io["sample"]).max() / np.abs(io["sample"]).max()
    assert rel <= 1e-5, f"{name}: max relative error {rel:.2e}"


def test_configs_cover_the_variants():
    sd3, sd35, ln = (load(n)[0].config for n in NAMES)
    assert sd35.dual_attention_layers == (0, 1) and sd35.qk_norm == "rms_norm"
    assert ln.qk_norm == "layer_norm" and ln.pos_embed_max_size is None and ln.num_layers == 1
    # sd3's 3x5 patch grid is a crop of its 8x8 table; the param tree holds dual attention only where asked
    _, params = load("sd35")
    assert [("attn2" in params[f"transformer_blocks_{i}"]) for i in range(3)] == [True, True, False]
    assert "to_add_out" not in params["transformer_blocks_2"]["attn"]
    assert "ff_context" not in params["transformer_blocks_2"]


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
    # the exported file holds diffusers' tensors key for key, bit for bit (the position table included)
    original, exported = load_file(str(FIXTURES / name / WEIGHTS)), load_file(str(tmp_path / "out" / WEIGHTS))
    assert original.keys() == exported.keys()
    for k in original:
        np.testing.assert_array_equal(original[k], exported[k], err_msg=k)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    reference = json.loads((FIXTURES / name / "config.json").read_text())
    assert {k: v for k, v in config.items() if not k.startswith("_")} == \
        {k: v for k, v in reference.items() if not k.startswith("_")}


def test_position_table_is_diffusers_buffer():
    module, _ = load("sd3")
    stored = load_file(str(FIXTURES / "sd3" / WEIGHTS))["pos_embed.pos_embed"]
    np.testing.assert_array_equal(position_table(module.config), stored)


def test_wrong_position_table_is_named(tmp_path):
    folder = tmp_path / "sd3"
    shutil.copytree(FIXTURES / "sd3", folder)
    tensors = load_file(str(folder / WEIGHTS))
    tensors["pos_embed.pos_embed"] = tensors["pos_embed.pos_embed"] + 1e-3
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CheckpointError, match="pos_embed.pos_embed"):
        jd.convert.from_diffusers(str(folder))


def test_jit_batch_of_two_with_different_t():
    """Each example of a batch is the same as that example alone, with its own t (one jit, two shapes)."""
    io = dict(np.load(FIXTURES / "sd35" / "io.npz"))
    assert io["t"][0] != io["t"][1]
    both = run("sd35", io)
    for i in range(2):
        alone = run("sd35", {k: v[i:i + 1] for k, v in io.items()})
        np.testing.assert_allclose(alone[0], both[i], rtol=1e-5, atol=1e-5)
    swapped = run("sd35", dict(io, t=io["t"][::-1].copy()))
    assert np.abs(swapped - both).max() > 1e-3   # t reaches the output


def test_input_larger_than_position_table_is_refused():
    module, params = load("sd3")   # pos_embed_max_size=8 patches, patch_size=2
    io = dict(np.load(FIXTURES / "sd3" / "io.npz"))
    with pytest.raises(ValueError, match="pos_embed_max_size=8"):
        jax.eval_shape(lambda: module.apply({"params": params}, jnp.zeros((1, 18, 4, 4)), io["t"][:1],
                                            io["context"][:1], io["pooled"][:1]))
    with pytest.raises(ValueError, match="patch_size=2"):
        jax.eval_shape(lambda: module.apply({"params": params}, jnp.zeros((1, 5, 4, 4)), io["t"][:1],
                                            io["context"][:1], io["pooled"][:1]))


@pytest.mark.parametrize("change, match", [
    (dict(qk_norm="l2"), r"qk_norm='l2'.*'rms_norm'"),
    (dict(caption_projection_dim=10), r"caption_projection_dim=10 must equal .* = 8"),
    (dict(dual_attention_layers=(0, 5)), r"dual_attention_layers has \[5\].*0..1"),
    (dict(num_attention_heads=1, attention_head_dim=6, caption_projection_dim=6), r"= 6 must be a multiple of 4"),
    (dict(sample_size=7), r"sample_size=7 not divisible by patch_size=2"),
    (dict(pos_embed_max_size=0), r"pos_embed_max_size=0"),
])
def test_config_validation(change, match):
    base = load("sd3")[0].config
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(base, **change)


def test_unknown_or_unsupported_diffusers_config_is_named():
    config = json.loads((FIXTURES / "sd3" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="qk_norm='rms_norm_across_heads'"):
        SD3Config.from_diffusers_config(dict(config, qk_norm="rms_norm_across_heads"))
    with pytest.raises(CheckpointError, match="use_fancy_thing"):
        SD3Config.from_diffusers_config(dict(config, use_fancy_thing=True))
    assert SD3Config.from_diffusers_config(dict(config, out_channels=None)).out_channels == config["in_channels"]


def test_init_and_logical_axes():
    """A fresh module initialises (boxed params with logical axis names) and runs at another resolution."""
    module = SD3Transformer2D(load("sd3")[0].config)
    args, _ = module.example_inputs()
    variables = module.init(jax.random.key(0), *args)
    names = {tuple(leaf.names) for leaf in jax.tree.leaves(variables["params"],
                                                              is_leaf=lambda x: hasattr(x, "names"))}
    assert ("embed", "heads") in names and ("mlp", "embed") in names
    out = module.apply(variables, jnp.ones((2, 4, 8, 4)), jnp.array([1.0, 500.0]), jnp.ones((2, 3, 12)),
                       jnp.ones((2, 10)))
    assert out.shape == (2, 4, 8, 4)
    np.testing.assert_array_equal(out, 0.0)   # adaLN-Zero: zero modulation and output at init
