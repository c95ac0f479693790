"""jaxdiff.training.evaluate: held-out scores of trained runs."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import SHAPES
from jaxdiff.data import render
from jaxdiff.training import evaluate, load_params


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
