"""img2img, inpainting, outpainting and inversion editing on the tiny diffusers SD folder."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxdiff as jd
from jaxdiff.pipelines import editing

MODEL = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline_sd")
IMG = np.asarray(jax.random.uniform(jax.random.key(0), (2, 16, 16, 3)))
MASK = np.zeros((2, 16, 16), np.float32)
MASK[:, :, :8] = 1.0  # repaint the left half


@pytest.fixture(scope="module")
def pipe():
    return jd.pipelines.TextToImage.from_pretrained(MODEL)


def roundtrip(pipe, images):
    return pipe.decode(pipe.vae_params, pipe.encode_image(pipe.vae_params, jnp.asarray(images)))


def test_img2img_strength_zero_returns_the_vae_round_trip(pipe):
    out = editing.img2img(pipe, ["a red circle", "a blue square"], IMG, strength=0.0, steps=5)
    np.testing.assert_allclose(out, roundtrip(pipe, IMG), atol=1e-5)
    changed = editing.img2img(pipe, ["a red circle", "a blue square"], IMG, strength=0.8, steps=5)
    assert float(jnp.abs(changed - out).mean()) > 0.01


def test_inpaint_blend_keeps_known_latents_and_pixels(pipe):
    init = pipe.encode_image(pipe.vae_params, jnp.asarray(IMG))
    lmask = editing.latent_mask(editing.as_masks(MASK, jnp.asarray(IMG)), pipe.vae_scale_factor)
    out = pipe.generate(["a", "b"], init_latents=init, latent_mask=lmask, inpaint="blend", steps=6)
    keep = np.asarray(lmask[..., 0]) == 0
    np.testing.assert_array_equal(np.asarray(out["latents"])[keep], np.asarray(init)[keep])
    assert float(jnp.abs(out["latents"] - init)[np.asarray(lmask[..., 0]) == 1].mean()) > 0.01
    pasted = editing.inpaint(pipe, ["a", "b"], IMG, MASK, paste_back=True, steps=6)
    np.testing.assert_array_equal(np.asarray(pasted)[:, :, 8:], IMG[:, :, 8:].astype(np.float32))


def test_outpaint_keeps_the_original_region(pipe):
    out = editing.outpaint(pipe, ["a", "b"], IMG, margins=(4, 4, 4, 0), steps=4)
    assert out.shape == (2, 24, 20, 3)
    np.testing.assert_array_equal(np.asarray(out)[:, 4:20, 0:16], IMG.astype(np.float32))
    with pytest.raises(ValueError, match="margins must be 4 non-negative"):
        editing.outpaint(pipe, ["a", "b"], IMG, margins=(1, 2))


def test_nine_channel_unet_sees_the_masked_image(pipe):
    """A 9-channel inpainting U-Net takes [x_t | mask | masked-image latents]: the known region steers it."""
    cfg = jd.models.UNetConfig(**{**pipe.denoiser.config.__dict__, "in_channels": 9})
    unet = jd.models.UNet2DCondition(cfg)
    shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 9)), jnp.zeros((1,)),
                                              jnp.zeros((1, 77, 32))))["params"]
    flat = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda s: s, shapes, is_leaf=lambda x: hasattr(x, "shape")))
    keys = jax.random.split(jax.random.key(1), len(flat))
    params = traverse_util.unflatten_dict({p: 0.05 * jax.random.normal(k, getattr(s, "value", s).shape)
                                           for k, (p, s) in zip(keys, flat.items())})
    params = jax.tree_util.tree_map(lambda x: x, params)
    inp = jd.pipelines.TextToImage(unet, params, pipe.vae, pipe.vae_params, pipe.text_encoder, pipe.text_params,
                                   pipe.tokenizer, pipe.schedule, pipe.sampler_defaults)
    def final_latents(images):
        images = jnp.asarray(images)
        masks = editing.as_masks(MASK, images)
        known = inp.encode_image(inp.vae_params, images * (1.0 - masks))
        return inp.generate(["a", "b"], init_latents=known, latent_mask=editing.latent_mask(masks, 2),
                            inpaint="channels", steps=3, seed=3)["latents"]

    other = IMG.copy()
    other[:, :, 8:] = 1.0 - other[:, :, 8:]  # change only the known half
    a, b = final_latents(IMG), final_latents(other)
    np.testing.assert_array_equal(a, final_latents(IMG))  # deterministic for the same input...
    assert float(jnp.abs(a - b)[:, :, :4].mean()) > 1e-5  # ...and the repainted half depends on the known half
    assert editing.inpaint(inp, ["a", "b"], IMG, MASK, steps=3).shape == IMG.shape
    with pytest.raises(ValueError, match="inpaint='channels' only with 9-channel"):
        pipe.generate(["a"], init_latents=jnp.zeros((1, 8, 8, 4)), latent_mask=jnp.zeros((1, 8, 8, 1)),
                      inpaint="channels")


def test_edit_is_inversion_then_ddim(pipe):
    x_t = editing.invert(pipe, ["a red circle"] * 2, IMG, steps=6)
    ctx = pipe.encode_text(pipe.text_params, pipe.tokenize(["a red circle"] * 2))
    fn = lambda x, t: pipe.denoiser.apply({"params": pipe.denoiser_params}, x, t, ctx)
    kw = {k: pipe.sampler_defaults[k] for k in ("prediction_type", "timestep_spacing", "steps_offset",
                                                  "set_alpha_to_one")}
    ref = jd.samplers.ddim_invert(fn, pipe.schedule, pipe.encode_image(pipe.vae_params, jnp.asarray(IMG)), steps=6, **kw)
    np.testing.assert_allclose(x_t, ref, rtol=1e-4, atol=1e-5)
    edited = editing.edit(pipe, ["a red circle"] * 2, IMG, ["a blue circle"] * 2, steps=6,
                          guidance_scale=2.0)
    direct = pipe.generate(["a blue circle"] * 2, noise=x_t, steps=6, guidance_scale=2.0, method="ddim")["images"]
    np.testing.assert_allclose(edited, direct, atol=1e-5)
    # the inversion program is compiled once, in the pipeline's own program cache
    [inversion] = [p for k, p in pipe.runner.programs.items() if k[0] == "invert"]
    np.testing.assert_array_equal(editing.invert(pipe, ["a blue circle"] * 2, IMG, steps=6),
                                  editing.invert(pipe, ["a blue circle"] * 2, IMG, steps=6))
    assert inversion.cache_size() == 1


def test_editing_needs_a_text_to_image_pipeline(pipe):
    """A TextToVideo is not a TextToImage: every editing function says so in one line."""
    from scripts.sharded_generate import video_pipe

    video = video_pipe(jd.convert.load_pipeline(MODEL))
    assert not isinstance(video, jd.pipelines.TextToImage)
    calls = {"img2img": lambda: editing.img2img(video, ["a"], IMG[:1]),
             "inpaint": lambda: editing.inpaint(video, ["a"], IMG[:1], MASK[:1]),
             "outpaint": lambda: editing.outpaint(video, ["a"], IMG[:1], (4, 0, 0, 0)),
             "invert": lambda: editing.invert(video, ["a"], IMG[:1]),
             "edit": lambda: editing.edit(video, ["a"], IMG[:1], ["b"])}
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"^{name} edits images with a TextToImage pipeline, got a TextToVideo$"):
            call()


def test_bad_images_and_masks(pipe):
    with pytest.raises(ValueError, match="must be RGB"):
        editing.img2img(pipe, ["a"], np.zeros((1, 16, 16, 4)))
    with pytest.raises(ValueError, match="uint8 or floats in \\[0, 1\\]"):
        editing.img2img(pipe, ["a"], np.full((1, 16, 16, 3), 2.0))
    with pytest.raises(ValueError, match="does not match the images"):
        editing.inpaint(pipe, ["a", "b"], IMG, np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="strength must be in \\[0, 1\\]"):
        editing.img2img(pipe, ["a", "b"], IMG, strength=1.5)
