"""Tiny diffusers SD3 and Flux folders (tests/fixtures/make_flow_pipeline_fixtures.py) run here end to end and
match diffusers' StableDiffusion3Pipeline and FluxPipeline: same initial noise, prompts, negative prompts and
guidance; three text encoders (and none for T5), Flux's packing, guidance embedding, dynamic shift and sigmas;
and img2img as StableDiffusion3Img2ImgPipeline and FluxImg2ImgPipeline run it (make_flow_img2img_fixtures.py)."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.models.checks import CheckpointError
from jaxdiff.models.text_encoders import FluxTextEncoders, SD3TextEncoders
from jaxdiff.pipelines import editing
from jaxdiff.samplers.driver import img2img_start

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
GOLDEN = np.load(os.path.join(HERE, "flow_pipeline_outputs.npz"))
META = json.loads(str(GOLDEN["meta"]))
IMG2IMG = np.load(os.path.join(HERE, "flow_img2img_outputs.npz"))
IMG2IMG_META = json.loads(str(IMG2IMG["meta"]))


def without_t5(tmp_path):
    """The SD3 folder as diffusers' `text_encoder_3=None, tokenizer_3=None` sees it."""
    folder = tmp_path / "sd3_no_t5"
    shutil.copytree(os.path.join(HERE, "pipeline_sd3"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


@pytest.fixture(scope="module")
def sd3():
    return jd.pipelines.TextToImage.from_pretrained(os.path.join(HERE, "pipeline_sd3"))


@pytest.fixture(scope="module")
def flux():
    return jd.pipelines.TextToImage.from_pretrained(os.path.join(HERE, "pipeline_flux"))


def check_case(pipe, case, **kwargs):
    spec = META["cases"][case]
    images, latents = pipe(META["prompts"], steps=spec["steps"], guidance_scale=spec["guidance_scale"],
                           height=META["size"], width=META["size"], noise=jnp.asarray(GOLDEN["noise_nhwc"]),
                           return_latents=True, **kwargs)
    ref = GOLDEN[case + "_latents"]
    rel = np.linalg.norm(np.asarray(latents) - ref) / np.linalg.norm(ref)
    assert rel <= 1e-4, rel
    np.testing.assert_allclose(images, GOLDEN[case + "_images"], atol=1e-4)


def test_sd3_matches_diffusers(sd3):
    assert isinstance(sd3.text_encoder, SD3TextEncoders) and len(sd3.tokenize(["a"])) == 3
    check_case(sd3, "sd3", negative_prompts=META["negative"])


def test_sd3_without_t5_matches_diffusers(tmp_path):
    pipe = jd.pipelines.TextToImage.from_pretrained(without_t5(tmp_path))
    assert pipe.text_encoder.text_encoder_3 is None and set(pipe.text_params) == {"text_encoder", "text_encoder_2"}
    check_case(pipe, "sd3_no_t5", negative_prompts=META["negative"])


def test_flux_matches_diffusers(flux):
    assert isinstance(flux.text_encoder, FluxTextEncoders) and flux.flux
    check_case(flux, "flux")


def test_flux_true_cfg_matches_diffusers(flux):
    check_case(flux, "flux_true_cfg", negative_prompts=META["negative"], true_cfg_scale=2.0)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_img2img_matches_diffusers(sd3, flux, name):
    """4 steps at strength 0.6 run 3 steps, as these pipelines round (SD's rule would run 2)."""
    pipe, case, meta = {"sd3": sd3, "flux": flux}[name], name + "_img2img", IMG2IMG_META
    spec = meta["cases"][case]
    assert pipe.strength_rounding == "up" and img2img_start(meta["steps"], meta["strength"], "up") == 1
    images = editing.img2img(pipe, meta["prompts"], IMG2IMG["images_nhwc"], meta["strength"], steps=meta["steps"],
                             negative_prompts=meta["negative"] if spec["negative"] else None,
                             guidance_scale=spec["guidance_scale"], noise=jnp.asarray(IMG2IMG["noise_nhwc"]))
    np.testing.assert_allclose(images, IMG2IMG[case + "_images"], atol=1e-4)


def test_flux_guidance_scale_is_traced_and_steers(flux):
    before = set(flux.runner.programs)
    kw = dict(steps=2, height=16, width=16, seed=0)
    a, b = flux(["a red circle"], guidance_scale=1.0, **kw), flux(["a red circle"], guidance_scale=6.0, **kw)
    new = [flux.runner.programs[k] for k in set(flux.runner.programs) - before]
    assert len(new) == 1 and new[0].cache_size() == 1 and not np.allclose(a, b)


def test_bad_requests(sd3, flux):
    with pytest.raises(ValueError, match="true_cfg_scale=2.0 applies to Flux"):
        sd3(["a"], true_cfg_scale=2.0, height=16, width=16)
    with pytest.raises(ValueError, match="positive multiples of 4"):
        flux(["a"], height=18, width=16)


def test_folder_errors(tmp_path):
    folder = tmp_path / "flux"
    shutil.copytree(os.path.join(HERE, "pipeline_flux"), folder)
    shutil.rmtree(folder / "tokenizer_2")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer_2": [None, None]}))
    with pytest.raises(CheckpointError, match="lacks tokenizer_2"):
        jd.convert.load_pipeline(str(folder))
    # SD3's pooled embedding is CLIP-L's and CLIP-G's projections side by side: CLIP-L twice is too narrow
    folder = tmp_path / "sd3"
    shutil.copytree(os.path.join(HERE, "pipeline_sd3"), folder)
    shutil.rmtree(folder / "text_encoder_2")
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    with pytest.raises(CheckpointError, match="is 32 wide but the transformer's pooled_projection_dim takes 40"):
        jd.convert.load_pipeline(str(folder))
