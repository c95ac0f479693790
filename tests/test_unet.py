"""UNet2DCondition against diffusers' UNet2DConditionModel (golden files) and closed forms."""
import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.models import UNetConfig
from jaxdiff.models.layers import CONV_AXES, timestep_embedding

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.cache
def load(name):
    unet, params = jd.convert.from_diffusers(str(FIXTURES / name))
    io = dict(np.load(FIXTURES / name / "io.npz"))
    return unet, params, io


@functools.cache
def jitted(unet):
    return jax.jit(unet.apply)


def run(unet, params, io, **overrides):
    kwargs = {k: io[k] for k in ("class_labels", "text_embeds", "time_ids") if k in io}
    args = {"x": io["x"], "t": io["t"], "context": io["context"], **kwargs, **overrides}
    return jitted(unet)({"params": params}, **args)


@pytest.mark.parametrize("name", ["unet_sd1", "unet_sd2", "unet_class_inpaint", "unet_sdxl"])
def test_matches_diffusers(name):
    unet, params, io = load(name)
    out = run(unet, params, io)
    assert out.shape == io["sample"].shape and out.dtype == jnp.float32
    err = rel_err(out, io["sample"])
    print(f"{name}: relative error vs diffusers {err:.2e}")
    assert err <= 1e-5


def test_diffusers_attention_head_dim_means_heads():
    # SD 1.x configs say attention_head_dim=8 and diffusers builds 8 heads of width C/8.
    cfg = UNetConfig.from_diffusers_config({"_class_name": "UNet2DConditionModel", "attention_head_dim": 8,
                                            "block_out_channels": [64, 128], "norm_num_groups": 8,
                                            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]})
    assert cfg.num_attention_heads == (8, 8)
    sd2 = UNetConfig.from_diffusers_config({"attention_head_dim": [5, 10], "block_out_channels": [320, 640],
                                            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]})
    assert sd2.num_attention_heads == (5, 10)
    assert sd2.to_diffusers_config()["attention_head_dim"] == [5, 10]


@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1)])
def test_timestep_embedding_closed_form(flip, shift):
    t = np.array([0.0, 1.0, 37.5, 999.0])
    dim = 10
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - shift))
    args = t[:, None] * freqs[None]
    sin, cos = np.sin(args), np.cos(args)
    want = np.concatenate([cos, sin] if flip else [sin, cos], axis=1)
    got = np.asarray(timestep_embedding(jnp.asarray(t, jnp.float32), dim, flip, shift))
    assert got.shape == (4, dim)
    np.testing.assert_allclose(got, want, atol=2e-4)  # float32 phase at t ~ 1000
    odd = np.asarray(timestep_embedding(jnp.asarray(t, jnp.float32), dim + 1, flip, shift))
    np.testing.assert_array_equal(odd[:, -1], 0.0)


def test_scalar_timestep_broadcasts():
    unet, params, io = load("unet_class_inpaint")
    both = run(unet, params, io, t=np.full((2,), io["t"][1]))
    np.testing.assert_array_equal(run(unet, params, io, t=io["t"][1]), both)


def test_bf16_compute_close_to_f32():
    unet, params, io = load("unet_class_inpaint")
    unet16 = unet.clone(dtype=jnp.bfloat16)
    out16 = run(unet16, params, io)
    assert out16.dtype == jnp.bfloat16
    err = rel_err(out16.astype(jnp.float32), io["sample"])
    assert err < 3e-2, err


def test_params_carry_logical_axes_and_unbox():
    unet, params, io = load("unet_class_inpaint")
    boxed = jax.eval_shape(lambda: unet.init(jax.random.key(0), io["x"], io["t"], io["context"],
                                             class_labels=io["class_labels"]))["params"]
    assert isinstance(boxed["conv_in"]["kernel"], nn.Partitioned)
    assert boxed["conv_in"]["kernel"].names == CONV_AXES
    q = boxed["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    assert q.names == ("embed", "heads")
    unboxed = nn.meta.unbox(boxed)
    assert jax.tree.map(lambda s: s.shape, unboxed) == jax.tree.map(jnp.shape, params)
    # and the converter returned plain arrays
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))


def test_runs_sharded_under_logical_axis_rules():
    unet, params, io = load("unet_class_inpaint")
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rules = [("batch", "data"), ("height", None), ("width", None), ("channels", None), ("length", None),
             ("embed", None)]
    kwargs = {"class_labels": io["class_labels"]}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # a fresh jit: the constraints are resolved while tracing, under these rules
        out = jax.jit(lambda p, *a, **k: unet.apply(p, *a, **k))({"params": params}, io["x"], io["t"], io["context"],
                                                                 **kwargs)
    assert rel_err(out, io["sample"]) <= 1e-5


def test_class_labels_are_required_and_used():
    unet, params, io = load("unet_class_inpaint")
    with pytest.raises(ValueError, match="class_labels"):
        jax.eval_shape(lambda: unet.apply({"params": params}, io["x"], io["t"], io["context"]))
    other = run(unet, params, io, class_labels=io["class_labels"][::-1])
    assert rel_err(other, io["sample"]) > 1e-3


def test_input_size_and_context_are_checked():
    unet, params, io = load("unet_sd1")
    with pytest.raises(ValueError, match="multiples of 4"):
        jax.eval_shape(lambda: unet.apply({"params": params}, io["x"][:, :10, :10], io["t"], io["context"]))
    with pytest.raises(ValueError, match="pass context"):
        jax.eval_shape(lambda: unet.apply({"params": params}, io["x"], io["t"]))


@pytest.mark.parametrize("field,value,match", [
    ("down_block_types", ("AttnDownBlock2D", "DownBlock2D"), "AttnDownBlock2D"),
    ("resnet_time_scale_shift", "spatial", "spatial"),
    ("num_attention_heads", (3, 3), "not divisible by num_attention_heads=3"),
    ("layers_per_block", (1, 2, 3), "layers_per_block"),
])
def test_config_validation_names_the_field(field, value, match):
    base = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, num_attention_heads=4)
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**base, field: value})


def test_sdxl_config_and_added_conditions_are_used():
    unet, params, io = load("unet_sdxl")
    c = unet.config
    assert (c.addition_embed_type, c.addition_time_embed_dim, c.projection_class_embeddings_input_dim) == \
        ("text_time", 4, 28)
    assert c.transformer_layers_per_block == (1, 2, 3) and c.use_linear_projection
    # per-block depth: down block 2 and the mid block have 3 layers, up block 0 (level 2) too, up block 1 has 2
    assert len([k for k in params["down_blocks_2"]["attentions_0"] if k.startswith("transformer_blocks")]) == 3
    assert len([k for k in params["mid_block"]["attentions_0"] if k.startswith("transformer_blocks")]) == 3
    assert len([k for k in params["up_blocks_1"]["attentions_0"] if k.startswith("transformer_blocks")]) == 2
    for key, other in (("text_embeds", io["text_embeds"][::-1]), ("time_ids", io["time_ids"][::-1])):
        assert rel_err(run(unet, params, io, **{key: other}), io["sample"]) > 1e-3, key


@pytest.mark.parametrize("missing", ["text_embeds", "time_ids"])
def test_sdxl_missing_added_conditions_is_one_line_error(missing):
    unet, params, io = load("unet_sdxl")
    kwargs = {k: io[k] for k in ("text_embeds", "time_ids") if k != missing}
    with pytest.raises(ValueError, match=r"addition_embed_type='text_time'.*pass text_embeds=\[B, D\] and time_ids") as e:
        jax.eval_shape(lambda: unet.apply({"params": params}, io["x"], io["t"], io["context"], **kwargs))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"projection_class_embeddings_input_dim\(28\)"):
        jax.eval_shape(lambda: unet.apply({"params": params}, io["x"], io["t"], io["context"],
                                          text_embeds=io["text_embeds"], time_ids=io["time_ids"][:, :5]))


def test_sdxl_export_round_trip_is_bit_identical(tmp_path):
    from safetensors.numpy import load_file
    unet, params, io = load("unet_sdxl")
    jd.convert.to_diffusers(unet, params, str(tmp_path))
    ours = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    theirs = load_file(str(FIXTURES / "unet_sdxl" / "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    config = json.loads((tmp_path / "config.json").read_text())
    want = json.loads((FIXTURES / "unet_sdxl" / "config.json").read_text())
    for field in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                  "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim", "use_linear_projection"):
        assert config[field] == want[field], field
    again, params2 = jd.convert.from_diffusers(str(tmp_path))
    assert again.config == unet.config
    np.testing.assert_array_equal(run(again, params2, io), run(unet, params, io))


def test_addition_embed_type_validation():
    base = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, num_attention_heads=4)
    with pytest.raises(ValueError, match="addition_embed_type='text' is not supported; supported: .*'text_time'"):
        UNetConfig(**base, addition_embed_type="text")
    with pytest.raises(ValueError, match="needs ints 0 < addition_time_embed_dim"):
        UNetConfig(**base, addition_embed_type="text_time")
