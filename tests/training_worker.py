"""Subprocess helper for the sharding tests: trains a tiny recipe (latent diffusion by default) on a simulated
device count (and optionally as one of several jax.distributed processes), then saves the losses
and the final parameters as .npz for the parent test to compare.

    python tests/training_worker.py --devices 8 --mesh 2,2,2 --out run.npz --workdir W
    python tests/training_worker.py --devices 1 --restore W --out restored.npz
"""
import argparse
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("--devices", type=int, default=1)
p.add_argument("--config", default="latent_diffusion", help="a configs/ module whose :tiny variant trains")
p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor")
p.add_argument("--context", type=int, default=1, help="mesh.context (the token sequence split over that many devices)")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--adam-eps", type=float, default=None, help="config.optim.eps (default: the config's)")
p.add_argument("--out", required=True)
p.add_argument("--workdir", default="", help="shared by all processes of a run")
p.add_argument("--restore", default="", help="instead of training, restore this workdir's latest checkpoint")
p.add_argument("--process-id", type=int, default=0)
p.add_argument("--num-processes", type=int, default=1)
p.add_argument("--coordinator", default="")
args = p.parse_args()

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff.training import loop  # noqa: E402


def save(path, result, **extra):
    """The final params, gathered from every process (tiled: full values), as params<keypath> arrays."""
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(result.state.params, tiled=True)
    if jax.process_index() == 0:
        np.savez(path, step=int(result.state.step), **extra,
                 **{"params" + jax.tree_util.keystr(k): np.asarray(v)
                    for k, v in jax.tree_util.tree_leaves_with_path(params)})


c = importlib.import_module(f"configs.{args.config}").get_config("tiny")
c.steps, c.log_every, c.checkpoint_every = args.steps, 0, args.steps
if args.adam_eps is not None:
    c.optim.eps = args.adam_eps
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(x) for x in args.mesh.split(","))
c.mesh.context = args.context
c.distributed.coordinator, c.distributed.num_processes = args.coordinator, args.num_processes
c.distributed.process_id = args.process_id

if args.restore:
    # The latest checkpoint is at c.steps: this restores it onto this mesh and trains no further.
    save(args.out, loop.train(c, args.restore, resume=True))
else:
    result = loop.train(c, args.workdir)
    save(args.out, result, losses=np.asarray(result.losses))
