"""A tiny diffusers SDXL folder (tests/fixtures/make_sdxl_pipeline_fixtures.py) runs here end to end and matches
diffusers' StableDiffusionXLPipeline, Img2Img and Inpaint pipelines: same initial noise, prompts, negative prompts
(or none: zeros, as force_zeros_for_empty_prompt says) and guidance; CLIP-L and CLIP-G penultimate states, CLIP-G's
pooled embedding and the size ids."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxdiff as jd
from jaxdiff.convert.scheduler import schedule_from_config
from jaxdiff.models.checks import CheckpointError
from jaxdiff.models.text_encoders import SDXLTextEncoders
from jaxdiff.pipelines import editing

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
FOLDER = os.path.join(HERE, "pipeline_sdxl")
GOLDEN = np.load(os.path.join(HERE, "sdxl_pipeline_outputs.npz"))
META = json.loads(str(GOLDEN["meta"]))


@pytest.fixture(scope="module")
def pipe():
    return jd.pipelines.TextToImage.from_pretrained(FOLDER)


def request(pipe, case):
    """The case's scheduler set on the pipe; its negative prompts (None where diffusers got none) and options."""
    spec = META["cases"][case]
    pipe.schedule, sampler = schedule_from_config(spec["scheduler_config"])
    return META["negative"] if spec["negative"] else None, dict(
        steps=spec["num_inference_steps"], guidance_scale=spec["guidance_scale"],
        guidance_rescale=spec.get("guidance_rescale", 0.0), **sampler)


def check(case, latents, images):
    ref = GOLDEN[case + "_latents"]
    rel = np.linalg.norm(np.asarray(latents) - ref) / np.linalg.norm(ref)
    assert rel <= 1e-4, rel
    np.testing.assert_allclose(images, GOLDEN[case + "_images"], atol=1e-4)


@pytest.mark.parametrize("case", ["euler", "ddim_zeros"])
def test_text_to_image_matches_diffusers(pipe, case):
    assert isinstance(pipe.text_encoder, SDXLTextEncoders) and pipe.zeros_without_negative
    negative, kwargs = request(pipe, case)
    images, latents = pipe(META["prompts"], negative, noise=jnp.asarray(GOLDEN["noise_nhwc"]), return_latents=True,
                           **kwargs)
    check(case, latents, images)


def test_img2img_matches_diffusers(pipe):
    negative, kwargs = request(pipe, "img2img")
    assert pipe.strength_rounding == "down"  # 5 steps at strength 0.6: 3 steps, as diffusers' SDXL pipeline runs
    out = pipe.generate(META["prompts"], negative, noise=jnp.asarray(GOLDEN["img2img_noise_nhwc"]),
                        init_latents=pipe.encode_image(pipe.vae_params, jnp.asarray(GOLDEN["images_nhwc"])),
                        strength=META["strength"], **kwargs)
    check("img2img", out["latents"], out["images"])
    # the editing function is this request
    images = editing.img2img(pipe, META["prompts"], GOLDEN["images_nhwc"], META["strength"], negative_prompts=negative,
                             noise=jnp.asarray(GOLDEN["img2img_noise_nhwc"]), **kwargs)
    np.testing.assert_array_equal(images, out["images"])


def test_inpaint_matches_diffusers(pipe):
    negative, kwargs = request(pipe, "inpaint")
    images = editing.inpaint(pipe, META["prompts"], GOLDEN["images_nhwc"], GOLDEN["mask"], negative_prompts=negative,
                             noise=jnp.asarray(GOLDEN["noise_nhwc"]), **kwargs)
    np.testing.assert_allclose(images, GOLDEN["inpaint_images"], atol=1e-4)


def test_sample_cli_runs_the_folder(pipe, tmp_path):
    from sample.__main__ import main

    out = tmp_path / "x.png"
    assert main(["a red circle", "--model", FOLDER, "--out", str(out), "--steps", "2", "--seed", "4"]) == 0
    # no --negative: zeros, as diffusers' SDXL pipeline guides without a negative prompt
    with open(os.path.join(FOLDER, "scheduler", "scheduler_config.json")) as f:
        pipe.schedule, _ = schedule_from_config(json.load(f))
    ref = pipe(["a red circle"], steps=2, seed=4)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.round(np.asarray(ref[0]) * 255).astype(np.uint8))


def copy_folder(tmp_path, **index_changes):
    folder = tmp_path / "sdxl"
    shutil.copytree(FOLDER, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **index_changes}))
    return folder


def test_folder_options_and_errors(tmp_path):
    folder = copy_folder(tmp_path / "a", force_zeros_for_empty_prompt=False)
    assert not jd.pipelines.TextToImage.from_pretrained(str(folder)).zeros_without_negative
    folder = copy_folder(tmp_path / "b", text_encoder_2=[None, None], tokenizer_2=[None, None])
    with pytest.raises(CheckpointError, match="one text encoder; an SDXL folder has text_encoder and text_encoder_2"):
        jd.convert.load_pipeline(str(folder))
    folder = copy_folder(tmp_path / "c")  # CLIP-G must give the pooled projection
    shutil.rmtree(folder / "text_encoder_2")
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    with pytest.raises(CheckpointError, match="text_encoder_2/ holds a CLIPTextModel; SDXL needs "
                                              "CLIPTextModelWithProjection"):
        jd.convert.load_pipeline(str(folder))
    folder = copy_folder(tmp_path / "d")  # SD 1's wider CLIP as CLIP-L: the states no longer fit the U-Net
    shutil.rmtree(folder / "text_encoder")
    shutil.copytree(os.path.join(HERE, "pipeline_sd", "text_encoder"), folder / "text_encoder")
    with pytest.raises(CheckpointError, match="CLIP-L's \\+ CLIP-G's hidden_size is 56 wide but the U-Net's "
                                              "cross_attention_dim takes 40"):
        jd.convert.load_pipeline(str(folder))
