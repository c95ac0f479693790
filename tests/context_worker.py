"""Subprocess helper for the context-axis test: a tiny Wan transformer's forward and parameter gradients on one
device and on a (data 2, context 4) mesh of 8 simulated devices, in one process (XLA_FLAGS must precede jax);
saves both and the shapes the 8-device program all-gathers.

    python tests/context_worker.py --out wan.npz
"""
import argparse
import os
import re
import sys

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
args = p.parse_args()

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff import parallel  # noqa: E402
from jaxdiff.models.wan import WanConfig, WanTransformer3D  # noqa: E402

# 2 blocks, 2 heads of 16; a [2, 4, 16, 16, 4] latent video is 4 x 8 x 8 = 256 tokens, 64 per context shard
MODEL = WanTransformer3D(WanConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                   text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2))
rng = np.random.default_rng(0)
INPUTS = (rng.standard_normal((2, 4, 16, 16, 4)).astype(np.float32), np.array([100.0, 700.0], np.float32),
          rng.standard_normal((2, 8, 16)).astype(np.float32))


def forward_and_grads(mesh):
    """(compiled program, output, parameter gradients of mean(output^2)) with params and inputs sharded on `mesh`."""
    rules = parallel.DEFAULT_RULES
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init = lambda: MODEL.init(jax.random.key(0), *INPUTS)["params"]
        shardings = parallel.shardings_for(jax.eval_shape(init), mesh, rules)
        params = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()

        def loss(params, *inputs):
            out = MODEL.apply({"params": params}, *inputs)
            return jnp.mean(out ** 2), out

        batch = tuple(parallel.batch_sharding(mesh, np.ndim(x)) for x in INPUTS)
        step = jax.jit(jax.grad(loss, has_aux=True), in_shardings=(shardings, *batch))
        compiled = step.lower(params, *INPUTS).compile()
        grads, out = compiled(params, *INPUTS)
    return compiled, np.asarray(out), {jax.tree_util.keystr(k): np.asarray(v)
                                       for k, v in jax.tree_util.tree_leaves_with_path(grads)}


_, out_one, grads_one = forward_and_grads(parallel.make_mesh({"data": 1}, jax.devices()[:1]))
compiled, out_eight, grads_eight = forward_and_grads(parallel.make_mesh({"data": 2, "context": 4}))
gathered = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather\(", compiled.as_text())
np.savez(args.out, out_one=out_one, out_eight=out_eight, gathered=np.array(gathered),
         **{"one" + k: v for k, v in grads_one.items()}, **{"eight" + k: v for k, v in grads_eight.items()})
