"""Data benchmark: generation, grain loading and ShapesEval throughput, and whether the
loader keeps a small training step fed.

    python benchmarks/bench_data.py [--train_size 4000] [--batches 40]

Prints a table and writes it to BENCHMARKS.md (section "Data pipeline").
Throughputs are examples per second on this machine; never used as a test.
"""
import argparse
import os
import platform
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_section  # noqa: E402


def rate(n, seconds):
    return n / seconds if seconds > 0 else float("inf")


def bench_render(n: int):
    from jaxdiff.data import render
    t = time.perf_counter()
    for i in range(n):
        render.render(render.scene_at(0, 0, i).objects, 64)
    images = rate(n, time.perf_counter() - t)
    m = max(n // 16, 1)
    t = time.perf_counter()
    for i in range(m):
        render.render_video(render.motion_at(0, 0, i, 16).objects, 16, 64)
    return images, rate(m, time.perf_counter() - t)


def bench_prepare(name: str, n: int, data_dir: str):
    import tensorflow_datasets as tfds
    t = time.perf_counter()
    tfds.builder(name, data_dir=data_dir).download_and_prepare()
    return rate(n, time.perf_counter() - t)


def bench_loader(cfg, batches: int):
    """(seconds to the first batch, examples/s over the next `batches`)."""
    from jaxdiff.data.pipeline import make_iterator
    t = time.perf_counter()
    it = make_iterator(cfg)
    next(it)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    speed = rate(batches * cfg.batch_size, time.perf_counter() - t)
    if hasattr(it, "close"):
        it.close()
    return first, speed


def small_train_step():
    """A two-conv denoiser, SGD on an x0-MSE: a stand-in 'small training step'."""
    import jax
    import jax.numpy as jnp

    def loss(params, x, key):
        noisy = x + 0.5 * jax.random.normal(key, x.shape)
        h = jax.nn.silu(jax.lax.conv_general_dilated(noisy, params["w1"], (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        y = jax.lax.conv_general_dilated(h, params["w2"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean((y - x) ** 2)

    @jax.jit
    def step(params, x, key):
        g = jax.grad(loss)(params, x, key)
        return jax.tree.map(lambda p, d: p - 1e-3 * d, params, g)

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": 0.1 * jax.random.normal(k1, (3, 3, 3, 16)),
              "w2": 0.1 * jax.random.normal(k2, (3, 3, 16, 3))}
    return step, params


def bench_fed(cfg, steps: int):
    """Steps/s on one resident batch vs steps/s pulling every batch from the loader."""
    import jax
    from jaxdiff.data.pipeline import global_batch, make_iterator
    step, params = small_train_step()
    it = make_iterator(cfg)
    x = global_batch(next(it))["image"]
    key = jax.random.key(1)
    for i in range(3):  # compile and warm up
        params = step(params, x, jax.random.fold_in(key, i))
    jax.block_until_ready(params)
    t = time.perf_counter()
    for i in range(steps):
        params = step(params, x, jax.random.fold_in(key, i))
    jax.block_until_ready(params)
    alone = rate(steps, time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(steps):
        params = step(params, global_batch(next(it))["image"], jax.random.fold_in(key, i))
    jax.block_until_ready(params)
    fed = rate(steps, time.perf_counter() - t)
    if hasattr(it, "close"):
        it.close()
    return alone, fed


def bench_eval(n: int):
    from jaxdiff.data import eval as ev
    from jaxdiff.data import render
    prompts = ev.heldout_prompts(n // 4)
    images = [render.render(render.scene_at(0, 2, i).objects, 64) for i in range(len(prompts))]
    t = time.perf_counter()
    result = ev.evaluate(prompts, images)
    return rate(len(prompts), time.perf_counter() - t), result["overall"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train_size", type=int, default=4000)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jax
    import jaxdiff.data.pipeline  # noqa: F401  registers the builders
    from jaxdiff.data.pipeline import DataConfig

    n = args.train_size
    shapes = f"shapes/64px-{n}-8-8-seed0"
    videos = f"moving_shapes/64px-16f-{n // 16}-2-2-seed0"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        img_rate, vid_rate = bench_render(n // 4)
        rows.append(("render shapes 64px (NumPy)", "-", f"{img_rate:,.0f}"))
        rows.append(("render moving_shapes 64px x 16 frames", "-", f"{vid_rate:,.0f}"))
        rows.append((f"prepare {shapes} (tfds, array_record)", "-",
                     f"{bench_prepare(shapes, n + 16, d):,.0f}"))
        rows.append((f"prepare {videos}", "-", f"{bench_prepare(videos, n // 16 + 4, d):,.0f}"))
        for workers in (0, 1, 2):
            cfg = DataConfig(name=shapes, data_dir=d, batch_size=64, worker_count=workers)
            first, speed = bench_loader(cfg, args.batches)
            rows.append((f"load shapes, batch 64, worker_count={workers}", f"{first:.2f}", f"{speed:,.0f}"))
        for workers in (0, 1):
            cfg = DataConfig(name=videos, data_dir=d, batch_size=8, worker_count=workers)
            first, speed = bench_loader(cfg, args.batches)
            rows.append((f"load moving_shapes, batch 8, worker_count={workers}", f"{first:.2f}", f"{speed:,.0f}"))
        eval_rate, overall = bench_eval(400)
        rows.append((f"ShapesEval analyser, 64px (overall {overall:.3f})", "-", f"{eval_rate:,.0f}"))
        fed = []
        for workers in (0, 1):
            cfg = DataConfig(name=shapes, data_dir=d, batch_size=64, worker_count=workers)
            alone, with_loader = bench_fed(cfg, args.steps)
            fed.append(f"| {workers} | {alone:.1f} | {alone * 64:,.0f} | {with_loader:.1f} | "
                       f"{with_loader / alone:.0%} |")

    load = os.getloadavg()[0]
    table = "\n".join(["| what | first batch s | examples/s |", "|---|---:|---:|"]
                      + [f"| {a} | {b} | {c} |" for a, b, c in rows])
    fed_table = "\n".join(["| worker_count | steps/s, resident batch | examples/s it consumes "
                           "| steps/s, fed by the loader | fed / resident |",
                           "|---:|---:|---:|---:|---:|", *fed])
    body = (f"`python benchmarks/bench_data.py --train_size {n} --batches {args.batches} "
            f"--steps {args.steps}` - {platform.machine()}, {os.cpu_count()} CPU cores (load "
            f"average {load:.1f} at the end: the machine is shared), jax {jax.__version__}, "
            f"{jax.default_backend()}.\n\n"
            "Generation and loading of the built-in datasets (64x64; videos 16 frames). "
            "Loading = tfds array_record data source + grain: shuffle, decode, normalise "
            "to [-1, 1], batch; worker_count=0 reads with threads in the main process.\n\n"
            f"{table}\n\n"
            "Keeping a small training step fed: a jitted two-conv (3-16-3 channels) denoiser "
            "step (SGD, batch [64, 64, 64, 3], float32) on one resident batch, then pulling every batch from "
            "the loader in the same loop.\n\n"
            f"{fed_table}\n\n"
            "Worker processes move each batch through shared memory and compete with the "
            "step for cores; they pay off only where spare cores exist.\n")
    print(body)
    write_section("Data pipeline", body)


if __name__ == "__main__":
    main()
