"""Generates with the tiny test pipelines on 8 simulated CPU devices, batch split over a 'data' mesh axis.

Usage: python tests/scripts/sharded_generate.py {image,video} OUT.npz   (its own process: sets XLA_FLAGS;
`run_on_8_devices` runs it from a test)
  image: TextToImage of the tiny SD folder, PROMPTS
  video: image-to-video with TextToVideo of the tiny text-to-video U-Net (video_pipe), PROMPTS and
         first_frames()
"""
import os
import sys

import jax
import numpy as np

import jaxdiff as jd

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a cyan circle",
           "a purple square", "three red circles", "a yellow triangle", "a blue circle"]
IMAGE_REQUEST = dict(steps=4, guidance_scale=5.0, seed=7)
VIDEO_REQUEST = dict(num_frames=3, steps=3, guidance_scale=5.0, seed=7)


def first_frames():
    return jax.random.uniform(jax.random.key(2), (len(PROMPTS), 16, 16, 3))


def video_pipe(sd, unet=None, unet_params=None):
    """TextToVideo of `unet` (default: the tiny text-to-video fixture's U-Net) with the tiny text-to-video
    fixture's scheduler and the tiny SD folder's VAE, CLIP and tokenizer (not copied into pipeline_t2v)."""
    from jaxdiff.convert.common import read_config
    from jaxdiff.convert.scheduler import schedule_from_config

    t2v = os.path.join(FIXTURES, "diffusers_video", "pipeline_t2v")
    if unet is None:
        unet, unet_params = jd.convert.from_diffusers(os.path.join(t2v, "unet"))
    schedule, defaults = schedule_from_config(read_config(os.path.join(t2v, "scheduler"), "scheduler_config.json"))
    return jd.pipelines.TextToVideo(unet, unet_params, sd.vae, sd.vae_params, sd.text_encoder, sd.text_params,
                                    sd.tokenizer, schedule, {"method": "ddim", **defaults}, num_frames=4)


def run_on_8_devices(mode: str, tmp_path) -> np.ndarray:
    """This script's output for `mode` (checks it ran on 8 devices, one prompt each)."""
    import subprocess

    out = os.path.join(str(tmp_path), f"sharded_{mode}.npz")
    subprocess.run([sys.executable, os.path.abspath(__file__), mode, out], check=True, timeout=600)
    sharded = np.load(out)
    assert int(sharded["devices"]) == 8 and int(sharded["per_device_batch"]) == 1
    return sharded["out"]


if __name__ == "__main__":
    # Before jax's first use: jax reads them when it starts its backend, not when it is imported.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    mode, out_path = sys.argv[1:]
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    if mode == "image":
        pipe = jd.pipelines.TextToImage.from_pretrained(os.path.join(FIXTURES, "pipeline_sd"))
        out = pipe.generate(PROMPTS, mesh=mesh, **IMAGE_REQUEST)["images"]
    else:
        pipe = video_pipe(jd.convert.load_pipeline(os.path.join(FIXTURES, "pipeline_sd")))
        out = pipe.generate(PROMPTS, init_image=first_frames(), mesh=mesh, **VIDEO_REQUEST)["videos"]
    shards = {s.device.id for s in out.addressable_shards}
    np.savez(out_path, out=np.asarray(out), devices=len(shards), per_device_batch=out.addressable_shards[0].data.shape[0])
