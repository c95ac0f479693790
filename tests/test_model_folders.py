"""Model folders are read only inside themselves, checked against their checksums, and refused with
non-finite weights; the shipped folders carry checksums of their current weights; a folder trained here samples
by default at its training run's guidance."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxdiff.convert.common import CheckpointError, load_state_dict, verify_checksums, write_checksums
from jaxdiff.pipelines import SHAPES_MODEL, SHAPES_UNET_MODEL, TextToImage

MODEL = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline_sd")
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def set_weight(folder, key: str, value: float) -> None:
    """Overwrites the first entry of one U-Net tensor in a model folder."""
    path = os.path.join(folder, UNET_WEIGHTS)
    tensors = load_file(path)
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = value
    save_file(tensors, path)


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    return str(folder)


@pytest.mark.parametrize("folder, weights", [
    (SHAPES_MODEL, ["layout/model.safetensors", "text_encoder_2/model.safetensors",
                    "transformer/diffusion_pytorch_model.safetensors"]),
    (SHAPES_UNET_MODEL, [UNET_WEIGHTS])])
def test_shipped_model_checksums_match_its_weights(folder, weights):
    sums = json.load(open(os.path.join(folder, "checksums.json")))["sha256"]
    assert sorted(sums) == sorted(["clip/model.safetensors", "text_encoder/model.safetensors", *weights,
                                   "vae/diffusion_pytorch_model.safetensors"])
    verify_checksums(folder)


def test_default_guidance_is_the_training_runs(model):
    """Without training.json the reference pipeline's default (Stable Diffusion's 7.5); with one, the run's
    config.model.guidance_scale, which the images then use."""
    prompts = ["a red circle"]
    plain = TextToImage.from_pretrained(model)
    assert plain.default_guidance == plain.reference_guidance == 7.5
    with open(os.path.join(model, "training.json"), "w") as f:
        json.dump({"diffusion": {"config": {"model": {"guidance_scale": 3.0}}}}, f)
    trained = TextToImage.from_pretrained(model)
    assert trained.default_guidance == 3.0
    images = np.asarray(trained(prompts, steps=2, seed=0))
    np.testing.assert_array_equal(images, np.asarray(plain(prompts, steps=2, seed=0, guidance_scale=3.0)))
    assert np.abs(images - np.asarray(plain(prompts, steps=2, seed=0))).max() > 1e-4


def test_checksum_mismatch_names_the_file(model):
    write_checksums(model)
    verify_checksums(model)
    set_weight(model, "conv_in.weight", 0.5)
    with pytest.raises(CheckpointError, match=f"'{UNET_WEIGHTS}' in .* does not match the sha256 recorded"):
        TextToImage.from_pretrained(model)
    assert TextToImage.from_pretrained(model, verify=False).denoiser_params is not None
    os.remove(os.path.join(model, UNET_WEIGHTS))
    with pytest.raises(CheckpointError, match=f"'{UNET_WEIGHTS}' is listed in .* but missing"):
        verify_checksums(model)


def test_checksum_listing_cannot_leave_the_folder(model):
    with open(os.path.join(model, "checksums.json"), "w") as f:
        json.dump({"sha256": {"../outside.safetensors": "0" * 64}}, f)
    with pytest.raises(CheckpointError, match="checksums.json entry names '../outside.safetensors', which is outside"):
        verify_checksums(model)


@pytest.mark.parametrize("entry", ["../../elsewhere.safetensors", "/etc/elsewhere.safetensors",
                                   "sub/../../elsewhere.safetensors"])
def test_sharded_index_cannot_leave_the_folder(tmp_path, entry):
    folder = tmp_path / "unet"
    folder.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "elsewhere.safetensors"))
    index = {"metadata": {}, "weight_map": {"w": entry}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"weight_map names '{entry}', which is outside the folder"):
        load_state_dict(str(folder))


def test_sharded_index_inside_the_folder_loads(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "part-1.safetensors"))
    save_file({"b": np.zeros(3, np.float32)}, str(tmp_path / "part-2.safetensors"))
    index = {"weight_map": {"a": "part-1.safetensors", "b": "./part-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = load_state_dict(str(tmp_path))
    np.testing.assert_array_equal(tensors["a"], np.ones(2))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    with pytest.raises(CheckpointError, match="is not a safetensors index"):
        load_state_dict(str(tmp_path))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_part_and_tensor(model, value):
    set_weight(model, "conv_in.weight", value)
    with pytest.raises(CheckpointError, match="(?s)unet/: checkpoint does not fit the module .*tensor 'conv_in.weight' "
                                              "holds NaN or inf"):
        TextToImage.from_pretrained(model)
