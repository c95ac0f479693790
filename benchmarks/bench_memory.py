"""Memory of a small video transformer's (Wan) train step against video length, with and without activation
checkpointing (remat), on one device and with the video tokens split over a context mesh axis.

    python benchmarks/bench_memory.py [--frames 5,9,17] [--size 32] [--layers 2] [--steps 2]

Each row compiles and runs one Wan train step (rectified-flow loss, the library's optimizer and EMA through
jaxdiff.training.steps, state donated) on batch 1 of --size x --size latents with 1 + (frames - 1) / 4 latent frames
(Wan's VAE: 1 + 4k frames, time / 4), --size^2 / 4 tokens per latent frame; remat '' (off) or 'full'; on 1 device,
then on 8 simulated CPU devices with mesh context=8 (a subprocess: XLA_FLAGS must precede jax; the 8 devices share
this machine's cores, so their step time is no speed measure). Columns, per device, from XLA's memory_analysis() of
the compiled step:
  temp    temporaries (activations, workspace)
  peak    arguments + outputs - donated aliases + temp
  kept    what the forward pass keeps for the backward pass (jax.vjp's residuals, traced; params included; whole
          model, so the same for 1 and 8 devices): what remat changes, whatever a compiler schedules
  step    best of --steps warm steps, seconds
Prints the table and writes it to BENCHMARKS.md (section "Video transformer memory").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--frames", default="5,9,17", help="video frames, each 1 + 4k")
p.add_argument("--size", type=int, default=32, help="latent height and width")
p.add_argument("--layers", type=int, default=2)
p.add_argument("--steps", type=int, default=2, help="warm steps timed (best of)")
p.add_argument("--context", type=int, default=0, help="(internal) print the rows on this many devices' context axis")
args = p.parse_args()
if args.context:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.context}"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]
from jaxdiff import diffusion, losses, parallel, schedules  # noqa: E402
from jaxdiff.models import WanConfig, WanTransformer3D  # noqa: E402
from jaxdiff.training import state as state_lib  # noqa: E402
from jaxdiff.training.config import base_config  # noqa: E402
from jaxdiff.training.optim import make_optimizer  # noqa: E402
from jaxdiff.training.steps import jit_train_step, make_train_step  # noqa: E402
from report import write_section  # noqa: E402

TEXT_LEN, TEXT_DIM, CHANNELS = 32, 64, 16
REMATS = ("", "full")


def wan(remat: str) -> WanTransformer3D:
    """Wan 2.1's layout (16 latent channels, (1, 2, 2) patches, 3-D RoPE), small: width 128 in 4 heads, MLP 512."""
    return WanTransformer3D(WanConfig(num_attention_heads=4, attention_head_dim=32, in_channels=CHANNELS,
                                      out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=512,
                                      num_layers=args.layers), remat=remat)


def flow_loss(model, schedule):
    """A recipe-shaped loss (params, frozen, batch, key, step) -> (loss, metrics): rectified flow on the latents."""
    def loss_fn(params, frozen, batch, key, step):
        x0 = batch["latents"]
        k_t, k_noise = jax.random.split(key)
        t = losses.sample_timesteps(k_t, x0.shape[0], schedule, "logit_normal")
        noise = jax.random.normal(k_noise, x0.shape)
        out = model.apply({"params": params}, diffusion.q_sample(schedule, x0, t, noise), t, batch["context"])
        return losses.flow_matching_loss(out, x0, noise, t, schedule)[0], {}
    return loss_fn


def frame_rows(frames: int, mesh) -> list[dict]:
    """The rows of one video length, remat off and on: the compiled step's memory per device, what the forward keeps,
    the warm step time. Both steps share one state (remat does not change the params)."""
    rules, schedule = parallel.DEFAULT_RULES, schedules.get("flow_matching")
    latent_frames = 1 + (frames - 1) // 4
    host = {"latents": np.random.default_rng(0).standard_normal((1, latent_frames, args.size, args.size, CHANNELS),
                                                                  np.float32),
            "context": np.random.default_rng(1).standard_normal((1, TEXT_LEN, TEXT_DIM), np.float32)}
    optimizer = make_optimizer(base_config().optim, 1000)
    create = lambda: state_lib.create(lambda key: wan("").init(key, host["latents"], np.zeros(1), host["context"])
                                      ["params"], optimizer, 0)
    shardings = parallel.shardings_for(jax.eval_shape(create), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda: nn.meta.unbox(create()), out_shardings=shardings)()
    batch = parallel.global_batch(host, mesh)
    rows = []
    for remat in REMATS:
        loss_fn = flow_loss(wan(remat), schedule)
        compiled = jit_train_step(make_train_step(loss_fn, optimizer, ema_decay=0.999), mesh, rules, shardings, None,
                                  None).lower(state, None, batch).compile()
        kept = jax.eval_shape(lambda p: jax.vjp(lambda q: loss_fn(q, None, host, jax.random.key(0), 0)[0], p)[1],
                              state.params)
        times = []
        for _ in range(args.steps + 1):   # the first call warms up
            start = time.perf_counter()
            state, metrics = compiled(state, None, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        m, mib = compiled.memory_analysis(), lambda n: n / 2 ** 20
        rows.append(dict(frames=frames, latent_frames=latent_frames, tokens=latent_frames * args.size ** 2 // 4,
                         devices=mesh.size, remat=remat or "off", temp=mib(m.temp_size_in_bytes),
                         peak=mib(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                  + m.temp_size_in_bytes),
                         kept=mib(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(kept))),
                         step=min(times[1:])))
    return rows


def rows(devices: int) -> list[dict]:
    mesh = parallel.make_mesh({"context": devices}, jax.devices()[:devices])
    return [r for f in args.frames.split(",") for r in frame_rows(int(f), mesh)]


def table(results: list[dict]) -> str:
    head = ("| frames | latent frames | tokens | devices | remat | temp MiB | peak MiB | kept MiB | step s |\n"
            "|---:|---:|---:|---:|:--|---:|---:|---:|---:|\n")
    return head + "".join(f"| {r['frames']} | {r['latent_frames']} | {r['tokens']} | {r['devices']} | {r['remat']} | "
                          f"{r['temp']:.1f} | {r['peak']:.1f} | {r['kept']:.1f} | {r['step']:.3f} |\n"
                          for r in results)


def main():
    if args.context:
        print(json.dumps(rows(args.context)))
        return
    results = rows(1)
    print(table(results), flush=True)
    child = subprocess.run([sys.executable, __file__, "--context", "8", "--frames", args.frames, "--size",
                            str(args.size), "--layers", str(args.layers), "--steps", str(args.steps)],
                           capture_output=True, text=True, check=True)
    results += json.loads(child.stdout.strip().splitlines()[-1])
    text = table(sorted(results, key=lambda r: (r["frames"], r["devices"], r["remat"] != "off")))
    print(text)
    write_section("Video transformer memory", f"""`python benchmarks/bench_memory.py` ({platform.processor() or
platform.machine()}, {os.cpu_count()} cores shared with other jobs, jax {jax.__version__}, XLA:CPU). A Wan
transformer of {args.layers} blocks, width 128 (4 heads of 32), MLP 512, train step on batch 1 of {args.size}x{args.size}
latents (16 channels; tokens = latent frames x {args.size ** 2 // 4}); remat 'full' checkpoints every block; 8 devices =
mesh context=8 (simulated on the same cores: their step time is no speed measure). temp, peak: per device, from XLA's
memory_analysis() of the compiled step (peak = arguments + outputs - donated + temp); kept: what the forward pass keeps
for the backward pass, whole model (jax.vjp's residuals, params included).

{text}
Reading: the context axis divides the activations by the devices: each holds 1/8 of the tokens, its queries' logits
and all keys and values (jaxdiff/models/attention.py). remat cuts what the forward keeps to the blocks' inputs (kept),
but XLA:CPU's compiled temp does not move: its scheduler runs each block's recomputation inside the forward pass,
beside the original, so the CPU holds both (tests/test_remat.py). What remat saves in a compiled step depends on a
scheduler that delays the recomputation to the backward pass; no GPU or TPU number is measured here.
""")


if __name__ == "__main__":
    main()
