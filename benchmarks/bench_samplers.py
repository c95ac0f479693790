"""Sampler costs: per-step overhead beyond the model, one lax.scan vs a Python loop, compile time.

    python benchmarks/bench_samplers.py [--steps 20] [--batch 4]

For every sampler, on the shipped shapes U-Net model's latents [B, 16, 16, 4], its U-Net as the model (text context from
a fixed random [B, 16, 128], no guidance):
  compile   seconds to trace + compile the whole run (first call minus a warm call)
  scan      warm ms per step of the whole run as one jitted lax.scan
  model     warm ms per model call when the model alone is scanned over the same steps (x <- model(x, t)),
            times the sampler's calls per step
  alone     warm ms per step of the same scan with the model replaced by 0.5 * x: the sampler's own cost
  loop      warm ms per step when each step is its own jitted call driven from Python
Prints a table and writes it to BENCHMARKS.md (section "Samplers").
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
import jaxdiff as jd  # noqa: E402
from jaxdiff.pipelines import SHAPES_UNET_MODEL  # noqa: E402
from jaxdiff.samplers import driver  # noqa: E402
from report import write_section  # noqa: E402


def shipped_model(batch: int):
    """The shipped shapes U-Net model (jaxdiff/assets/shapes_unet) as model_fn(x, t), on a fixed text context."""
    unet, params = jd.convert.from_diffusers(os.path.join(SHAPES_UNET_MODEL, "unet"))
    context = jax.random.normal(jax.random.key(3), (batch, 16, unet.config.cross_attention_dim))
    return lambda x, t: unet.apply({"params": params}, x, t, context), unet.config.sample_size


def timed(fn, *args, repeat=7):
    """(first-call seconds, best warm seconds)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        warm.append(time.perf_counter() - t0)
    return first, min(warm)


def python_loop(model_fn, schedule, method, steps, schedule_kwargs, prediction_type):
    """The same sampler, one jitted step per Python iteration (the second code path)."""
    m = jd.samplers.get_method(method)
    grid = jd.samplers.make_grid(m, schedule, steps, **schedule_kwargs)
    plan = m.plan(grid, **{k: v for k, v in m.options.items() if k not in m.step_options})
    inputs = driver.step_inputs(grid, plan)
    coeffs = [{k: jnp.float32(v[i]) for k, v in inputs.items()} for i in range(steps)]
    k_noise = m.noises(m.options)

    denoise = driver.denoiser(model_fn, prediction_type)

    @jax.jit
    def step(state, c, key):
        noise = jax.random.normal(key, (k_noise,) + state["x"].shape)
        return m.step(state, c, denoise, noise, **{k: m.options[k] for k in m.step_options})[0]

    def run(noise, key):
        state = {"x": noise, **(m.init(noise) if m.init else {})}
        for i in range(steps):
            state = step(state, coeffs[i], jax.random.fold_in(key, i))
        return state["x"]

    return run


CALLS_PER_STEP = {"heun": 2.0, "flow_heun": 2.0, "langevin_pc": 2.0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    model_fn, size = shipped_model(args.batch)
    noise = jax.random.normal(jax.random.key(1), (args.batch, size, size, 4))
    key = jax.random.key(2)
    sd = jd.schedules.get("scaled_linear")
    flow = jd.schedules.get("flow_matching", shift=3.0)
    def model_only(x, steps):
        ts = jnp.linspace(999.0, 0.0, steps)
        return jax.lax.scan(lambda x, t: (model_fn(x, jnp.broadcast_to(t, x.shape[:1])), None), x, ts)[0]

    n_base = 40
    _, base = timed(jax.jit(lambda x: model_only(x, n_base)), noise)
    model_ms = base / n_base * 1e3

    rows = []
    for method in jd.samplers.METHODS:
        schedule, pt = (flow, "flow") if method.startswith("flow_") else (sd, "epsilon")
        steps = min(args.steps, 50) if method != "lcm" else 4

        def scanned(fn):
            return jax.jit(lambda noise, key: jd.samplers.sample(fn, schedule, noise, key=key, method=method,
                                                                 steps=steps, prediction_type=pt))
        first, warm = timed(scanned(model_fn), noise, key)
        _, alone = timed(scanned(lambda x, t: 0.5 * x), noise, key)
        loop = python_loop(model_fn, schedule, method, steps, {}, pt)
        _, loop_warm = timed(loop, noise, key)
        calls = CALLS_PER_STEP.get(method, 1.0) - (1.0 / steps if method in ("heun", "flow_heun") else 0.0)
        scan_ms, alone_ms, loop_ms = warm / steps * 1e3, alone / steps * 1e3, loop_warm / steps * 1e3
        rows.append((method, steps, first - warm, scan_ms, model_ms * calls, alone_ms, loop_ms))
        print(f"{method:16s} done", flush=True)

    header = ("| sampler | steps | compile s | scan ms/step | model ms/step | sampler alone ms/step | "
              "sampler alone / model | loop ms/step |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {m} | {n} | {c:.2f} | {s:.2f} | {mo:.2f} | {a:.3f} | {a / mo:.2%} | {lp:.2f} |"
             for m, n, c, s, mo, a, lp in rows]
    table = "\n".join([header, *lines])
    meta = (f"Latents [{args.batch}, {size}, {size}, 4], the shipped shapes U-Net model's U-Net "
            f"({model_ms:.2f} ms per call inside a scan), float32, jax {jax.__version__} on {jax.devices()[0].platform} "
            f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores). Sampler alone: the same "
            f"compiled scan with the model replaced by 0.5 * x, i.e. what the sampler's own per-step work and the "
            f"scan cost; scan - model differs from it only by timing noise (several percent on this shared machine).")
    print(meta)
    print(table)
    if not args.no_write:
        write_section("Samplers", f"`python benchmarks/bench_samplers.py --steps {args.steps} --batch {args.batch}`"
                                  f"\n\n{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
