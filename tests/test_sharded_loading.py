"""Loading straight onto a mesh: the tiny SD3 and Flux folders loaded in bfloat16 onto 8 simulated devices
(data 2, fsdp 2, tensor 2; in a subprocess, as XLA_FLAGS must precede jax) equal the plain load bit for bit,
with each param in the sharding the logical axis rules give it, and run the same forward and pipeline."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert.common import LazyTensor, load_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")


@pytest.fixture(scope="module")
def reports():
    folders = [os.path.join(FIXTURES, f) for f in ("pipeline_sd3", "pipeline_flux")]
    out = subprocess.run([sys.executable, os.path.join(HERE, "sharded_loading_worker.py"), *folders, "--pipeline"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {os.path.basename(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("folder", ["pipeline_sd3", "pipeline_flux"])
def test_sharded_load_equals_plain_load(reports, folder):
    report = reports[folder]
    assert report["devices"] == 8
    for part in ("denoiser", "vae", "text"):
        r = report[part]
        assert r["same_tree"] and r["bit_identical"] and r["on_mesh"] and r["dtypes"] == ["bfloat16"], (part, r)
    assert report["denoiser"]["split"] > report["denoiser"]["leaves"] // 4 and report["text"]["split"] > 0
    assert report["denoiser"]["shardings_as_rules_say"]
    assert report["largest_shard_fraction"] <= 0.5  # a device holds part of the largest kernel, not all of it
    assert report["forward_rel_diff"] < 1e-5


def test_pipeline_on_the_mesh_keeps_params_split(reports):
    """TextToImage loaded onto the mesh keeps the params split and generates what the plain pipeline does."""
    report = reports["pipeline_flux"]
    assert report["pipeline_params_split"] > 0 and report["pipeline_max_diff"] < 1e-4


def test_lazy_tensors_read_slices_and_wholes():
    eager = load_state_dict(os.path.join(FIXTURES, "pipeline_flux", "transformer"))
    lazy = load_state_dict(os.path.join(FIXTURES, "pipeline_flux", "transformer"), lazy=True)
    assert set(lazy) == set(eager) and all(isinstance(t, LazyTensor) for t in lazy.values())
    key = "x_embedder.weight"
    np.testing.assert_array_equal(np.asarray(lazy[key]), eager[key])
    np.testing.assert_array_equal(lazy[key].read((slice(1, 3), slice(None))), eager[key][1:3])
    assert lazy[key].shape == eager[key].shape


def test_bfloat16_load_is_the_rounded_float32_load():
    from jaxdiff.convert import from_diffusers

    _, full = from_diffusers(os.path.join(FIXTURES, "pipeline_flux", "transformer"))
    _, half = from_diffusers(os.path.join(FIXTURES, "pipeline_flux", "transformer"), param_dtype=jnp.bfloat16)
    w = full["x_embedder"]["kernel"]
    assert half["x_embedder"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(half["x_embedder"]["kernel"]), np.asarray(w.astype(jnp.bfloat16)))
