"""The recipes on trained runs: fine-tuning from a run or a model folder, emphasis words, CLIP hard negatives."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.pipelines import TextToImage
from jaxdiff.training import evaluate, export, load_params, recipes, train
from jaxdiff.training.data import data_spec


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


def test_fine_tune_from_a_model_folder(runs, tmp_path):
    """An exported model folder serves as VAE, text encoder and init_from of a fine-tune: step 0 is the folder's
    U-Net exactly, and the fine-tune's export carries the folder's VAE, text encoder and training records."""
    folder = export.export_text_to_image(runs["ld"], str(tmp_path / "source"))
    c = evaluate.read_run_config(runs["ld"])
    c.model.init_from = c.model.vae.checkpoint = c.model.text_encoder.checkpoint = folder
    start = jax.device_get(train(c, str(tmp_path / "step0"), stop_after=0).state.params)
    jax.tree.map(np.testing.assert_array_equal, start, load_params(runs["ld"], "ema"))

    workdir = str(tmp_path / "tuned")
    train(c, workdir)
    out = export.export_text_to_image(workdir, str(tmp_path / "model"))
    records, source = (json.load(open(os.path.join(f, "training.json"))) for f in (out, folder))
    assert records["vae"] == source["vae"] and records["clip"] == source["clip"]
    assert records["diffusion"]["config"]["model"]["init_from"] == os.path.relpath(folder)   # provenance: relative
    assert records["diffusion"]["init_from"] == source["diffusion"]
    pipe, source_pipe = TextToImage.from_pretrained(out), TextToImage.from_pretrained(folder)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.denoiser_params), load_params(workdir, "ema"))
    for part in ("text_params", "vae_params"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(pipe, part)),
                     jax.device_get(getattr(source_pipe, part)))
    assert np.isfinite(np.asarray(pipe(["a red circle"], steps=2, seed=0))).all()

    c.model.text_encoder.num_hidden_layers = 2
    with pytest.raises(ValueError, match="text: the weights in .* do not fit this run's config"):
        train(c, str(tmp_path / "misfit"))


def test_model_config_names_unknown_fields_and_bad_values(runs):
    """config.model is read into the typed ModelConfig: an unknown field (or a removed experiment's) and values out
    of range are one-line errors naming them."""
    c = evaluate.read_run_config(runs["ld"])
    spec = data_spec(c.data)
    for field, value, message in (("frobnicate", 3, r"config.model.frobnicate: unknown field"),
                                  ("caption_dropout", 1.5, r"caption_dropout=1.5: need a probability in \[0, 1\]"),
                                  ("backbone", "gan", r"config.model.backbone='gan': choose one of: unet, dit"),
                                  ("weighting", "max_snr", r"config.model.weighting='max_snr': choose one of"),
                                  ("frame_noise_correlation", 0.5, r"frame_noise_correlation is for videos"),
                                  ("t5", {"d_model": 16}, r"config.model.t5 .* is for backbones 'mmdit' and 'wan', "
                                                          r"not 'unet'")):
        bad = c.copy_and_resolve_references()
        bad.model[field] = value
        with pytest.raises(ValueError, match=message):
            recipes.build(bad, spec)
    # config.data.layout: scene records' objects on a text-to-image backbone only
    bad = c.copy_and_resolve_references()
    bad.data.update(source="squares", layout=True)
    with pytest.raises(ValueError, match=r"config.data.layout reads the scene records' objects: data.source='squares'"):
        data_spec(bad.data)
    bad = c.copy_and_resolve_references()
    bad.model.text_encoder, bad.data.layout = None, True
    with pytest.raises(ValueError, match=r"config.data.layout conditions a text-to-image or Wan text-to-video "
                                         r"backbone .* 'unet' without a text encoder takes none"):
        recipes.build(bad, data_spec(bad.data))


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
