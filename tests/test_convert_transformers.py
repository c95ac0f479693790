"""transformers folders in and out: round trips, key layouts, and errors that name the problem.

The test that transformers itself loads our export runs only where torch and transformers
are installed (the [dev] extra); the rest needs neither."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxdiff.convert.common import CheckpointError
from jaxdiff.convert.transformers import from_transformers, to_transformers
from jaxdiff.models.clip import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel

FIXTURES = Path(__file__).parent / "fixtures" / "transformers"
CASES = {  # fixture -> our module class
    "text_legacy_quick_gelu": CLIPTextModel,
    "text_gelu": CLIPTextModel,
    "text_projection_gelu": CLIPTextModelWithProjection,
    "vision_gelu": CLIPVisionModel,
    "clip_quick_gelu": CLIPModel,
    "clip_gelu_sharded": CLIPModel,
}


def model_folder(name: str) -> str:
    return str(FIXTURES / name / "model")


def copy_model(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(model_folder(name), folder)
    return folder


@pytest.mark.parametrize("name", CASES)
def test_dispatch_and_plain_arrays(name):
    module, params = from_transformers(model_folder(name))
    assert type(module) is CASES[name]
    assert all(isinstance(x, jax.Array) and x.dtype == np.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", CASES)
def test_export_then_import_gives_identical_params(name, tmp_path):
    module, params = from_transformers(model_folder(name))
    to_transformers(module, params, str(tmp_path / "out"))
    module2, params2 = from_transformers(str(tmp_path / "out"))
    assert module2 == module
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_writes_the_hub_key_layout(tmp_path):
    """Standalone towers are written under `text_model.` / `vision_model.`, as every hub
    text_encoder/ is, whichever layout they were read from (text_gelu is transformers 5.x's)."""
    assert "embeddings.token_embedding.weight" in load_file(FIXTURES / "text_gelu" / "model" / "model.safetensors")
    module, params = from_transformers(model_folder("text_gelu"))
    to_transformers(module, params, str(tmp_path))
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert all(k.startswith("text_model.") for k in keys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModel"] and config["model_type"] == "clip_text_model"


def test_export_accepts_boxed_params(tmp_path):
    module, _ = from_transformers(model_folder("vision_gelu"))
    boxed = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    to_transformers(module, boxed, str(tmp_path))
    _, reloaded = from_transformers(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, reloaded, nn.meta.unbox(boxed))


def _rewrite_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    folder = copy_model("text_gelu", tmp_path)
    _rewrite_weights(folder, lambda s: s.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'encoder\.layers\.1\.mlp\.fc2\.bias'"):
        from_transformers(str(folder))


def test_unused_tensor_is_named(tmp_path):
    folder = copy_model("text_gelu", tmp_path)
    _rewrite_weights(folder, lambda s: s.update({"encoder.layers.2.mlp.fc1.weight": np.zeros((3, 3), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unused tensor 'encoder\.layers\.2\.mlp\.fc1\.weight'"):
        from_transformers(str(folder))


def test_only_the_listed_buffers_are_ignored(tmp_path):
    """`text_model.embeddings.position_ids` (old files) is skipped; any other extra key is not."""
    folder = copy_model("clip_quick_gelu", tmp_path)
    _rewrite_weights(folder, lambda s: s.update({"text_model.embeddings.position_ids": np.arange(16)[None],
                                                 "text_model.embeddings.other_ids": np.arange(16)[None]}))
    with pytest.raises(CheckpointError) as error:
        from_transformers(str(folder))
    assert "other_ids" in str(error.value) and "position_ids" not in str(error.value)


def test_wrong_shape_is_named(tmp_path):
    folder = copy_model("vision_gelu", tmp_path)
    _rewrite_weights(folder, lambda s: s.update({"post_layernorm.weight": np.ones(7, np.float32)}))
    with pytest.raises(CheckpointError, match=r"'post_layernorm\.weight' has shape \(7,\)"):
        from_transformers(str(folder))


@pytest.mark.parametrize("edit, words", [
    ({"architectures": ["CLIPVisionModelWithProjection"]}, ["architectures", "CLIPVisionModelWithProjection",
                                                             "CLIPTextModel"]),
    ({"architectures": None, "model_type": "siglip_text_model"}, ["model_type", "siglip_text_model",
                                                                  "clip_text_model"]),
    ({"hidden_act": "gelu_new"}, ["hidden_act", "gelu_new", "quick_gelu"]),
])
def test_unsupported_config_is_named(tmp_path, edit, words):
    folder = copy_model("text_gelu", tmp_path)
    config = {**json.loads((folder / "config.json").read_text()), **edit}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        from_transformers(str(folder))
    for word in words:
        assert word in str(error.value)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_transformers(str(tmp_path))


# ----------------------------------------------------------------------------- transformers loads our export


def _transformers_outputs(model, name: str, ref: dict) -> dict:
    import torch

    tensor = lambda key: None if key not in ref else torch.from_numpy(ref[key]).long()
    with torch.no_grad():
        if name.startswith("text"):
            tower = getattr(model, "text_model", model)
            out = tower(input_ids=tensor("input_ids"), attention_mask=tensor("attention_mask"))
            return {"last_hidden_state": out.last_hidden_state, "pooled": out.pooler_output}
        pixels = torch.from_numpy(np.ascontiguousarray(ref["pixels"].transpose(0, 3, 1, 2)))
        if name.startswith("vision"):
            out = model(pixel_values=pixels)
            return {"last_hidden_state": out.last_hidden_state, "pooled": out.pooler_output}
        out = model(input_ids=tensor("input_ids"), pixel_values=pixels, attention_mask=tensor("attention_mask"))
        return {"logits_per_image": out.logits_per_image, "text_embeds": out.text_embeds,
                "image_embeds": out.image_embeds}


@pytest.mark.parametrize("name", CASES)
def test_transformers_loads_our_export(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    module, params = from_transformers(model_folder(name))
    to_transformers(module, params, str(tmp_path))
    architecture = json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(str(tmp_path)).eval()
    ref = load_file(FIXTURES / name / "reference.safetensors")
    for key, value in _transformers_outputs(model, name, ref).items():
        np.testing.assert_allclose(value.numpy(), ref[key], rtol=0, atol=1e-6 * np.abs(ref[key]).max(), err_msg=key)
