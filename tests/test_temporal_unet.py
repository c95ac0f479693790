"""TemporalUNet against diffusers' UNet3DConditionModel (golden files), inflation of an image
U-Net (per-frame equality), the image-to-video conditioning input, frame position embeddings,
conversion round trips and config errors."""
import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxdiff as jd
from jaxdiff.convert.common import CheckpointError
from jaxdiff.models import TemporalUNet, TemporalUNetConfig, UNetConfig, frame_conditioning, inflate
from jaxdiff.models.layers import Attention
from jaxdiff.models.temporal_unet import TemporalTransformer, frame_position_embedding, inflated_config

FIXTURES = Path(__file__).parent / "fixtures"
VIDEO = FIXTURES / "diffusers_video"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.cache
def load(name):
    unet, params = jd.convert.from_diffusers(str(VIDEO / name))
    return unet, params, dict(np.load(VIDEO / name / "io.npz"))


@pytest.mark.parametrize("name", ["unet3d_small", "unet3d_i2v"])
def test_matches_diffusers(name):
    # unet3d_i2v goes through the conditioning path: x holds the noisy latents, cond the first
    # frame's latent; diffusers saw the input the fixture script built with NumPy.
    unet, params, io = load(name)
    cond = {"cond_frames": io["cond"]} if "cond" in io else {}
    out = jax.jit(unet.apply)({"params": params}, io["x"], io["t"], io["context"], **cond)
    assert out.shape == io["sample"].shape and out.dtype == jnp.float32
    err = rel_err(out, io["sample"])
    print(f"{name}: relative error vs diffusers {err:.2e}")
    assert err <= 1e-5


def test_frame_conditioning_layout():
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    got = np.asarray(frame_conditioning(jnp.asarray(latent), 4, 5, present=jnp.array([1.0, 0.0])))
    assert got.shape == (2, 4, 3, 5, 5)
    np.testing.assert_array_equal(got[0, :, ..., :4], np.broadcast_to(latent[0], (4, 3, 5, 4)))
    np.testing.assert_array_equal(got[0, :, ..., 4], np.eye(4)[0][:, None, None] * np.ones((4, 3, 5)))
    np.testing.assert_array_equal(got[1], 0.0)   # dropped image: all zeros, as with no image at all
    np.testing.assert_array_equal(frame_conditioning(None, 4, 5, batch=2, height=3, width=5), 0.0)
    with pytest.raises(ValueError, match="cond_frames has 4 channels; .* needs 2"):
        frame_conditioning(jnp.asarray(latent), 4, 3)


def test_inflated_image_unet_equals_it_per_frame():
    # SD 1.x layout (pipeline_sd's U-Net): 1x1-conv transformer projections (become linear), per-block
    # head widths; with image-to-video input channels (zero weights at inflation) and a conditioning frame.
    sd = FIXTURES / "pipeline_sd" / "unet"
    image_unet, image_params = jd.convert.from_diffusers(str(sd))
    video, params = inflate(image_unet, image_params, jax.random.key(1), conditioning_frame_channels=5)
    b, frames = 2, 3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, frames, 8, 8, 4)).astype(np.float32)
    io = {"t": np.array([3, 901]), "context": rng.standard_normal((b, 5, 32)).astype(np.float32)}
    flat = jnp.asarray(x.reshape(b * frames, 8, 8, 4))
    per_frame = jax.jit(image_unet.apply)({"params": image_params}, flat, jnp.repeat(io["t"], frames),
                                          jnp.repeat(io["context"], frames, axis=0)).reshape(b, frames, 8, 8, 4)
    apply = jax.jit(video.apply)
    out = apply({"params": params}, x, io["t"], io["context"], cond_frames=x[:, 0])
    err = float(jnp.max(jnp.abs(out - per_frame)) / jnp.max(jnp.abs(per_frame)))
    print(f"inflated: max |video - image per frame| / max |image| = {err:.1e}")
    assert err <= 1e-6
    # The temporal layers are live: once their zero-initialised output layers are perturbed, a change
    # in one frame reaches the others.
    flat_params = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(2), len(flat_params))
    perturbed = traverse_util.unflatten_dict({
        p: v + 0.05 * jax.random.normal(k, v.shape) if p[-2] in ("conv4_3", "proj_out") else v
        for k, (p, v) in zip(keys, flat_params.items())})
    a = apply({"params": perturbed}, x, io["t"], io["context"], cond_frames=x[:, 0])
    bumped = x.copy()
    bumped[:, 0] += 1.0
    c = apply({"params": perturbed}, bumped, io["t"], io["context"], cond_frames=x[:, 0])
    assert float(jnp.max(jnp.abs(a[:, 1:] - c[:, 1:]))) > 1e-3


def test_inflate_refuses_image_unets_it_cannot_express():
    image_unet, image_params = jd.convert.from_diffusers(str(FIXTURES / "diffusers" / "unet_class_inpaint"))
    with pytest.raises(ValueError, match=r"num_class_embeds=10 .*mid_block_type='UNetMidBlock2D'"):
        inflate(image_unet, image_params)
    cfg = inflated_config(UNetConfig(block_out_channels=(64, 128), num_attention_heads=4, norm_num_groups=16,
                                     down_block_types=("CrossAttnDownBlock2D",) * 2,
                                     up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1,
                                     cross_attention_dim=128), frame_position_embedding="sinusoidal")
    assert cfg.num_attention_heads == (4, 4) and cfg.down_block_types == ("CrossAttnDownBlock3D",) * 2
    with pytest.raises(ValueError, match=r"head widths \[16, 32\] per block.*frame_position_embedding"):
        cfg.to_diffusers_config()
    # Asked to, the export writes those settings as extra fields, and they load back exactly.
    written = cfg.to_diffusers_config(jaxdiff_fields=True)
    assert written["num_attention_heads"] == [4, 4] and written["frame_position_embedding"] == "sinusoidal"
    assert TemporalUNetConfig.from_diffusers_config(written) == cfg


def test_temporal_attention_sees_frame_order_only_with_position_embedding():
    # Without positions, self-attention across frames is permutation-equivariant in the frames.
    x = jax.random.normal(jax.random.key(0), (2 * 4, 2, 2, 8))
    perm = jnp.array([2, 0, 3, 1])
    permute = lambda y: y.reshape(2, 4, 2, 2, 8)[:, perm].reshape(8, 2, 2, 8)
    for pos, equivariant in ((None, True), ("sinusoidal", False)):
        layer = TemporalTransformer(heads=2, head_dim=4, groups=2, frame_position_embedding=pos)
        params = jax.tree.map(lambda v: v + 0.1, nn.meta.unbox(
            layer.init(jax.random.key(1), x, 4)["params"]))   # non-zero proj_out
        gap = float(jnp.max(jnp.abs(layer.apply({"params": params}, permute(x), 4)
                                    - permute(layer.apply({"params": params}, x, 4)))))
        assert (gap < 1e-5) == equivariant, (pos, gap)
    pe = np.asarray(frame_position_embedding(3, 6))
    np.testing.assert_allclose(pe[2, 2], np.sin(2 * 10000 ** (-2 / 6)), rtol=1e-6)
    np.testing.assert_allclose(pe[2, 5], np.cos(2 * 10000 ** (-4 / 6)), rtol=1e-6)


def test_attention_shares_a_context_across_each_group_of_queries():
    """A context [G, S, D] for B = G*k query sequences (a video's caption for its frames): the same as one copy
    of it per sequence."""
    attention = Attention(heads=2, head_dim=4, out_features=8)
    captions = jax.random.normal(jax.random.key(1), (2, 3, 6))
    q = jax.random.normal(jax.random.key(3), (6, 4, 8))
    attention_params = attention.init(jax.random.key(4), q, captions)
    np.testing.assert_allclose(attention.apply(attention_params, q, captions),
                               attention.apply(attention_params, q, jnp.repeat(captions, 3, axis=0)), atol=1e-6)
    with pytest.raises(ValueError, match="a context of 2 entries for 5 query sequences"):
        attention.apply(attention_params, q[:5], captions)


def test_export_round_trip(tmp_path):
    unet, params, io = load("unet3d_i2v")
    jd.convert.to_diffusers(unet, params, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "UNet3DConditionModel" and saved["conditioning_frame_channels"] == 5
    again, params2 = jd.convert.from_diffusers(str(tmp_path))
    assert again.config == unet.config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_diffusers_loads_our_export(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    unet, params, io = load("unet3d_small")
    jd.convert.to_diffusers(unet, params, str(tmp_path))
    model = diffusers.UNet3DConditionModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(io["x"].transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(io["t"]),
                    torch.from_numpy(io["context"])).sample.numpy().transpose(0, 2, 3, 4, 1)
    np.testing.assert_array_equal(out, io["sample"])


def test_config_errors():
    base = json.loads((VIDEO / "unet3d_small" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="time_cond_proj_dim=8 is not supported"):
        TemporalUNetConfig.from_diffusers_config({**base, "time_cond_proj_dim": 8})
    with pytest.raises(CheckpointError, match=r"attention_head_dim=\[4, 8\]: .* only one int"):
        TemporalUNetConfig.from_diffusers_config({**base, "attention_head_dim": [4, 8]})
    with pytest.raises(CheckpointError, match="field use_linear_projection=True is unknown"):
        TemporalUNetConfig.from_diffusers_config({**base, "use_linear_projection": True})
    with pytest.raises(CheckpointError, match="unsupported block type 'CrossAttnDownBlock2D'"):
        TemporalUNetConfig.from_diffusers_config({**base, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock3D"]})
    with pytest.raises(ValueError, match=r"block channels \[8\] not divisible by attention_head_dim=16"):
        TemporalUNetConfig(block_out_channels=(8, 16), down_block_types=("DownBlock3D",) * 2,
                           up_block_types=("UpBlock3D",) * 2, attention_head_dim=16, norm_num_groups=4)
    with pytest.raises(ValueError, match="conditioning_frame_channels=4: need 0"):
        TemporalUNetConfig(in_channels=4, conditioning_frame_channels=4)
    with pytest.raises(ValueError, match="frame_position_embedding='learned'"):
        TemporalUNetConfig(frame_position_embedding="learned")
    cfg = TemporalUNetConfig.from_diffusers_config(base)
    assert cfg.num_attention_heads == (2, 4) and cfg.to_diffusers_config()["attention_head_dim"] == 4
    assert cfg.to_diffusers_config(jaxdiff_fields=True) == cfg.to_diffusers_config()   # nothing diffusers lacks
    unet = TemporalUNet(cfg)
    x = jnp.zeros((1, 2, 8, 8, 4))
    with pytest.raises(ValueError, match="must be \\[B, T, H, W, C\\]"):
        jax.eval_shape(lambda: unet.init(jax.random.key(0), x[0], jnp.zeros(1), jnp.zeros((1, 1, 12))))
    with pytest.raises(ValueError, match="conditioning_frame_channels=0: it takes no cond_frames"):
        jax.eval_shape(lambda: unet.init(jax.random.key(0), x, jnp.zeros(1), jnp.zeros((1, 1, 12)),
                                         cond_frames=x[:, 0]))
    with pytest.raises(ValueError, match="pass context"):
        jax.eval_shape(lambda: unet.init(jax.random.key(0), x, jnp.zeros(1), None))
    with pytest.raises(ValueError, match="multiples of 2"):
        jax.eval_shape(lambda: unet.init(jax.random.key(0), x[:, :, :7], jnp.zeros(1), jnp.zeros((1, 1, 12))))
