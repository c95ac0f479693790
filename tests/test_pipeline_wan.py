"""Tiny diffusers Wan folders (tests/fixtures/make_wan_pipeline_fixtures.py) run through TextToVideo end to end and
match diffusers' WanPipeline and WanImageToVideoPipeline: same initial noise, prompts (one needing diffusers'
prompt cleaning), negative prompts and guidance; UMT5 states zeroed past each prompt, UniPC on flow sigmas with
flow_shift (and flow Euler), normalised latents decoded by the causal video VAE; image-to-video's mask and
first-frame latent channels and CLIP image states."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.models.checks import CheckpointError
from jaxdiff.models.clip import CLIPImageProcessor
from jaxdiff.models.text_encoders import WanEncoders
from jaxdiff.tokenizers import clean_prompt

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
GOLDEN = np.load(os.path.join(HERE, "wan_pipeline_outputs.npz"))
META = json.loads(str(GOLDEN["meta"]))


@pytest.fixture(scope="module")
def t2v():
    return jd.pipelines.TextToVideo.from_pretrained(os.path.join(HERE, "pipeline_wan"))


@pytest.fixture(scope="module")
def i2v():
    return jd.pipelines.TextToVideo.from_pretrained(os.path.join(HERE, "pipeline_wan_i2v"))


def check_case(pipe, case, **kwargs):
    videos, latents = pipe(META["prompts"], META["negative"], num_frames=META["frames"], steps=META["steps"],
                           guidance_scale=META["guidance_scale"], height=META["height"], width=META["width"],
                           noise=jnp.asarray(GOLDEN["noise"]), return_latents=True, **kwargs)
    ref = GOLDEN[case + "_latents"]
    rel = np.linalg.norm(np.asarray(latents) - ref) / np.linalg.norm(ref)
    assert rel <= 1e-4, rel
    if case + "_frames" in GOLDEN:
        assert videos.shape == GOLDEN[case + "_frames"].shape
        np.testing.assert_allclose(videos, GOLDEN[case + "_frames"], atol=1e-3)


def test_text_to_video_matches_diffusers(t2v):
    assert t2v.wan and not t2v.wan_image_to_video and t2v.num_frames == 81 and t2v.size_multiple == 16
    assert t2v.default_guidance == 5.0
    assert isinstance(t2v.text_encoder, WanEncoders) and set(t2v.text_params) == {"text_encoder"}
    ids, mask = t2v.tokenize(META["prompts"])
    assert ids.shape == mask.shape == (2, 512) and clean_prompt(META["prompts"][1]) == "two green triangles & a square"
    check_case(t2v, "t2v")


def test_flow_euler_matches_diffusers(t2v):
    """method='flow_euler' on the folder's flow_shift is diffusers' FlowMatchEulerDiscreteScheduler(shift=3)."""
    check_case(t2v, "t2v_euler", method="flow_euler")


def test_image_to_video_matches_diffusers(i2v):
    assert i2v.wan_image_to_video and set(i2v.text_params) == {"text_encoder", "image_encoder"}
    check_case(i2v, "i2v", init_image=GOLDEN["image"])


def test_clip_image_processor_resizes_like_transformers(i2v):
    """An image CLIP must resize (72x120 -> 32x53, central 32x32): within about one uint8 level of transformers'
    PIL path (the i2v golden case needs no resize and matches exactly)."""
    processor = i2v.text_encoder.image_processor
    assert (processor.shortest_edge, processor.crop_size) == (32, (32, 32))
    pixels = processor(jnp.asarray(GOLDEN["clip_image"][None] / 255.0))[0]
    error = np.abs(np.asarray(pixels) - GOLDEN["clip_pixels"]) * np.asarray(processor.image_std)   # on [0, 1]
    assert error.max() < 5e-3 and error.mean() < 2e-3, (error.max(), error.mean())


def test_one_program_per_request(t2v):
    """Prompts, seeds and guidance scales are traced: a new request of the same shapes reuses the program."""
    kw = dict(num_frames=META["frames"], steps=META["steps"], height=META["height"], width=META["width"])
    t2v(META["prompts"], **kw)
    before = dict(t2v.runner.programs)
    a = t2v(["a blue square moving up", "a cat"], seed=3, guidance_scale=2.0, **kw)
    b = t2v(["a blue square moving up", "a cat"], seed=4, guidance_scale=2.0, **kw)
    assert t2v.runner.programs == before and all(p.cache_size() == 1 for p in before.values())
    assert a.shape == (2, META["frames"], META["height"], META["width"], 3) and not np.allclose(a, b)


def test_bad_requests(t2v, i2v):
    kw = dict(height=META["height"], width=META["width"], steps=1)
    with pytest.raises(ValueError, match=r"num_frames must be 1 \+ 4k \(1, 5, 9, ...\) for Wan's causal VAE, got 8"):
        t2v(["a"], num_frames=8, **kw)
    with pytest.raises(ValueError, match="positive multiples of 16"):
        t2v(["a"], num_frames=5, height=24, width=48, steps=1)
    with pytest.raises(ValueError, match="needs init_image"):
        i2v(["a"], num_frames=5, **kw)
    with pytest.raises(CheckpointError, match="CLIP image processor config .* is not supported"):
        CLIPImageProcessor.from_config({"do_center_crop": False})


def edited_folder(tmp_path, name, **index):
    folder = tmp_path / name
    shutil.copytree(os.path.join(HERE, name), folder)
    data = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**data, **index}))
    return str(folder)


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="Wan 2.2's boundary_ratio=0.875 is not supported"):
        jd.pipelines.TextToVideo.from_pretrained(edited_folder(tmp_path, "pipeline_wan", boundary_ratio=0.875))
    with pytest.raises(CheckpointError, match="lacks image_encoder, image_processor: its transformer reads CLIP"):
        jd.pipelines.TextToVideo.from_pretrained(edited_folder(tmp_path, "pipeline_wan_i2v", image_encoder=[None, None],
                                                               image_processor=[None, None]))
    with pytest.raises(CheckpointError, match="holds a WanTransformer3D; this pipeline needs UNet2DCondition"):
        jd.pipelines.TextToImage.from_pretrained(os.path.join(HERE, "pipeline_wan"))
