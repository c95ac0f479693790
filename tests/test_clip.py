"""CLIP against transformers' outputs (golden files from tests/fixtures/make_transformers_fixtures.py),
the contrastive loss against NumPy, zero-shot classification, configs, dtypes and logical axes."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxdiff.convert.common import CheckpointError
from jaxdiff.convert.transformers import from_transformers
from jaxdiff.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                                 clip_loss, eos_positions, zero_shot_classify)

FIXTURES = Path(__file__).parent / "fixtures" / "transformers"
# Norm-wise relative error allowed in float32 (the brief: 1e-5 where achievable; we see ~5e-7).
RTOL = 1e-5


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def load_case(name: str):
    module, params = from_transformers(str(FIXTURES / name / "model"))
    return module, params, load_file(FIXTURES / name / "reference.safetensors")


def assert_close(outputs: dict, reference: dict) -> None:
    errors = {k: rel_err(v, reference[k]) for k, v in outputs.items()}
    assert all(e <= RTOL for e in errors.values()), errors


@pytest.mark.parametrize("name", ["text_legacy_quick_gelu", "text_gelu"])
def test_text_model_matches_transformers(name):
    """Legacy (eos_token_id=2: argmax pooling, SD1 eos padding, 4.x key layout) and newer
    (first-EOS pooling, padding mask) configurations."""
    module, params, ref = load_case(name)
    hidden, pooled = module.apply({"params": params}, ref["input_ids"], ref.get("attention_mask"))
    assert_close({"last_hidden_state": hidden, "pooled": pooled}, ref)


def test_text_model_with_projection_matches_transformers():
    module, params, ref = load_case("text_projection_gelu")
    hidden, pooled, embeds = module.apply({"params": params}, ref["input_ids"], ref["attention_mask"])
    assert_close({"last_hidden_state": hidden, "pooled": pooled, "text_embeds": embeds}, ref)


def test_vision_model_matches_transformers():
    module, params, ref = load_case("vision_gelu")
    hidden, pooled = module.apply({"params": params}, ref["pixels"])
    assert_close({"last_hidden_state": hidden, "pooled": pooled}, ref)


@pytest.mark.parametrize("name", ["clip_quick_gelu", "clip_gelu_sharded"])
def test_clip_model_matches_transformers(name):
    module, params, ref = load_case(name)
    variables = {"params": params}
    mask = ref.get("attention_mask")
    out = module.apply(variables, ref["input_ids"], ref["pixels"], mask)
    text_features = module.apply(variables, ref["input_ids"], mask, method=CLIPModel.encode_text)
    image_features = module.apply(variables, ref["pixels"], method=CLIPModel.encode_image)
    assert_close({"logits_per_image": out.logits_per_image, "logits_per_text": out.logits_per_text,
                  "text_embeds": out.text_embeds, "image_embeds": out.image_embeds,
                  "text_features": text_features, "image_features": image_features,
                  "loss": clip_loss(out.logits_per_text)[None]}, ref)


def test_eos_positions_follow_both_conventions():
    ids = jnp.array([[49406, 320, 49407, 49407], [49406, 5, 9, 7]])
    # legacy: the largest id (first of ties); newer: the first position equal to eos
    np.testing.assert_array_equal(eos_positions(ids, 2), [2, 0])
    np.testing.assert_array_equal(eos_positions(ids, 7), [0, 3])


def test_clip_loss_matches_numpy():
    logits = np.random.default_rng(0).standard_normal((5, 5)).astype(np.float32) * 3

    def cross_entropy(l):  # rows are predictions, the diagonal holds the targets
        lse = np.log(np.exp(l - l.max(1, keepdims=True)).sum(1)) + l.max(1)
        return np.mean(lse - np.diag(l))

    expected = (cross_entropy(logits.astype(np.float64)) + cross_entropy(logits.T.astype(np.float64))) / 2
    np.testing.assert_allclose(float(clip_loss(jnp.asarray(logits))), expected, rtol=1e-6)

    # Hard negatives: extra columns of the image->text rows only; -inf columns drop out.
    negatives = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32) * 3
    negatives[2, 1] = -np.inf
    per_image = np.concatenate([logits.T, negatives], axis=1).astype(np.float64)
    finite = np.where(np.isfinite(per_image), per_image, -1e30)
    lse = np.log(np.exp(finite - finite.max(1, keepdims=True)).sum(1)) + finite.max(1)
    expected = (cross_entropy(logits.astype(np.float64)) + np.mean(lse - np.diag(logits))) / 2
    np.testing.assert_allclose(float(clip_loss(jnp.asarray(logits), jnp.asarray(negatives))), expected, rtol=1e-6)
    all_masked = jnp.full((5, 3), -jnp.inf)
    np.testing.assert_allclose(float(clip_loss(jnp.asarray(logits), all_masked)), float(clip_loss(jnp.asarray(logits))),
                               rtol=1e-6)


def test_zero_shot_classify_picks_the_most_similar_prompt():
    module, params, ref = load_case("clip_quick_gelu")
    # A constructed case: with a large temperature the prediction must be each image's most
    # cosine-similar prompt, computed here in NumPy from the unnormalised features.
    params = {**params, "logit_scale": jnp.asarray(np.log(100.0), jnp.float32)}
    text = np.asarray(module.apply({"params": params}, ref["input_ids"], ref["attention_mask"],
                                   method=CLIPModel.encode_text), np.float64)
    image = np.asarray(module.apply({"params": params}, ref["pixels"], method=CLIPModel.encode_image), np.float64)
    cosine = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1)[:, None]).T
    expected = np.exp(100 * cosine - (100 * cosine).max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)

    classify = jax.jit(zero_shot_classify, static_argnums=0)
    probs, predicted = classify(module, params, ref["pixels"], ref["input_ids"], ref["attention_mask"])
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_array_equal(predicted, cosine.argmax(1))
    # Putting a copy of image 0's best prompt under a second label splits its probability evenly.
    best = int(cosine[0].argmax())
    ids = np.concatenate([ref["input_ids"], ref["input_ids"][best:best + 1]])
    mask = np.concatenate([ref["attention_mask"], ref["attention_mask"][best:best + 1]])
    probs, _ = classify(module, params, ref["pixels"], ids, mask)
    np.testing.assert_allclose(probs[0, best], probs[0, -1], rtol=1e-5)


def test_zero_shot_probabilities_match_transformers_logits():
    module, params, ref = load_case("clip_gelu_sharded")
    probs, predicted = zero_shot_classify(module, params, ref["pixels"], ref["input_ids"])
    logits = ref["logits_per_image"].astype(np.float64)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(predicted, logits.argmax(1))


TINY_TEXT = CLIPTextConfig(vocab_size=40, hidden_size=16, intermediate_size=32, projection_dim=8, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=8, eos_token_id=39)
TINY = CLIPConfig(text=TINY_TEXT, vision=CLIPVisionConfig(hidden_size=12, intermediate_size=24, projection_dim=8,
                                                         num_hidden_layers=1, num_attention_heads=2, image_size=8,
                                                         patch_size=4), projection_dim=8)


def tiny_inputs():
    ids = jnp.array([[38, 4, 9, 39, 0, 0, 0, 0], [38, 7, 39, 0, 0, 0, 0, 0]], jnp.int32)
    pixels = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    return ids, pixels


@pytest.fixture(scope="module")
def tiny():
    """Boxed params of a tiny random CLIPModel and its float32 outputs (each compiled once)."""
    ids, pixels = tiny_inputs()
    model = CLIPModel(TINY)
    boxed = jax.jit(model.init)(jax.random.key(0), ids, pixels)["params"]
    params = nn.meta.unbox(boxed)
    return boxed, params, jax.jit(model.apply)({"params": params}, ids, pixels)


def test_params_carry_logical_axes_and_unbox_to_plain_arrays(tiny):
    boxed, params, _ = tiny
    specs = nn.get_partition_spec(boxed)
    layer = specs["text_model"]["encoder"]["layers_0"]
    assert tuple(layer["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == ("embed", "heads")
    assert tuple(specs["text_model"]["embeddings"]["token_embedding"]["embedding"]) == ("vocab", "embed")
    is_box = lambda x: isinstance(x, nn.Partitioned)
    assert any(is_box(x) for x in jax.tree.leaves(boxed, is_leaf=is_box))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))


def test_logical_constraints_under_a_mesh_keep_the_numbers(tiny):
    _, params, plain = tiny
    ids, pixels = tiny_inputs()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rules = (("batch", "data"), ("length", None), ("embed", None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.jit(lambda p: CLIPModel(TINY).apply({"params": p}, ids, pixels))(params)
    np.testing.assert_allclose(sharded.logits_per_text, plain.logits_per_text, rtol=1e-6)


def test_bfloat16_compute_and_param_dtypes(tiny):
    _, params, full = tiny
    ids, pixels = tiny_inputs()
    half = jax.jit(CLIPModel(TINY, dtype=jnp.bfloat16).apply)({"params": params}, ids, pixels)
    assert half.text_embeds.dtype == jnp.float32  # similarities are computed in float32
    assert rel_err(half.logits_per_text, full.logits_per_text) < 3e-2
    hidden, _ = jax.eval_shape(CLIPTextModel(TINY_TEXT, dtype=jnp.bfloat16).apply, {"params": params["text_model"]},
                               ids)
    assert hidden.dtype == jnp.bfloat16
    bf16_params = jax.eval_shape(CLIPModel(TINY, param_dtype=jnp.bfloat16).init, jax.random.key(0), ids, pixels)
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(bf16_params))} == {jnp.dtype(jnp.bfloat16)}


def test_padding_mask_changes_only_padded_positions(tiny):
    """With right padding, a causal model's real tokens never see the pads; the mask only
    changes the (unused) pad positions, so pooled features are the same with or without it."""
    _, params, _ = tiny
    ids, _ = tiny_inputs()
    apply = jax.jit(CLIPTextModel(TINY_TEXT).apply)
    mask = (jnp.arange(8) <= jnp.argmax(ids == 39, axis=1)[:, None]).astype(jnp.int32)
    hidden_masked, pooled_masked = apply({"params": params["text_model"]}, ids, mask)
    hidden, pooled = apply({"params": params["text_model"]}, ids)
    np.testing.assert_allclose(pooled_masked, pooled, rtol=1e-6)
    np.testing.assert_allclose(hidden_masked[0, :4], hidden[0, :4], rtol=1e-6)
    assert not np.allclose(hidden_masked[0, 4:], hidden[0, 4:])


def test_wrong_image_size_is_an_error():
    ids, pixels = tiny_inputs()
    with pytest.raises(ValueError, match="do not match"):
        jax.eval_shape(CLIPModel(TINY).init, jax.random.key(0), ids, pixels[:, :4])


# ----------------------------------------------------------------------------- configs


def test_config_round_trips_through_transformers_dict():
    assert CLIPConfig.from_transformers_config(TINY.to_transformers_config()) == TINY
    assert CLIPTextConfig.from_transformers_config(TINY_TEXT.to_transformers_config()) == TINY_TEXT


def test_config_defaults_and_old_config_dict_overrides():
    config = CLIPConfig.from_transformers_config({
        "model_type": "clip", "projection_dim": 8, "text_config": {"hidden_act": "gelu", "vocab_size": 100},
        "text_config_dict": {"vocab_size": 50}, "vision_config": {"patch_size": 16}, "architectures": ["CLIPModel"]})
    assert config.text.vocab_size == 50 and config.text.hidden_act == "gelu"
    assert config.vision.patch_size == 16 and config.vision.image_size == 224  # transformers' default
    assert config.text.layer_norm_eps == 1e-5


@pytest.mark.parametrize("cls, d, words", [
    (CLIPTextConfig, {"hidden_act": "silu"}, ["hidden_act", "'silu'", "'gelu'", "'quick_gelu'"]),
    (CLIPTextConfig, {"model_type": "bert"}, ["model_type", "'bert'", "'clip_text_model'"]),
    (CLIPVisionConfig, {"model_type": "clip"}, ["model_type", "'clip'", "'clip_vision_model'"]),
    (CLIPConfig, {"model_type": "siglip"}, ["model_type", "'siglip'", "'clip'"]),
    (CLIPVisionConfig, {"attention_dropout": 0.1}, ["attention_dropout", "0.1"]),
    (CLIPTextConfig, {"hidden_size": 30, "num_attention_heads": 4}, ["hidden_size=30", "num_attention_heads=4"]),
    (CLIPTextConfig, {"eos_token_id": [2, 3]}, ["eos_token_id", "[2, 3]"]),
    (CLIPVisionConfig, {"image_size": [224, 224]}, ["image_size", "[224, 224]"]),
    (CLIPConfig, {"text_config": {"hidden_act": "relu"}}, ["hidden_act", "'relu'"]),
])
def test_unsupported_config_values_are_named(cls, d, words):
    with pytest.raises(CheckpointError) as error:
        cls.from_transformers_config(d)
    for word in words:
        assert word in str(error.value)


def test_configs_are_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.projection_dim = 3
    assert hash(TINY) == hash(CLIPConfig.from_transformers_config(TINY.to_transformers_config()))
