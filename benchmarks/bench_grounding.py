"""Grounding and denoising loss per noise level: a latent text-to-image run's weights at a checkpoint, against
the weights it started from.

For one batch of 64 training examples (data seed 123, no caption dropout), the cross-attention grounding loss
(`losses.grounding_loss`: 0 when each token's attention lies on its objects, (1 - their area)^2 when it is
spread evenly) and the denoising loss, at timesteps drawn close to t = 999, 880, 500 and 120 (logit-normal,
std 0.01), two draws each. The run's config must hold data.token_masks (e.g. configs/latent_diffusion.py:grounding).

    python benchmarks/bench_grounding.py /work/runs/ld_grounding --step 2400
"""
from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_section  # noqa: E402

LEVELS = (("~999", 12.0), ("~880", 2.0), ("~500", 0.0), ("~120", -2.0))   # logit-normal means of t / N


def losses_by_level(c, spec, params, batch) -> list[tuple[float, float]]:
    """(grounding, denoising loss) at each of LEVELS for `params` of the run config `c`."""
    from jaxdiff.training import recipes

    c = c.copy_and_resolve_references()
    c.model.update(caption_dropout=0.0, emphasis_words=(), timestep_logit_std=0.01,
                   timestep_distribution="logit_normal", grounding_weight=c.model.get("grounding_weight") or 1.0)
    out = []
    for _, mean in LEVELS:
        c.model.timestep_logit_mean = mean
        task = recipes.build(c, spec)
        values = [task.loss(params, task.frozen, batch, jax.random.key(k), 0) for k in range(2)]
        g = float(np.mean([float(v[1]["grounding"]) for v in values]))
        out.append((g, float(np.mean([float(v[0]) for v in values])) - c.model.grounding_weight * g))
    return out


def main(argv=None):
    from jaxdiff.training import evaluate, recipes
    from jaxdiff.training.checkpoint import latest_step, load_params
    from jaxdiff.training.data import data_spec, shapes_batches

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir", help="a latent text-to-image run whose config has data.token_masks")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--which", choices=("ema", "params"), default="ema", help="EMA or raw weights")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    c = evaluate.read_run_config(args.workdir)
    if not c.data.get("token_masks"):
        raise SystemExit(f"{args.workdir}: its config has no data.token_masks (no grounding targets)")
    spec = data_spec(c.data)
    batch = {k: jnp.asarray(v) for k, v in next(shapes_batches(c.data, 64, seed=123)).items()}
    step = args.step or latest_step(args.workdir)
    start = nn.meta.unbox(recipes.build(c, spec).init(jax.random.key(0)))   # init_from's weights, when it has one
    rows = zip(LEVELS, losses_by_level(c, spec, start, batch),
               losses_by_level(c, spec, load_params(args.workdir, args.which, step), batch))
    table = "\n".join([f"| t | grounding, start -> step {step} ({args.which}) | denoising loss, start -> step {step} |",
                       "|---:|---|---|",
                       *(f"| {t} | {g0:.3f} -> {g1:.3f} | {l0:.3f} -> {l1:.3f} |" for (t, _), (g0, l0), (g1, l1) in rows)])
    head = f"Run {args.workdir} (started from {c.model.get('init_from') or 'a random init'})."
    print(head + "\n\n" + table)
    if not args.no_write:
        write_section("Grounding", __doc__.split("\n\n")[1] + "\n\n" + head + "\n\n" + table)


if __name__ == "__main__":
    main()
