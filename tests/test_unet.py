"""UNet2DCondition against diffusers' UNet2DConditionModel (golden files) and closed forms."""
import dataclasses
import functools
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
    kwargs = {"class_labels": io["class_labels"]} if "class_labels" in io else {}
    args = {"x": io["x"], "t": io["t"], "context": io["context"], **kwargs, **overrides}
    return jitted(unet)({"params": params}, **args)


@pytest.mark.parametrize("name", ["unet_sd1", "unet_sd2", "unet_class_inpaint"])
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


def test_input_coordinates_are_two_closed_form_channels(tmp_path):
    """input_coordinates=True is the same U-Net with two more input channels holding each pixel's column and
    row scaled to [-1, 1] (built here with numpy); it exports only as a jaxdiff field and loads back."""
    unet, _, io = load("unet_sd1")
    coords = unet.clone(config=dataclasses.replace(unet.config, input_coordinates=True))
    wide = unet.clone(config=dataclasses.replace(unet.config, in_channels=unet.config.in_channels + 2))
    x, t, context = io["x"], io["t"], io["context"]
    params = coords.init(jax.random.key(0), x, t, context)["params"]
    b, h, w, _ = x.shape
    grid = np.stack(np.meshgrid(np.arange(w) / (w - 1), np.arange(h) / (h - 1), indexing="xy"), -1) * 2 - 1
    explicit = np.concatenate([x, np.broadcast_to(grid, (b, h, w, 2))], axis=-1)
    np.testing.assert_allclose(coords.apply({"params": params}, x, t, context),
                               wide.apply({"params": params}, explicit, t, context), atol=1e-5)

    with pytest.raises(ValueError, match=r"cannot express \{.input_coordinates.: True\}"):
        jd.convert.to_diffusers(coords, params, str(tmp_path / "refused"))
    jd.convert.to_diffusers(coords, params, str(tmp_path / "unet"), jaxdiff_fields=True)
    loaded, loaded_params = jd.convert.from_diffusers(str(tmp_path / "unet"))
    assert loaded.config == coords.config
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded_params), jax.device_get(nn.meta.unbox(params)))
    assert "input_coordinates" not in unet.config.to_diffusers_config()


def test_grid_positions_closed_form_and_zero_gains_keep_the_function():
    """grid_positions: sin/cos of x then of y at frequencies pi ... pi * side / 2; attention_positions with its
    gains at 0 (as initialised) is the plain U-Net, and the gains reach the attention inputs once nonzero."""
    from jaxdiff.models.layers import grid_positions

    pos = np.asarray(grid_positions(4, 6, 8)).reshape(4, 6, 8)
    x, y = np.linspace(0, 1, 6), np.linspace(0, 1, 4)
    fx, fy = np.pi * np.array([1.0, 3.0]), np.pi * np.array([1.0, 2.0])
    np.testing.assert_allclose(pos[2, :, :2], np.sin(x[:, None] * fx), atol=1e-6)
    np.testing.assert_allclose(pos[2, :, 2:4], np.cos(x[:, None] * fx), atol=1e-6)
    np.testing.assert_allclose(pos[:, 5, 4:6], np.sin(y[:, None] * fy), atol=1e-6)
    np.testing.assert_allclose(pos[:, 5, 6:], np.cos(y[:, None] * fy), atol=1e-6)

    unet, params, io = load("unet_sd1")
    placed = unet.clone(config=dataclasses.replace(unet.config, attention_positions=True))
    fresh = jax.device_get(nn.meta.unbox(placed.init(jax.random.key(0), io["x"], io["t"], io["context"])["params"]))
    gains = {k: v for k, v in jax.tree_util.tree_flatten_with_path(fresh)[0] if "pos_embed" in jax.tree_util.keystr(k)}
    blocks = {jax.tree_util.keystr(k[:k.index(next(p for p in k if "transformer_blocks" in str(p))) + 1])
              for k, _ in jax.tree_util.tree_flatten_with_path(fresh)[0] if "transformer_blocks" in jax.tree_util.keystr(k)}
    assert len(gains) == 2 * len(blocks) > 0 and not any(np.any(v) for v in gains.values())   # attn1, attn2 each
    from jaxdiff.training.recipes.diffusion import grafted
    start = grafted(fresh, jax.device_get(params))
    np.testing.assert_allclose(placed.apply({"params": start}, io["x"], io["t"], io["context"]),
                               run(unet, params, io), atol=1e-5)
    moved = jax.tree_util.tree_map_with_path(lambda k, v: v + 0.5 if "pos_embed" in jax.tree_util.keystr(k) else v,
                                             start)
    assert rel_err(placed.apply({"params": moved}, io["x"], io["t"], io["context"]), run(unet, params, io)) > 1e-3
    from jaxdiff.training.recipes.diffusion import pruned   # grafted's inverse: the gains dropped, all else kept
    jax.tree.map(np.testing.assert_array_equal, pruned(unet, moved), jax.device_get(nn.meta.unbox(params)))
