"""Run by tests/test_sharded_loading.py on 8 simulated devices (XLA_FLAGS must precede jax): loads pipeline folders
in bfloat16 plainly and straight onto a (data 2, fsdp 2, tensor 2) mesh (with --pipeline, the last one also
generates both ways), and prints what the test checks as JSON."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff import parallel  # noqa: E402
from jaxdiff.convert import load_pipeline  # noqa: E402
from jaxdiff.models.layers import param_shapes  # noqa: E402
from jaxdiff.pipelines import TextToImage  # noqa: E402

PARTS = ("denoiser", "vae", "text")


def main(folder: str, pipeline: bool) -> dict:
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    plain = load_pipeline(folder, param_dtype=jnp.bfloat16)
    placed = load_pipeline(folder, param_dtype=jnp.bfloat16, mesh=mesh)
    trees = {"denoiser": (plain.denoiser_params, placed.denoiser_params), "vae": (plain.vae_params, placed.vae_params),
             "text": (plain.text_params, placed.text_params)}
    report = {"devices": jax.device_count()}
    for part, (a, b) in trees.items():
        leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
        report[part] = {
            "same_tree": jax.tree.structure(a) == jax.tree.structure(b),
            "bit_identical": all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)),
            "dtypes": sorted({str(y.dtype) for y in leaves_b}),
            "split": sum(not y.sharding.is_fully_replicated for y in leaves_b),
            "leaves": len(leaves_b),
            "on_mesh": all(y.sharding.mesh == mesh for y in leaves_b),
        }
    want = parallel.shardings_for(param_shapes(placed.denoiser, boxed=True), mesh, parallel.DEFAULT_RULES)
    report["denoiser"]["shardings_as_rules_say"] = all(
        x.sharding == y for x, y in zip(jax.tree.leaves(placed.denoiser_params), jax.tree.leaves(want)))
    largest = max(jax.tree.leaves(placed.denoiser_params), key=lambda y: y.size)
    report["largest_shard_fraction"] = largest.addressable_shards[0].data.size / largest.size
    (args, kwargs) = placed.denoiser.example_inputs()
    args = tuple(jnp.ones(a.shape, a.dtype) for a in args)
    run = jax.jit(lambda p: placed.denoiser.apply({"params": p}, *args, **kwargs))
    out_plain, out_placed = np.asarray(run(plain.denoiser_params)), np.asarray(run(placed.denoiser_params))
    report["forward_rel_diff"] = float(np.linalg.norm(out_placed - out_plain) / np.linalg.norm(out_plain))
    if not pipeline:
        return report
    # the whole pipeline: the batch split over 'data', the params where they were loaded
    kw = dict(steps=2, height=16, width=16, seed=0)
    a = TextToImage.from_pretrained(folder, param_dtype=jnp.bfloat16)(["a red circle", "a blue square"], **kw)
    pipe = TextToImage.from_pretrained(folder, param_dtype=jnp.bfloat16, mesh=mesh)
    b = pipe(["a red circle", "a blue square"], mesh=mesh, **kw)
    report["pipeline_max_diff"] = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    report["pipeline_params_split"] = sum(not y.sharding.is_fully_replicated for y in jax.tree.leaves(pipe.params))
    return report


if __name__ == "__main__":
    # argv: FOLDER [--pipeline] ...: each folder's report, one JSON object keyed by folder
    folders = [a for a in sys.argv[1:] if a != "--pipeline"]
    print(json.dumps({f: main(f, "--pipeline" in sys.argv and f == folders[-1]) for f in folders}))
