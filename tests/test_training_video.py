"""The video branch of the diffusion recipe (backbone temporal_unet): a tiny text/image-to-video run
from scratch on moving_shapes, and one inflated from a tiny latent text-to-image run, which before
training is that run's U-Net on every frame."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff.data  # noqa: F401  registers the builders
from configs import latent_diffusion as ld_config
from configs import video_diffusion as vd_config
from jaxdiff.models import inflate
from jaxdiff.training import load_params, recipes, train
from jaxdiff.training.data import data_spec
from jaxdiff.training.evaluate import read_run_config
from jaxdiff.training.metrics import image_grid
from jaxdiff.training.recipes.diffusion import image_unet
from tfds_fixtures import prepare_tfds

VIDEOS = vd_config.TINY_DATA          # 16px, 4 frames, 16/2/2 examples
IMAGES = "shapes/16px-16-2-2-seed0"   # the same caption vocabulary, for the text-to-image run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tfds(tmp_path_factory, VIDEOS, IMAGES)


def tiny(variant, data_dir, steps=2):
    c = vd_config.get_config(variant)
    c.data.data_dir = data_dir
    c.steps, c.checkpoint_every, c.sample_every = steps, 0, 0
    return c


@pytest.fixture(scope="module")
def image_run(data_dir, tmp_path_factory):
    """A tiny latent text-to-image run (2 steps) on 16px shapes, to inflate."""
    c = ld_config.get_config("tiny")
    c.data.update(source="shapes", name=IMAGES, data_dir=data_dir, image_size=16, max_length=16)
    c.steps, c.checkpoint_every, c.sample_every = 2, 0, 0
    workdir = str(tmp_path_factory.mktemp("ld"))
    train(c, workdir)
    return workdir


def test_tiny_video_run_trains_and_previews_frame_strips(data_dir, tmp_path):
    c = tiny("tiny", data_dir)
    result = train(c, str(tmp_path))
    assert len(result.losses) == 2 and np.all(np.isfinite(result.losses))
    # The preview the loop's grid writer gets (called here directly: the loop's sample_every path
    # draws its key with state.key(-1), which this jax refuses).
    task = recipes.build(c, data_spec(c.data))
    frozen = jax.tree.map(jnp.asarray, nn.meta.unbox(task.frozen))
    images = np.asarray(jax.jit(task.sample)(result.state.ema, frozen, jax.random.key(0)))
    # 2 preview videos of 4 frames of 16x16, each video's frames side by side
    assert images.shape == (2, 16, 4 * 16, 3)
    assert np.all(np.isfinite(images)) and images.min() >= 0 and images.max() <= 1
    assert image_grid(images).shape == (20, 134, 3)


def test_inflated_run_starts_as_the_image_unet_on_every_frame(data_dir, image_run, tmp_path):
    c = tiny("tiny_inflated", data_dir)
    c.model.init_from = image_run
    params = jax.device_get(train(c, str(tmp_path), stop_after=0).state.params)   # the state at step 0

    run = read_run_config(image_run)
    unet = image_unet(run.model, 4, 8, jnp.float32)
    ema = load_params(image_run, "ema")
    init_key = jax.random.split(jax.random.key(c.seed))[0]    # state.create's key for task.init
    video_unet, expected = inflate(unet, ema, init_key, **c.model.temporal.to_dict())
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (2, 4, 8, 8, 4))                  # [B, T, h, w, C] latent videos
    t = jnp.array([10.0, 700.0])
    ctx = jax.random.normal(k[1], (2, 16, 16))
    first = jax.random.normal(k[2], (2, 8, 8, 4))                 # conditioning frames: zero conv_in weights
    out = video_unet.apply({"params": params}, x, t, ctx, cond_frames=first)
    per_frame = unet.apply({"params": ema}, x.reshape(8, 8, 8, 4), jnp.repeat(t, 4), jnp.repeat(ctx, 4, axis=0))
    np.testing.assert_allclose(out, per_frame.reshape(out.shape), atol=1e-5)
    assert float(jnp.abs(per_frame).max()) > 0.1


def test_video_config_errors_are_named(data_dir, tmp_path):
    def build(c):
        return recipes.build(c, data_spec(c.data))

    c = tiny("tiny", data_dir)
    c.model.space = "pixel"
    with pytest.raises(ValueError, match=r"backbone='temporal_unet' trains in a VAE's latent space only: "
                                         r"config.model.space='pixel'"):
        build(c)
    c = tiny("tiny", data_dir)
    del c.model["text_encoder"]
    with pytest.raises(ValueError, match="needs config.model.text_encoder"):
        build(c)
    c = tiny("tiny", data_dir)
    c.model.init_from = str(tmp_path)
    with pytest.raises(ValueError, match="exactly one of config.model.temporal_unet .* got both"):
        build(c)
    c = tiny("tiny_inflated", data_dir)
    with pytest.raises(ValueError, match="got neither"):
        build(c)
    c.model.init_from = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build(c)
    c = vd_config.get_config("tiny")
    c.data = ld_config.get_config("tiny").data    # synthetic squares: images only
    with pytest.raises(ValueError, match="config.data.source='squares' has none"):
        build(c)
    c = ld_config.get_config("tiny")
    c.model.init_from = str(tmp_path)
    with pytest.raises(ValueError, match="is for backbone 'temporal_unet'.*not 'unet'"):
        build(c)


def test_video_recipe_refuses_image_batches(data_dir):
    """A shapes dataset of images under a temporal_unet: the loss names the data when traced."""
    c = tiny("tiny", data_dir)
    c.data.name, c.model.num_frames = IMAGES, 4
    task = recipes.build(c, data_spec(c.data))
    params = jax.eval_shape(task.init, jax.random.key(0))
    batch = {"image": jnp.zeros((2, 16, 16, 3)), "tokens": jnp.zeros((2, 16), jnp.int32)}
    with pytest.raises(ValueError, match=r"trains on videos \[B, T, H, W, 3\], but config.data "
                                         r"\(name='shapes/16px-16-2-2-seed0'\) gives images of shape \(2, 16, 16, 3\)"):
        jax.eval_shape(task.loss, params, task.frozen, batch, jax.random.key(0), 0)
