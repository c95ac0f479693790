"""Held-out evaluation of CLIP and VAE runs, and export of a latent text-to-image run (with the
VAE and CLIP runs it was trained on) as a pipeline folder that TextToImage and the CLI load."""
import dataclasses
import json
import os

import flax

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxdiff.data  # noqa: F401  registers the builders
from configs import clip as clip_config
from configs import latent_diffusion as ld_config
from configs import vae as vae_config
from jaxdiff.data import render
from jaxdiff.pipelines import TextToImage
from jaxdiff.training import evaluate, export, load_params, train
from jaxdiff.training.data import data_spec
from tfds_fixtures import prepare_tfds

SHAPES = "shapes/16px-32-4-8-seed0"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny CLIP and VAE runs on 16px shapes, and a latent diffusion run on top of both."""
    root = tmp_path_factory.mktemp("runs")
    data_dir = prepare_tfds(tmp_path_factory, SHAPES)

    def on_shapes(c, steps=2):
        c.data.update(source="shapes", name=SHAPES, data_dir=data_dir, image_size=16, max_length=16)
        c.steps, c.checkpoint_every, c.sample_every, c.eval_examples = steps, 0, 0, 8
        return c

    workdirs = {name: str(root / name) for name in ("clip", "vae", "ld")}
    train(on_shapes(clip_config.get_config("tiny")), workdirs["clip"])
    train(on_shapes(vae_config.get_config("tiny")), workdirs["vae"])
    c = on_shapes(ld_config.get_config("tiny"))
    c.model.vae.update(checkpoint=workdirs["vae"], scaling_factor=0.5)
    c.model.text_encoder.checkpoint = workdirs["clip"]
    train(c, workdirs["ld"])
    return {**workdirs, "data_dir": data_dir}


def test_test_set_is_the_prepared_test_split(runs):
    """The rendered held-out images and scenes are the tfds test split's records (stored shuffled)."""
    images, scenes = evaluate.shapes_test_set(16, 8)
    records = tfds.data_source(SHAPES, data_dir=runs["data_dir"], split="test")
    stored = sorted((r["caption"].decode(), np.asarray(r["image"]).tobytes()) for r in records)
    rendered = sorted((s.caption, np.round((x + 1) * 127.5).astype(np.uint8).tobytes()) for x, s in zip(images, scenes))
    assert rendered == stored
    _, singles = evaluate.shapes_test_set(16, 20, family="single")
    assert len(singles) == 5 and all(s.family == "single" and len(s.objects) == 1 for s in singles)
    with pytest.raises(ValueError, match="choose 1..1000"):
        evaluate.shapes_test_set(16, 1001)


def test_zero_shot_accuracy_counts_colour_and_shape_separately(monkeypatch):
    """With a classifier that always names the true colour and the next shape: colour 1, shape 0;
    with one that is always right: 1, 1."""
    from jaxdiff.models import clip as clip_module

    _, scenes = evaluate.shapes_test_set(16, 48, family="single")
    truth = np.array([evaluate.ZERO_SHOT_CLASSES.index((s.objects[0].colour, s.objects[0].shape)) for s in scenes])
    tokenize = lambda prompts: np.arange(len(prompts))[:, None].astype(np.int32)
    for shift, expected in ((0, (1.0, 1.0)), (1, (1.0, 0.0))):
        def oracle(model, params, pixels, class_ids):
            k = jnp.asarray(truth)
            shape_idx = (k % len(render.SHAPES) + shift) % len(render.SHAPES)
            return None, k - k % len(render.SHAPES) + shape_idx
        monkeypatch.setattr(clip_module, "zero_shot_classify", oracle)
        scores = evaluate.clip_zero_shot(None, None, tokenize, 16, examples=48, batch_size=12)
        assert (scores["zero_shot_colour"], scores["zero_shot_shape"]) == expected


def test_psnr_closed_form():
    x = jnp.zeros((2, 4, 4, 3))
    np.testing.assert_allclose(evaluate.psnr(x + 0.1, x), 10 * np.log10(4 / 0.01), rtol=1e-6)
    assert np.all(np.asarray(evaluate.psnr(x + 5.0, x)) == pytest.approx(10 * np.log10(4 / 1.0)))  # clipped to [-1, 1]


def test_vae_evaluation_matches_a_direct_computation(runs):
    """The run's held-out PSNR and latent std, recomputed by hand from its EMA weights."""
    from jaxdiff.models import AutoencoderKL, AutoencoderKLConfig
    from jaxdiff.training.evaluate import read_run_config

    scores = evaluate.evaluate_run(runs["vae"], examples=8)
    c = read_run_config(runs["vae"])
    vae = AutoencoderKL(AutoencoderKLConfig(**c.model.vae.to_dict()))
    params = load_params(runs["vae"], "ema")["vae"]
    images, _ = evaluate.shapes_test_set(16, 8)
    mean, _ = vae.apply({"params": params}, images, method=vae.encode)
    recon = np.clip(np.asarray(vae.apply({"params": params}, mean, method=vae.decode)), -1, 1)
    mse = np.mean((recon - images) ** 2, axis=(1, 2, 3))
    assert scores["psnr"] == pytest.approx(np.mean(10 * np.log10(4 / mse)), rel=1e-5)
    assert scores["latent_std"] == pytest.approx(np.std(np.asarray(mean)), rel=1e-5)
    logged = [json.loads(line) for line in open(os.path.join(runs["vae"], "metrics.jsonl"))]
    assert "eval_psnr" in logged[-1]  # the loop evaluated at the final step


def test_clip_evaluation_runs_and_diffusion_has_none(runs, capsys):
    scores = evaluate.evaluate_run(runs["clip"], examples=8)
    assert set(scores) == {"zero_shot_colour", "zero_shot_shape"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert evaluate.main(["--workdir", runs["ld"]]) == 1
    assert "no held-out evaluation" in capsys.readouterr().err
    assert evaluate.main(["--workdir", runs["ld"] + "/missing"]) == 1


def test_export_loads_back_with_the_run_weights(runs, tmp_path):
    out = str(tmp_path / "model")
    export.export_text_to_image(runs["ld"], out)
    pipe = TextToImage.from_pretrained(out)
    c = evaluate.read_run_config(runs["ld"])
    spec = data_spec(c.data)
    # The U-Net, VAE and text encoder carry the runs' EMA weights; the tokenizer the run's ids.
    unet_ema, vae_ema = load_params(runs["ld"], "ema"), load_params(runs["vae"], "ema")["vae"]
    for got, want in ((pipe.unet_params, unet_ema), (pipe.vae_params, vae_ema),
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
    # --weights params: the trained parameters instead of their EMA, and recorded so
    raw = str(tmp_path / "raw")
    assert export.main(["--workdir", runs["ld"], "--out", raw, "--weights", "params"]) == 0
    trained = load_params(runs["ld"], "params")
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(unet_ema)))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(TextToImage.from_pretrained(raw).unet_params), trained)
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


def test_zero_snr_fine_tune_starts_from_the_run_and_exports_its_schedule(runs, tmp_path):
    """init_from on a text-to-image U-Net: step 0 is the source run's EMA U-Net; the run's zero-terminal-SNR
    v-prediction objective reaches the exported scheduler, and sampling starts from pure noise."""
    c = evaluate.read_run_config(runs["ld"])
    c.model.update(init_from=runs["ld"], rescale_zero_terminal_snr=True, prediction_type="v_prediction",
                   weighting="simple")
    c.steps = 2
    start = jax.device_get(train(c, str(tmp_path / "step0"), stop_after=0).state.params)
    jax.tree.map(np.testing.assert_array_equal, start, load_params(runs["ld"], "ema"))

    workdir = str(tmp_path / "zsnr")
    train(c, workdir)
    out = str(tmp_path / "model")
    export.export_text_to_image(workdir, out)
    scheduler = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["prediction_type"] == "v_prediction"
    pipe = TextToImage.from_pretrained(out)
    ac = pipe.schedule.alphas_cumprod
    assert ac[-1] == 0.0 and ac[0] > 0.99
    images = np.asarray(pipe(["a red circle"], steps=3, seed=0))
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    c.model.prediction_type = "epsilon"
    with pytest.raises(ValueError, match="rescale_zero_terminal_snr needs prediction_type 'v_prediction' or "
                                         "'sample'.*'epsilon'"):
        train(c, str(tmp_path / "eps"))
    c.model.update(prediction_type="v_prediction", unet=dict(c.model.unet.to_dict(), layers_per_block=2))
    with pytest.raises(ValueError, match=r"that run's U-Net differs from config.model.unet in layers_per_block"):
        train(c, str(tmp_path / "bigger"))


def test_hard_negative_clip_fine_tune(runs, tmp_path):
    """configs/clip.py's hard negatives: spatial and count words swapped through a token-id table; the
    fine-tune starts from the source run's EMA and its loss adds the swapped captions to the softmax."""
    from jaxdiff.training import recipes
    from jaxdiff.training.recipes.clip import hard_negative_logits, model_for, opposite_ids

    c = evaluate.read_run_config(runs["clip"])
    c.model.update(hard_negatives=True, init_from=runs["clip"])
    spec = data_spec(c.data)
    table = opposite_ids(spec)
    pairs = [("a red circle on the left", "a red circle on the right"),
             ("a red circle above a blue square", "a red circle below a blue square"),
             ("three green circles", "four green circles"), ("a small blue square at the top",
                                                             "a small blue square at the bottom")]
    for caption, flipped in pairs:
        np.testing.assert_array_equal(table[spec.tokenize([caption])], spec.tokenize([flipped]))

    start = jax.device_get(train(c, str(tmp_path / "step0"), stop_after=0).state.params)
    jax.tree.map(np.testing.assert_array_equal, start, load_params(runs["clip"], "ema"))

    task = recipes.build(c, spec)
    tokens = jnp.asarray(spec.tokenize(["a red circle on the left", "a red circle on the right", "a red circle"]))
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    model = model_for(c, spec)
    out = model.apply({"params": start}, tokens, images)
    neg = np.asarray(hard_negative_logits(model, start, tokens, out.image_embeds, table))
    # caption 2 has no word to swap; image 0's caption is caption 1's negative and vice versa
    assert np.isinf(neg[:, 2]).all() and np.isinf(neg[0, 1]) and np.isinf(neg[1, 0])
    np.testing.assert_allclose(neg[0, 0], out.logits_per_image[0, 1], rtol=1e-5)   # "left" swapped is "right"
    batch = {"tokens": tokens, "image": images}
    with_negatives = float(task.loss(start, None, batch, jax.random.key(1), 0)[0])
    c.model.hard_negatives = False
    without = float(recipes.build(c, spec).loss(start, None, batch, jax.random.key(1), 0)[0])
    assert with_negatives > without

    c.model.update(hard_negatives=False, text=dict(c.model.text.to_dict(), num_hidden_layers=2))
    with pytest.raises(ValueError, match="that run's CLIP differs from config.model's towers"):
        recipes.build(c, spec)


def test_trainable_text_encoder_trains_and_exports(runs, tmp_path):
    """text_encoder.trainable: the run's params are {'unet', 'text'}, the text part starting from the CLIP run's
    text tower and moving with training; the export carries the trained encoder, clip/ the CLIP run's."""
    c = evaluate.read_run_config(runs["ld"])
    c.model.text_encoder.trainable = True
    clip_text = load_params(runs["clip"], "ema")["text_model"]
    start = jax.device_get(train(c, str(tmp_path / "step0"), stop_after=0).state.params)
    assert set(start) == {"unet", "text"}
    jax.tree.map(np.testing.assert_array_equal, start["text"], clip_text)

    workdir = str(tmp_path / "joint")
    train(c, workdir)
    ema = load_params(workdir, "ema")
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ema["text"]), jax.tree.leaves(clip_text))]
    assert max(moved) > 0
    pipe = TextToImage.from_pretrained(export.export_text_to_image(workdir, str(tmp_path / "model")))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.text_params), ema["text"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.unet_params), ema["unet"])
    assert np.asarray(pipe(["a red circle"], steps=2, seed=0)).shape == (1, 16, 16, 3)

    c.model.init_from = workdir
    c.model.text_encoder.trainable = False
    with pytest.raises(ValueError, match="trained its text encoder with its U-Net.*not supported"):
        train(c, str(tmp_path / "from_joint"))


def test_fine_tune_from_a_model_folder_adding_jaxdiff_parts(runs, tmp_path):
    """An exported model folder serves as VAE, text encoder and init_from of a fine-tune that adds the U-Net's
    coordinate inputs and context layers: step 0 computes exactly the source U-Net's function, and the
    fine-tune's export carries the folder's VAE, text encoder and training records."""
    from jaxdiff.convert import from_diffusers

    folder = export.export_text_to_image(runs["ld"], str(tmp_path / "source"))
    c = evaluate.read_run_config(runs["ld"])
    c.model.update(init_from=folder, unet=dict(c.model.unet.to_dict(), input_coordinates=True, context_layers=1,
                                               context_heads=2, attention_positions=True))
    c.model.vae.checkpoint = c.model.text_encoder.checkpoint = folder
    start = jax.device_get(train(c, str(tmp_path / "step0"), stop_after=0).state.params)
    ema = load_params(runs["ld"], "ema")
    kernel = start["conv_in"]["kernel"]
    assert kernel.shape[2] == ema["conv_in"]["kernel"].shape[2] + 2 and not kernel[:, :, -2:].any()
    np.testing.assert_array_equal(kernel[:, :, :-2], ema["conv_in"]["kernel"])
    assert not start["context_layers_0"]["gate"]["scale"].any() and start["context_layers_0"]["layer"]["mlp"]["fc1"]["kernel"].any()
    flat_start, flat_ema = (flax.traverse_util.flatten_dict(t) for t in (start, ema))
    added = sorted("/".join(p) for p in flat_start if p not in flat_ema)
    assert {a.split("/")[0] for a in added} == {"context_layers_0", "down_blocks_0", "mid_block", "up_blocks_1"}
    assert all("pos_embed" in a and not flat_start[tuple(a.split("/"))].any() for a in added if "context" not in a)
    for path, value in flat_ema.items():
        if path != ("conv_in", "kernel"):
            np.testing.assert_array_equal(flat_start[path], value)
    plain, _ = from_diffusers(os.path.join(folder, "unet"))
    with_coords = type(plain)(dataclasses.replace(plain.config, input_coordinates=True, context_layers=1,
                                                  context_heads=2, attention_positions=True))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, plain.config.in_channels))
    context = jax.random.normal(jax.random.key(1), (2, 5, plain.config.cross_attention_dim))
    np.testing.assert_allclose(with_coords.apply({"params": start}, x, jnp.array([10, 900]), context),
                               plain.apply({"params": ema}, x, jnp.array([10, 900]), context), atol=1e-6)

    workdir = str(tmp_path / "coords")
    train(c, workdir)
    out = export.export_text_to_image(workdir, str(tmp_path / "model"))
    unet, params = from_diffusers(os.path.join(out, "unet"))
    assert unet.config.input_coordinates and unet.config.context_layers == 1 and unet.config.attention_positions
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), load_params(workdir, "ema"))
    records, source = (json.load(open(os.path.join(f, "training.json"))) for f in (out, folder))
    assert records["vae"] == source["vae"] and records["clip"] == source["clip"]
    assert records["diffusion"]["config"]["model"]["init_from"] == folder
    assert records["diffusion"]["init_from"] == source["diffusion"]
    pipe, source_pipe = TextToImage.from_pretrained(out), TextToImage.from_pretrained(folder)
    for part in ("text_params", "vae_params"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(pipe, part)),
                     jax.device_get(getattr(source_pipe, part)))
    assert np.isfinite(np.asarray(pipe(["a red circle"], steps=2, seed=0))).all()

    # --plain drops the added parts: the U-Net it writes computes the fine-tune's function with them at zero
    # (second path: the jaxdiff-only U-Net with its gains, gates and coordinate weights zeroed), and diffusers
    # loads it.
    plain_out = export.export_text_to_image(workdir, str(tmp_path / "plain"), plain=True)
    stripped, stripped_params = from_diffusers(os.path.join(plain_out, "unet"))
    assert stripped.config == plain.config and not stripped.config.jaxdiff_only()
    trained = load_params(workdir, "ema")

    def zeroed(path, value):
        name = jax.tree_util.keystr(path)
        if "pos_embed" in name or "gate" in name:
            return np.zeros_like(value)
        return np.concatenate([value[:, :, :-2], 0 * value[:, :, -2:]], 2) if "conv_in" in name and "kernel" in name \
            else value

    t = jnp.array([10, 900])
    expected = with_coords.apply({"params": jax.tree_util.tree_map_with_path(zeroed, trained)}, x, t, context)
    np.testing.assert_allclose(stripped.apply({"params": stripped_params}, x, t, context), expected, atol=1e-5)
    flat_stripped, flat_trained = (flax.traverse_util.flatten_dict(jax.device_get(p)) for p in (stripped_params, trained))
    for path, value in flat_stripped.items():
        np.testing.assert_array_equal(value, flat_trained[path][:, :, :-2] if path == ("conv_in", "kernel")
                                      else flat_trained[path])
    record = json.load(open(os.path.join(plain_out, "training.json")))["diffusion"]
    assert record["dropped"] == {"input_coordinates": True, "context_layers": 1, "context_heads": 2,
                                 "attention_positions": True}
    assert not record["config"]["model"]["unet"]["attention_positions"]
    with pytest.raises(ValueError, match="--plain drops .* has none"):
        export.export_text_to_image(runs["ld"], str(tmp_path / "plain_of_plain"), plain=True)

    c.model.text_encoder.num_hidden_layers = 2
    with pytest.raises(ValueError, match="text: the weights in .* do not fit this run's config"):
        train(c, str(tmp_path / "misfit"))

    torch, diffusers = pytest.importorskip("torch"), pytest.importorskip("diffusers")
    model = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(plain_out, "unet")).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.asarray(t)),
                       torch.from_numpy(np.asarray(context))).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(theirs, expected, atol=1e-4)


def test_emphasis_words_weight_their_examples(runs):
    """config.model.emphasis_words: with the same draws, the loss is (w * l_A + l_B) / (w + 1) for a batch of a
    caption holding the word (A) and one without (B): per-example losses solved from w = 1 and 3 predict w = 7."""
    from jaxdiff.training import recipes

    c = evaluate.read_run_config(runs["ld"])
    spec = data_spec(c.data)
    batch = {"tokens": jnp.asarray(spec.tokenize(["a red circle on the left", "a blue square"])),
             "image": jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)}
    def loss(weight):
        c.model.update(emphasis_words=("left", "above"), emphasis_weight=weight)
        task = recipes.build(c, spec)
        return float(task.loss(task.init(jax.random.key(0)), task.frozen, batch, jax.random.key(1), 0)[0])
    mean, three = loss(1.0), loss(3.0)
    l_a = (4 * three - 2 * mean) / 2          # 2 * mean = l_a + l_b;  4 * three = 3 l_a + l_b
    l_b = 2 * mean - l_a
    assert l_a > 0 and l_b > 0 and abs(l_a - l_b) > 1e-4
    np.testing.assert_allclose(loss(7.0), (7 * l_a + l_b) / 8, rtol=1e-5)
    c.model.emphasis_words = ("leftwards",)
    with pytest.raises(ValueError, match=r"\['leftwards'\] are not single words"):
        recipes.build(c, spec)


def test_mirror_pairs_replace_the_second_half_by_mirrored_twins(runs):
    """config.model.mirror_pairs: `mirrored` replaces a batch's second half by its first, flipped (upside down where
    the caption has a vertical word and no triangle, else left to right) or, for videos, played backwards, with the
    captions' words swapped (checked against captions rewritten by hand); the loss then ignores the second half
    given, pairs share timesteps and noise, and bad settings are refused."""
    from jaxdiff import schedules
    from jaxdiff.training import recipes
    from jaxdiff.training.recipes.diffusion import denoising_loss, mirror_swaps, mirrored

    c = evaluate.read_run_config(runs["ld"])
    spec = data_spec(c.data)
    swaps = mirror_swaps(spec)
    tokens = lambda captions: jnp.asarray(spec.tokenize(captions))
    captions = ["a red circle to the left of a blue square", "a red circle above a blue square",
                "a green triangle at the top", "two yellow circles"]
    rewritten = ["a red circle to the right of a blue square", "a red circle below a blue square",
                 "a green triangle at the top", "two yellow circles"]
    images = np.asarray(jax.random.uniform(jax.random.key(0), (8, 16, 16, 3)))
    masks = np.asarray(jax.random.uniform(jax.random.key(1), (8, 16, 8, 8)))
    out = mirrored({"image": images, "tokens": tokens(captions * 2), "token_masks": masks}, "flip", swaps)
    np.testing.assert_array_equal(out["tokens"], tokens(captions + rewritten))
    upside_down = [False, True, False, False]       # the triangle's caption is flipped left to right
    for i, vertical in enumerate(upside_down):
        np.testing.assert_array_equal(out["image"][4 + i], images[i, ::-1] if vertical else images[i, :, ::-1])
        np.testing.assert_array_equal(out["token_masks"][4 + i], masks[i, :, ::-1] if vertical else masks[i, ..., ::-1])
    np.testing.assert_array_equal(out["image"][:4], images[:4])

    clips = np.asarray(jax.random.uniform(jax.random.key(2), (2, 3, 8, 8, 3)))
    motion = ["a red circle moving left and a blue square moving up", "a green triangle moving down"]
    out = mirrored({"image": clips, "tokens": tokens(motion)}, "reverse", swaps)
    np.testing.assert_array_equal(out["tokens"], tokens([motion[0], "a red circle moving right and a blue square "
                                                         "moving down"]))
    np.testing.assert_array_equal(out["image"][1], clips[0, ::-1])

    seen = []
    def record(x, t, ctx):
        seen.append((np.asarray(x), np.asarray(t)))
        return jnp.zeros_like(x)
    m = c.model
    denoising_loss(record, jnp.zeros((6, 2)), jax.random.key(0), schedules.get("scaled_linear"), m, paired=True)
    (x_t, t), = seen
    np.testing.assert_array_equal(x_t[3:], x_t[:3]), np.testing.assert_array_equal(t[3:], t[:3])
    assert len(np.unique(t)) == 3

    batch = {"tokens": tokens(captions[:2]), "image": jnp.asarray(images[:2] * 2 - 1)}
    def loss(mode, batch):
        c.model.mirror_pairs = mode
        task = recipes.build(c, spec)
        return float(task.loss(task.init(jax.random.key(0)), task.frozen, batch, jax.random.key(1), 0)[0])
    other = {"tokens": tokens(captions[::3]), "image": jnp.asarray(images[::7] * 2 - 1)}
    paired = loss("flip", batch)
    assert paired == loss("flip", {k: jnp.stack([v[0], other[k][1]]) for k, v in batch.items()})
    assert paired != loss("", batch)
    with pytest.raises(ValueError, match="mirror_pairs='reverse' needs .* 'flip' for images"):
        loss("reverse", batch)
    with pytest.raises(ValueError, match="mirror_pairs='sideways': choose one of: '', flip, reverse$"):
        loss("sideways", batch)
    c.batch_size = 3
    with pytest.raises(ValueError, match=r"an even batch_size \(got 3\)"):
        loss("flip", batch)


def test_grounding_weight_adds_the_grounding_loss_of_the_unet_maps(runs):
    """config.model.grounding_weight w: with the same draws the loss is the denoising loss plus w times the grounding
    metric, itself in (0, 1) for real masks and 0 for empty ones; a batch without masks or a bad weight is refused."""
    from jaxdiff.data import grounding, render
    from jaxdiff.training import recipes

    c = evaluate.read_run_config(runs["ld"])
    spec = data_spec(c.data)
    scenes = [render.scene_at(0, 0, i) for i in (0, 1)]
    batch = {"tokens": jnp.asarray(spec.tokenize([s.caption for s in scenes])),
             "image": jnp.asarray(np.stack([render.render(s.objects, 16) for s in scenes]) / 127.5 - 1),
             "token_masks": jnp.asarray(np.stack([grounding.token_masks(s.objects, s.caption, 8, 16) for s in scenes]))}

    def loss(weight, batch=batch):
        c.model.grounding_weight = weight
        task = recipes.build(c, spec)
        value, metrics = task.loss(task.init(jax.random.key(0)), task.frozen, batch, jax.random.key(1), 0)
        return float(value), float(metrics.get("grounding", np.nan))

    plain, _ = loss(0.0)
    half, g = loss(0.5)
    assert 0.05 < g < 1
    np.testing.assert_allclose(half, plain + 0.5 * g, rtol=1e-5)
    np.testing.assert_allclose(loss(2.0)[0], plain + 2 * g, rtol=1e-5)
    empty, g0 = loss(2.0, {**batch, "token_masks": jnp.zeros_like(batch["token_masks"])})
    assert g0 == 0 and empty == pytest.approx(plain, rel=1e-6)
    with pytest.raises(ValueError, match="needs batches with 'token_masks'"):
        loss(1.0, {k: v for k, v in batch.items() if k != "token_masks"})
    with pytest.raises(ValueError, match=r"grounding_weight=-1.0: need a weight >= 0"):
        loss(-1.0)


def test_terminal_mean_share_trains_pure_noise_against_caption_means(runs, tmp_path, monkeypatch):
    """config.model.terminal_mean_share: the task's table holds each training caption with the mean of its images'
    VAE latents (grouped here by caption string, from the tfds records) and the empty caption with the mean of all;
    with share 1 the loss is the v-loss at t = T against the caption's mean (recomputed from the U-Net by hand),
    whatever the images, except for captions the table lacks; bad settings are refused. The table is cached: a
    second build reads it without touching the data, and other examples or another VAE get their own file."""
    from jaxdiff.models import AutoencoderKL
    from jaxdiff.training import recipes
    from jaxdiff.training import data as training_data
    from jaxdiff.training.recipes.diffusion import _vae_config, vae_fingerprint

    c = evaluate.read_run_config(runs["ld"])
    cache = tmp_path / "cache"
    c.model.update(terminal_mean_share=1.0, rescale_zero_terminal_snr=True, prediction_type="v_prediction",
                   weighting="simple", caption_dropout=0.0, terminal_mean_cache=str(cache))
    spec = data_spec(c.data)
    task = recipes.build(c, spec)
    (written,) = os.listdir(cache)
    with monkeypatch.context() as m:
        m.setattr(training_data, "first_examples", lambda *a: pytest.fail("the cached table was not read"))
        again = recipes.build(c, spec)
    for k in ("tokens", "means"):
        np.testing.assert_array_equal(again.frozen["caption_means"][k], task.frozen["caption_means"][k])
    fewer = recipes.build(_with(c, terminal_mean_examples=5), spec)
    assert len(os.listdir(cache)) == 2 and len(fewer.frozen["caption_means"]["tokens"]) <= 6
    vae_params = flax.core.unfreeze(flax.linen.meta.unbox(task.frozen["vae"]))
    fingerprint = vae_fingerprint(_vae_config(c.model.vae), vae_params)
    vae_params["decoder"]["conv_out"]["bias"] = np.asarray(vae_params["decoder"]["conv_out"]["bias"]) + 1e-6
    assert vae_fingerprint(_vae_config(c.model.vae), vae_params) != fingerprint
    (cache / written).write_bytes(b"truncated")          # an unreadable table is computed again and replaced
    np.testing.assert_array_equal(recipes.build(c, spec).frozen["caption_means"]["means"],
                                  task.frozen["caption_means"]["means"])
    assert np.load(cache / written)["a1"].shape == task.frozen["caption_means"]["means"].shape
    vae_cfg = _vae_config(c.model.vae)
    vae = AutoencoderKL(vae_cfg)
    records = tfds.data_source(SHAPES, data_dir=runs["data_dir"], split="train")
    groups = {}
    for r in records:
        z = vae.apply({"params": task.frozen["vae"]}, jnp.asarray(r["image"], jnp.float32)[None] / 127.5 - 1,
                      method=vae.encode)[0][0] * vae_cfg.scaling_factor
        groups.setdefault(r["caption"].decode(), []).append(np.asarray(z))
    table = task.frozen["caption_means"]
    captions = sorted(groups)
    assert len(table["tokens"]) == len(captions) + 1
    for caption in captions + [""]:
        expected = np.mean(groups[caption] if caption else sum(groups.values(), []), axis=0)
        (row,) = np.flatnonzero((np.asarray(table["tokens"]) == spec.tokenize([caption])[0]).all(-1))
        np.testing.assert_allclose(table["means"][row], expected, atol=1e-5)

    params = task.init(jax.random.key(0))
    ids = jnp.asarray(spec.tokenize(captions[:2]))
    images = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3), minval=-1, maxval=1)
    value = float(task.loss(params, task.frozen, {"tokens": ids, "image": images}, jax.random.key(1), 0)[0])
    assert float(task.loss(params, task.frozen, {"tokens": ids, "image": -images}, jax.random.key(1), 0)[0]) == value
    # by hand: the same noise draw (loss key -> (post, drop, loss) -> (t, noise)); at SNR 0, x_T is the noise, v = -x_0
    noise = jax.random.normal(jax.random.split(jax.random.split(jax.random.key(1), 3)[2])[1], (2, 8, 8, 4))
    encoder = recipes.diffusion.CLIPTextModel(recipes.diffusion.text_config_for(c.model.text_encoder.to_dict(), spec))
    context = encoder.apply({"params": task.frozen["text"]}, ids)[0]
    net, _ = recipes.diffusion.backbone(c.model, 4, 8, jnp.float32)
    out = net.apply({"params": params}, noise, jnp.full((2,), 999.0), context)
    means = np.stack([np.mean(groups[k], axis=0) for k in captions[:2]])
    np.testing.assert_allclose(value, float(jnp.mean((out + means) ** 2)), rtol=1e-5)

    unknown = {"tokens": jnp.asarray(spec.tokenize(["four cyan triangles"] * 2)), "image": images}
    assert "four cyan triangles" not in groups
    assert task.loss(params, task.frozen, unknown, jax.random.key(1), 0)[0] != \
        task.loss(params, task.frozen, {**unknown, "image": -images}, jax.random.key(1), 0)[0]
    with pytest.raises(ValueError, match=r"terminal_mean_share=1.5: need a share in \[0, 1\]"):
        recipes.build(_with(c, terminal_mean_share=1.5), spec)
    with pytest.raises(ValueError, match="rescale_zero_terminal_snr=True: only at SNR 0"):
        recipes.build(_with(c, rescale_zero_terminal_snr=False), spec)


def _with(c, **model):
    c = c.copy_and_resolve_references()
    c.model.update(model)
    return c
