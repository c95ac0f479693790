"""A tiny diffusers Stable Diffusion folder runs here end to end and matches diffusers' own
pipeline (same latents, prompts, negative prompts, guidance) for DDIM and DPM-Solver++."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.convert.scheduler import schedule_from_config

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
GOLDEN = np.load(os.path.join(HERE, "pipeline_sd_outputs.npz"))
META = json.loads(str(GOLDEN["meta"]))


@pytest.fixture(scope="module")
def pipe():
    return jd.pipelines.TextToImage.from_pretrained(os.path.join(HERE, "pipeline_sd"))


@pytest.mark.parametrize("case", ["ddim", "dpmpp_2m"])
def test_matches_diffusers_pipeline(pipe, case):
    spec = META["cases"][case]
    schedule, sampler = schedule_from_config(spec["scheduler_config"])
    pipe.schedule = schedule
    images, latents = pipe(META["prompts"], META["negative"], steps=spec["steps"],
                           guidance_scale=spec["guidance_scale"], guidance_rescale=spec["guidance_rescale"],
                           noise=jnp.asarray(GOLDEN["latents_nhwc"]), return_latents=True, **sampler)
    ref_latents = GOLDEN[case + "_latents_nhwc"]
    rel = np.linalg.norm(np.asarray(latents) - ref_latents) / np.linalg.norm(ref_latents)
    assert rel <= 1e-4, rel
    np.testing.assert_allclose(images, GOLDEN[case], atol=1e-4)


def test_prompt_and_scale_change_without_recompiling(pipe):
    before = set(pipe.runner.programs)
    a = pipe(["a red circle", "a blue square"], steps=3, guidance_scale=3.0, seed=1)
    b = pipe(["two green triangles", "a blue square"], steps=3, guidance_scale=9.0, seed=2)
    new = [pipe.runner.programs[k] for k in set(pipe.runner.programs) - before]
    assert len(new) == 1 and new[0].cache_size() == 1
    assert a.shape == (2, 16, 16, 3) and not np.allclose(a, b)


def test_bad_requests(pipe):
    with pytest.raises(ValueError, match="no prompts given"):
        pipe([])
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        pipe(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="positive multiples of 4"):
        pipe(["a"], height=15)


def test_scheduler_config_errors():
    with pytest.raises(ValueError, match="scheduler 'KDPM2DiscreteScheduler' is not supported"):
        schedule_from_config({"_class_name": "KDPM2DiscreteScheduler"})
    with pytest.raises(ValueError, match="clip_sample=True is not supported"):
        schedule_from_config({"_class_name": "DDPMScheduler", "clip_sample": True})
    schedule, kwargs = schedule_from_config({"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
                                             "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                                             "set_alpha_to_one": False})
    assert "method" not in kwargs and kwargs["steps_offset"] == 1 and kwargs["set_alpha_to_one"] is False
    np.testing.assert_allclose(schedule.alphas_cumprod, jd.schedules.get("scaled_linear").alphas_cumprod)


def test_batch_sharded_over_the_data_axis_matches_one_device(pipe, tmp_path):
    from scripts.sharded_generate import IMAGE_REQUEST, PROMPTS, run_on_8_devices

    sharded = run_on_8_devices("image", tmp_path)
    single = pipe.generate(PROMPTS, **IMAGE_REQUEST)["images"]
    np.testing.assert_allclose(sharded, single, atol=2e-6)


def test_progress_bar_counts_every_step(pipe, monkeypatch):
    class Bar:
        n, closed = 0, False

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    bar = Bar()
    monkeypatch.setattr("jaxdiff.pipelines.runner.progress_bar", lambda steps: bar)
    pipe(["a red circle"], steps=3, progress=True)
    assert bar.n == 3 and bar.closed
