"""jaxdiff.training.export: a trained run -> a diffusers pipeline folder."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxdiff.pipelines import TextToImage
from jaxdiff.training import evaluate, export, load_params
from jaxdiff.training.data import data_spec


def test_export_loads_back_with_the_run_weights(runs, tmp_path):
    out = str(tmp_path / "model")
    export.export_text_to_image(runs["ld"], out)
    pipe = TextToImage.from_pretrained(out)
    c = evaluate.read_run_config(runs["ld"])
    spec = data_spec(c.data)
    # The U-Net, VAE and text encoder carry the runs' EMA weights; the tokenizer the run's ids.
    unet_ema, vae_ema = load_params(runs["ld"], "ema"), load_params(runs["vae"], "ema")["vae"]
    for got, want in ((pipe.denoiser_params, unet_ema), (pipe.vae_params, vae_ema),
                      (pipe.text_params, load_params(runs["clip"], "ema")["text_model"])):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
    prompts = ["a red circle", "two blue squares above"]
    np.testing.assert_array_equal(pipe.tokenize(prompts), spec.tokenize(prompts))
    assert pipe.vae.config.scaling_factor == 0.5
    assert pipe.schedule.kind == "discrete" and pipe.sampler_defaults["method"] == "dpmpp_2m"
    images = pipe.generate(["a red circle"], steps=2, seed=0)["images"]
    assert np.asarray(images).shape == (1, 16, 16, 3)
    info = json.load(open(os.path.join(out, "training.json")))
    assert {k: v["step"] for k, v in info.items()} == {"diffusion": 2, "vae": 2, "clip": 2}
    assert info["diffusion"]["weights"] == "ema"
    assert os.path.isfile(os.path.join(out, "clip", "model.safetensors"))
    # every weights file's sha256, which from_pretrained above verified
    assert sorted(json.load(open(os.path.join(out, "checksums.json")))["sha256"]) == [
        "clip/model.safetensors", "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"]
    # --weights params: the trained parameters instead of their EMA, and recorded so
    raw = str(tmp_path / "raw")
    assert export.main(["--workdir", runs["ld"], "--out", raw, "--weights", "params"]) == 0
    trained = load_params(runs["ld"], "params")
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(unet_ema)))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(TextToImage.from_pretrained(raw).denoiser_params), trained)
    assert json.load(open(os.path.join(raw, "training.json")))["diffusion"]["weights"] == "params"
    with pytest.raises(ValueError, match="weights='best': choose one of: ema, params"):
        export.export_text_to_image(runs["ld"], str(tmp_path / "best"), weights="best")


def test_export_never_clobbers(runs, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export.main(["--workdir", runs["ld"], "--out", str(out)]) == 1
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not a latent text-to-image"):
        export.export_text_to_image(runs["vae"], str(tmp_path / "other"))
    assert export.main(["--workdir", runs["ld"], "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model_index.json").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".export")] == []


def _tiny_mmdit_run(runs, variant: str, steps: int, tmp_path):
    """(config, workdir) of configs/mmdit.py:`variant` trained `steps` steps on the tiny CLIP and VAE runs."""
    from configs import mmdit as mmdit_config
    from jaxdiff.training import train

    c = mmdit_config.get_config(variant)
    ld = evaluate.read_run_config(runs["ld"])
    c.data, c.model.vae, c.model.text_encoder = ld.data, ld.model.vae, ld.model.text_encoder
    c.model.mmdit.sample_size = 8
    c.steps, c.checkpoint_every, c.sample_every = steps, 0, 0
    workdir = str(tmp_path / "run")
    train(c, workdir)
    return c, workdir


@pytest.fixture(scope="module")
def t5_run(runs, tmp_path_factory):
    """(config, workdir) of configs/mmdit.py:tiny_t5 trained 3 steps: from the zero-initialised output layer and
    gates, the third update opens the path to the text."""
    return _tiny_mmdit_run(runs, "tiny_t5", 3, tmp_path_factory.mktemp("t5_run"))


def test_mmdit_run_exports_and_samples_as_its_own_transformer(runs, tmp_path):
    """A flow-matching MMDiT run (configs/mmdit.py:tiny on the tiny CLIP and VAE runs) exports transformer/ (an
    SD3Transformer2DModel) with a FlowMatchEulerDiscreteScheduler; TextToImage loads it, and its guided flow-Euler
    sampling equals the sampler driven by hand with the run's EMA transformer on CLIP's states and pooled state."""
    from jaxdiff import guidance, samplers
    from jaxdiff.models import SD3Transformer2D

    _, workdir = _tiny_mmdit_run(runs, "tiny", 2, tmp_path)
    out = export.export_text_to_image(workdir, str(tmp_path / "model"))
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"] and "unet" not in index
    scheduler = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"

    pipe = TextToImage.from_pretrained(out)
    assert isinstance(pipe.denoiser, SD3Transformer2D) and pipe.size_multiple == 4
    ema = load_params(workdir, "ema")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.denoiser_params), ema)
    prompts = ["a red circle", "two blue squares"]
    got = pipe.generate(prompts, steps=4, guidance_scale=3.0, seed=1)["latents"]

    ids, empty = pipe.tokenize(prompts), pipe.tokenize(["", ""])
    encode = lambda ids: pipe.text_encoder.apply({"params": pipe.text_params}, ids)[:2]
    apply_fn = lambda x, t, ctx: pipe.denoiser.apply({"params": ema}, x, t, *ctx)
    model_fn = guidance.cfg(apply_fn, encode(ids), encode(empty), 3.0)
    noise = jax.random.normal(jax.random.key(1), got.shape)
    want = samplers.sample(model_fn, pipe.schedule, noise, key=jax.random.key(2), method="flow_euler", steps=4,
                           prediction_type="flow")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # --dtype bfloat16 halves the transformer's file; it loads back as exactly the bfloat16-rounded EMA
    half = export.export_run(workdir, str(tmp_path / "model_bf16"), dtype="bfloat16")
    weights = os.path.join("transformer", "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in load_file(os.path.join(half, weights)).values()} == {np.dtype(jnp.bfloat16)}
    assert json.load(open(os.path.join(half, "training.json")))["diffusion"]["stored_dtype"] == "bfloat16"
    rounded = jax.tree.map(lambda p: np.asarray(jnp.asarray(p, jnp.bfloat16), np.float32), ema)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(TextToImage.from_pretrained(half).denoiser_params),
                 rounded)
    with pytest.raises(ValueError, match="dtype='float16'; choose one of: float32, bfloat16"):
        export.export_run(workdir, str(tmp_path / "bad"), dtype="float16")


def test_mmdit_with_a_trained_t5_exports_text_encoder_2(runs, t5_run, tmp_path):
    """configs/mmdit.py:tiny_t5 trains a T5 encoder beside the MMDiT (the loss's gradient reaches it; the CLIP stays
    frozen); the export adds text_encoder_2/ (T5EncoderModel) and tokenizer_2/, and the loaded folder's text
    conditioning (T5's states, CLIP's pooled state) equals the recipe's on the run's EMA weights."""
    from flax import linen as nn

    from jaxdiff.models.t5 import T5EncoderModel
    from jaxdiff.models.text_encoders import FluxTextEncoders
    from jaxdiff.training.recipes.diffusion import Diffusion

    c, workdir = t5_run
    d = Diffusion(c, data_spec(c.data))
    frozen = jax.tree.map(jnp.asarray, nn.meta.unbox(d.frozen))
    params = jax.tree.map(jnp.asarray, load_params(workdir, "params"))
    assert set(params) == {"denoiser", "t5"}
    batch = {"image": jnp.zeros((2, 16, 16, 3)), "tokens": jnp.asarray(d.spec.tokenize(["a red circle"] * 2))}
    grads = jax.grad(lambda p: d.loss(p, frozen, batch, jax.random.key(1), 0)[0])(params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["t5"]))
    out = export.export_text_to_image(workdir, str(tmp_path / "model"))
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer_2"] == ["jaxdiff", "WordTokenizer"]
    pipe = TextToImage.from_pretrained(out)
    assert isinstance(pipe.text_encoder, FluxTextEncoders) and isinstance(pipe.text_encoder.text_encoder_2,
                                                                          T5EncoderModel)
    ema = load_params(workdir, "ema")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.denoiser_params), ema["denoiser"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.text_params["text_encoder_2"]), ema["t5"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.text_params["text_encoder"]),
                 load_params(runs["clip"], "ema")["text_model"])
    prompts = ["a red circle to the left of a blue square", "a blue square to the left of a red circle"]
    ids = pipe.tokenize(prompts)
    got = pipe.text_encoder.apply({"params": pipe.text_params}, ids)
    want = d.encode_text(ema, frozen, jnp.asarray(d.spec.tokenize(prompts)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # the bidirectional T5 states of the first object differ with the words after it (the causal CLIP's cannot)
    assert float(jnp.abs(got[0][0, 1:4] - got[0][1, 1:4]).max()) > 1e-3
    assert pipe.generate(prompts[:1], steps=2, seed=0)["images"].shape == (1, 16, 16, 3)


def test_layout_fine_tune_of_an_mmdit_folder(t5_run, tmp_path):
    """configs/mmdit.py:layout's route on the tiny runs: a T5 MMDiT folder is the start (init_from) of a run on
    layout maps (config.data.layout). Its init is the folder's transformer and T5 with the patch embedding widened
    by zero rows for the map's channels (so it computes what the folder did, whatever the map); the loss reaches
    those rows; the export (with a tiny configs/layout.py run as its layout/) reads 4 + LAYOUT_CHANNELS channels,
    its layout model is the layout run's, and TextToImage with `layouts` samples as the sampler driven by hand
    with the map, pooled to the latent grid, appended to x_t in both guidance halves."""
    from flax import linen as nn

    from configs import layout as layout_config
    from jaxdiff import guidance, samplers
    from jaxdiff.data import render
    from jaxdiff.data.layout import LAYOUT_CHANNELS, as_objects, downsampled, layout_map
    from jaxdiff.models.layout import sample_layouts
    from jaxdiff.training import train
    from jaxdiff.training.recipes.diffusion import Diffusion

    c, workdir = t5_run
    c = c.copy_and_resolve_references()
    source = export.export_text_to_image(workdir, str(tmp_path / "source"))
    c.data.layout, c.model.init_from, c.steps = True, source, 2
    d = Diffusion(c, data_spec(c.data))
    params = nn.meta.unbox(d.init(jax.random.key(0)))
    ema = load_params(workdir, "ema")
    jax.tree.map(np.testing.assert_array_equal, params["t5"], ema["t5"])
    kernel = params["denoiser"]["pos_embed"]["proj"]["kernel"]
    assert kernel.shape[-2] == 4 + LAYOUT_CHANNELS and not np.asarray(kernel[..., 4:, :]).any()
    np.testing.assert_array_equal(kernel[..., :4, :], ema["denoiser"]["pos_embed"]["proj"]["kernel"])
    frozen = jax.tree.map(jnp.asarray, nn.meta.unbox(d.frozen))
    objects = [render.SceneObject("circle", "red", "large", 0.3, 0.5)]
    batch = {"image": jnp.zeros((2, 16, 16, 3)), "tokens": jnp.asarray(d.spec.tokenize(["a red circle"] * 2)),
             "layout": jnp.asarray(np.stack([layout_map(objects, 16)] * 2))}
    ctx = d.encode_text(params, frozen, batch["tokens"])
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    np.testing.assert_allclose(d.apply(params, x, jnp.full((2,), 500.0), ctx, layout=downsampled(batch["layout"], 2)),
                               TextToImage.from_pretrained(source).denoiser.apply(
                                   {"params": ema["denoiser"]}, x, jnp.full((2,), 500.0), *ctx), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda p: d.loss(p, frozen, batch, jax.random.key(2), 0)[0])(params)
    assert float(jnp.abs(grads["denoiser"]["pos_embed"]["proj"]["kernel"][..., 4:, :]).max()) > 0

    train(c, str(tmp_path / "layout_run"))
    train(layout_config.get_config("tiny"), str(tmp_path / "caption_to_layout"))
    with pytest.raises(ValueError, match="reads layout maps .*: pass the caption -> layout run to carry"):
        export.export_run(str(tmp_path / "layout_run"), str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="reads no layout map, so its folder takes no layout model"):
        export.export_run(workdir, str(tmp_path / "bad"), layout=str(tmp_path / "caption_to_layout"))
    out = export.export_run(str(tmp_path / "layout_run"), str(tmp_path / "layout_model"),
                            layout=str(tmp_path / "caption_to_layout"))
    records = json.load(open(os.path.join(out, "training.json")))
    record = records["diffusion"]
    assert record["init_from"]["step"] == 3 and not os.path.isabs(record["config"]["model"]["init_from"])
    assert records["layout"]["step"] == 20 and records["layout"]["config"]["recipe"] == "layout"
    assert json.load(open(os.path.join(out, "model_index.json")))["layout"] == ["jaxdiff", "LayoutTransformer"]
    pipe = TextToImage.from_pretrained(out)
    # the folder's layout model is the layout run's EMA model, and draws what sampling it by hand draws
    layout_ema = load_params(str(tmp_path / "caption_to_layout"), "ema")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.layout_model.params), layout_ema)
    captions = ["a red circle to the left of a blue square", "three green triangles"]
    assert pipe.layout_model.draw(captions, seed=4) == sample_layouts(
        pipe.layout_model.module, layout_ema, np.asarray(d.spec.tokenize(captions)), jax.random.key(4))
    assert pipe.generate(captions, steps=1, seed=4)["images"].shape == (2, 16, 16, 3)
    assert pipe.denoiser.config.in_channels == 4 + LAYOUT_CHANNELS and pipe.layout_channels == LAYOUT_CHANNELS
    prompts = ["a red circle to the left of a blue square"]
    layouts = [[{"shape": "circle", "colour": "red", "size": "large", "x": 0.25, "y": 0.5},
                render.SceneObject("square", "blue", "small", 0.75, 0.5)]]
    got = pipe.generate(prompts, layouts=layouts, steps=3, guidance_scale=3.0, seed=1)["latents"]
    ema = load_params(str(tmp_path / "layout_run"), "ema")
    maps = jnp.asarray(downsampled(layout_map(as_objects(layouts[0]), 16)[None], 2))
    encode = lambda ids: pipe.text_encoder.apply({"params": pipe.text_params}, ids)
    apply_fn = lambda x, t, ctx: pipe.denoiser.apply({"params": ema["denoiser"]}, jnp.concatenate(
        [x, jnp.concatenate([maps, maps])], -1), t, *ctx)
    model_fn = guidance.cfg(apply_fn, encode(pipe.tokenize(prompts)), encode(pipe.tokenize([""])), 3.0)
    want = samplers.sample(model_fn, pipe.schedule, jax.random.normal(jax.random.key(1), got.shape),
                           key=jax.random.key(2), method="flow_euler", steps=3, prediction_type="flow")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for kwargs, message in ((dict(layouts=layouts * 2), "2 layouts for 1 prompts"),
                            (dict(layouts=[[{"shape": "star", "colour": "red", "size": "small", "x": 0.5, "y": 0.5}]]),
                             "layout object shape 'star': choose one of: circle, square, triangle")):
        with pytest.raises(ValueError, match=message):
            pipe.generate(prompts, steps=1, **kwargs)
    pipe.layout_model = None
    with pytest.raises(ValueError, match="its folder has no layout model to draw one: pass layouts="):
        pipe.generate(prompts, steps=1)
    with pytest.raises(ValueError, match="layouts were given, but this model reads no layout map"):
        TextToImage.from_pretrained(source).generate(prompts, layouts=layouts, steps=1)
