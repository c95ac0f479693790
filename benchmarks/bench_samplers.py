"""Sampler costs: per-step overhead beyond the model, one lax.scan vs a Python loop, compile time.

    python benchmarks/bench_samplers.py [--steps 20] [--batch 4] [--size 64]

For every sampler, on latents [B, size, size, 4] with a small conv model:
  compile   seconds to trace + compile the whole run (first call minus a warm call)
  scan      warm ms per step of the whole run as one jitted lax.scan
  model     warm ms per model call when the model alone is scanned over the same steps (x <- model(x, t)),
            times the sampler's calls per step
  overhead  scan - model: what the sampler itself costs per step
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
from jaxdiff.samplers import driver  # noqa: E402
from report import write_section  # noqa: E402


def conv_model(key, channels=4, hidden=64):
    """A stand-in denoiser with a realistic memory footprint per call: two 3x3 convs."""
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (3, 3, channels, hidden)) * 0.05
    w2 = jax.random.normal(k2, (3, 3, hidden, channels)) * 0.05

    def model_fn(x, t):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=dn)
        h = jax.nn.silu(h + jnp.sin(t[:, None, None, None] / 1000.0))
        return jax.lax.conv_general_dilated(h, w2, (1, 1), "SAME", dimension_numbers=dn)

    return model_fn


def timed(fn, *args, repeat=3):
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


CALLS_PER_STEP = {"heun": 2.0, "langevin_pc": 2.0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    model_fn = conv_model(jax.random.key(0))
    noise = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 4))
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
        schedule, pt = (flow, "flow") if method == "flow_euler" else (sd, "epsilon")
        steps = min(args.steps, 50) if method != "lcm" else 4
        run = jax.jit(lambda noise, key: jd.samplers.sample(model_fn, schedule, noise, key=key, method=method,
                                                            steps=steps, prediction_type=pt))
        first, warm = timed(run, noise, key)
        loop = python_loop(model_fn, schedule, method, steps, {}, pt)
        _, loop_warm = timed(loop, noise, key)
        calls = CALLS_PER_STEP.get(method, 1.0) - (1.0 / steps if method == "heun" else 0.0)
        scan_ms, loop_ms = warm / steps * 1e3, loop_warm / steps * 1e3
        rows.append((method, steps, first - warm, scan_ms, model_ms * calls, scan_ms - model_ms * calls, loop_ms))
        print(f"{method:16s} done", flush=True)

    header = ("| sampler | steps | compile s | scan ms/step | model ms/step | overhead ms/step | loop ms/step |\n"
              "|---|---|---|---|---|---|---|")
    lines = [f"| {m} | {n} | {c:.2f} | {s:.2f} | {mo:.2f} | {o:+.2f} | {lp:.2f} |" for m, n, c, s, mo, o, lp in rows]
    table = "\n".join([header, *lines])
    meta = (f"Latents [{args.batch}, {args.size}, {args.size}, 4], a two-conv stand-in model "
            f"({model_ms:.2f} ms per call inside a scan), float32, jax {jax.__version__} on {jax.devices()[0].platform} "
            f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores). Overhead = scan - model; "
            f"within timing noise it can read slightly negative.")
    print(meta)
    print(table)
    if not args.no_write:
        write_section("Samplers", f"`python benchmarks/bench_samplers.py`\n\n{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
