"""LoRA training vs full fine-tuning of the shipped shapes U-Net model: step time, trainable parameters, optimizer
state and train state bytes, in one run.

    python benchmarks/bench_lora.py [--batch 32] [--steps 5]

Rows:
  full fine-tune   configs/latent_diffusion.py:emphasis (the shipped U-Net trained, its AdamW moments and EMA)
  LoRA             configs/lora.py (rank 4 on to_q/to_k/to_v/to_out.0: the U-Net frozen, adapters trained)
Both steps are the whole recipe step through jaxdiff.training (frozen VAE encode + text encoder + U-Net
fwd/bwd + AdamW + EMA) on the same batch of `shapes` test images and captions; best of --steps warm steps,
timed in turn. Writes the table to BENCHMARKS.md (section "LoRA training").
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import flax.linen as nn
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(__file__)]
from configs import latent_diffusion, lora  # noqa: E402
from jaxdiff import parallel  # noqa: E402
from jaxdiff.training import recipes  # noqa: E402
from jaxdiff.training.data import data_spec  # noqa: E402
from jaxdiff.training.evaluate import shapes_test_set  # noqa: E402
from jaxdiff.training.loop import _put, _setup_state  # noqa: E402
from jaxdiff.training.optim import lr_schedule, make_optimizer  # noqa: E402
from jaxdiff.training.steps import jit_train_step, make_train_step  # noqa: E402
from report import write_section  # noqa: E402


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def recipe_step(c, batch: dict):
    """(run one step, {measure: value}) for config `c` on `batch`."""
    task = recipes.build(c, data_spec(c.data))
    opt = make_optimizer(c.optim, c.steps)
    mesh, rules = parallel.make_mesh(c.mesh), parallel.check_rules(c.rules)
    state, shardings = _setup_state(c, task, opt, mesh, rules)
    frozen_shardings = parallel.shardings_for(task.frozen, mesh, rules)
    frozen = _put(nn.meta.unbox(task.frozen), frozen_shardings)
    step = jit_train_step(make_train_step(task.loss, opt, ema_decay=c.ema_decay, lr_fn=lr_schedule(c.optim, c.steps)),
                          mesh, rules, shardings, frozen_shardings, None)
    data = parallel.global_batch(batch, mesh)
    sizes = {"trainable params": size(state.params), "optimizer state (bytes)": nbytes(state.opt_state),
             "train state (bytes)": nbytes(state), "frozen input (bytes)": nbytes(frozen)}
    box = [state]

    def run():
        box[0], metrics = step(box[0], frozen, data)
        jax.block_until_ready(metrics)
    return run, sizes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    configs = {"full fine-tune": latent_diffusion.get_config("emphasis"), "LoRA": lora.get_config("shapes")}
    c = configs["LoRA"]
    images, scenes = shapes_test_set(c.data.image_size, args.batch)
    batch = {"image": images, "tokens": np.asarray(data_spec(c.data).tokenize([s.caption for s in scenes]))}
    runners, sizes = {}, {}
    for name, config in configs.items():
        config.batch_size = args.batch
        runners[name], sizes[name] = recipe_step(config, batch)
        runners[name]()  # compile / warm up
    times = {k: [] for k in runners}
    for _ in range(args.steps):
        for k, run in runners.items():
            t = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t)
    measures = list(next(iter(sizes.values())))
    rows = ["| run | step (ms) | examples/s | " + " | ".join(measures) + " |",
            "|---|---:|---:|" + "---:|" * len(measures)]
    for k, ts in times.items():
        best = min(ts)
        rows.append(f"| {k} | {best * 1e3:.0f} | {args.batch / best:.1f} | "
                    + " | ".join(f"{v:,}" for v in sizes[k].values()) + " |")
    full, low = (sizes[k]["optimizer state (bytes)"] for k in ("full fine-tune", "LoRA"))
    body = "\n".join([
        f"`python benchmarks/bench_lora.py --batch {args.batch} --steps {args.steps}` on {platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs while measured: treat times as indicative), jax "
        f"{jax.__version__}, float32.",
        "The shipped shapes U-Net model (jaxdiff/assets/shapes_unet), batch of 32x32 `shapes` test images: the whole recipe step "
        "(VAE encode, text encoder, U-Net fwd/bwd, AdamW, EMA). LoRA: rank 4 on to_q/to_k/to_v/to_out.0 "
        f"(configs/lora.py). Best of {args.steps} warm steps, timed in turn; the optimizer state of LoRA is "
        f"{full / low:.0f}x smaller. Frozen input: the VAE and text encoder (and the LoRA's base U-Net), read, never "
        "updated.", "", *rows])
    print(body)
    if not args.no_write:
        write_section("LoRA training", body)


if __name__ == "__main__":
    main()
