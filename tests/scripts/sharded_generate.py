"""Generates with the tiny SD folder on 8 simulated CPU devices, batch split over a 'data' mesh axis.

Usage: python tests/scripts/sharded_generate.py OUT.npz   (run in its own process: sets XLA_FLAGS)
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxdiff as jd  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a cyan circle",
           "a purple square", "three red circles", "a yellow triangle", "a blue circle"]

if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    pipe = jd.pipelines.TextToImage.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "fixtures",
                                                                 "pipeline_sd"))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    out = pipe.generate(PROMPTS, steps=4, guidance_scale=5.0, seed=7, mesh=mesh)
    shards = {s.device.id for s in out["images"].addressable_shards}
    np.savez(sys.argv[1], images=np.asarray(out["images"]), devices=len(shards),
             per_device_batch=out["images"].addressable_shards[0].data.shape[0])
