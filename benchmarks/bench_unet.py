"""U-Net speed here vs diffusers/torch on the same small configuration and weights.

    python benchmarks/bench_unet.py [--batch 2] [--size 32] [--repeats 5]

Columns, per implementation and compute dtype:
  params     parameter count
  compile    seconds to trace + compile (jax only)
  forward    warm ms per forward pass (best of --repeats, implementations timed in turn)
  fwd+bwd    warm ms per forward + backward (gradient of a mean-square loss wrt all params)
  GFLOP/s    forward FLOPs (XLA's cost analysis of the jax forward) / forward time
  rel err    ||out - out_torch_fp32|| / ||out_torch_fp32|| on identical weights and inputs
Torch columns are skipped when torch/diffusers are not installed. Prints a table and writes
it to BENCHMARKS.md (section "U-Net").
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import jaxdiff as jd  # noqa: E402
from jaxdiff.models.layers import param_shapes  # noqa: E402
from jaxdiff.models import UNet2DCondition, UNetConfig  # noqa: E402
from report import program_flops, write_section  # noqa: E402

# An SD-1.x-shaped U-Net small enough for a CPU (8.8 M params, ~9 GFLOP per forward at batch 2, 32x32).
DIFFUSERS_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 192),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, attention_head_dim=4, cross_attention_dim=128, norm_num_groups=32)
CONTEXT_LEN = 16


def jax_runners(unet, params, x, t, context):
    """Compiles forward and forward+backward; returns (forward, train, compile seconds, forward FLOPs, output)."""
    forward = jax.jit(lambda p, x: unet.apply({"params": p}, x, t, context))
    loss = lambda p, x: jnp.mean(jnp.square(unet.apply({"params": p}, x, t, context).astype(jnp.float32)))
    train = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    compiled = forward.lower(params, x).compile()
    out = jax.block_until_ready(compiled(params, x))
    compile_s = time.perf_counter() - start
    flops = program_flops(forward, params, x)
    jax.block_until_ready(train(params, x))  # compile
    return (lambda: jax.block_until_ready(compiled(params, x)), lambda: jax.block_until_ready(train(params, x)),
            compile_s, flops, np.asarray(out, np.float32))


def torch_runners(model, x, t, context):
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    tt, ct = torch.from_numpy(np.asarray(t)), torch.from_numpy(np.asarray(context))

    def forward():
        with torch.no_grad():
            return model(xt, tt, ct).sample

    def train():
        model.zero_grad(set_to_none=True)
        torch.mean(model(xt, tt, ct).sample ** 2).backward()

    train()  # warm-up
    return forward, train, float("nan"), float("nan"), forward().numpy().transpose(0, 2, 3, 1)


def interleaved_times(runners: dict, repeats: int) -> dict:
    """Best-of-`repeats` ms per call, implementations timed in turn within each round, so that
    load from other processes on a shared machine hits them alike (the minimum is the least noisy)."""
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(ts) for name, ts in times.items()}


def rel_err(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 4)).astype(np.float32)
    t = np.linspace(1, 999, args.batch).astype(np.int64)
    context = rng.standard_normal((args.batch, CONTEXT_LEN, DIFFUSERS_CONFIG["cross_attention_dim"])).astype(np.float32)

    try:
        import torch
        from diffusers import UNet2DConditionModel
    except ImportError:
        torch = None

    if torch is not None:
        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count() or 1)
        model = UNet2DConditionModel(**DIFFUSERS_CONFIG).train()  # train(): dropout is 0, so only autograd differs
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            unet, params = jd.convert.from_diffusers(tmp)
    else:  # same architecture, random weights (a real init's RNG takes a minute to compile on CPU)
        unet = UNet2DCondition(UNetConfig.from_diffusers_config(DIFFUSERS_CONFIG))
        shapes = jax.tree.leaves(param_shapes(unet))
        keys = jax.random.split(jax.random.key(0), len(shapes))
        params = jax.tree.unflatten(jax.tree.structure(param_shapes(unet)),
                                    [0.05 * jax.random.normal(k, s.shape) for s, k in zip(shapes, keys)])
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

    impls = {name: jax_runners(unet.clone(dtype=dtype), params, x, t, context)
             for name, dtype in (("jaxdiff fp32", jnp.float32), ("jaxdiff bf16 compute", jnp.bfloat16))}
    if torch is not None:
        impls["diffusers/torch fp32"] = torch_runners(model, x, t, context)
    forward_ms = interleaved_times({name: r[0] for name, r in impls.items()}, args.repeats)
    train_ms = interleaved_times({name: r[1] for name, r in impls.items()}, args.repeats)
    flops = impls["jaxdiff fp32"][3]
    rows = []
    for name, (_, _, compile_s, _, out) in impls.items():
        err = f"{rel_err(out, impls['diffusers/torch fp32'][4]):.1e}" if torch is not None else "-"
        compile_col = "-" if np.isnan(compile_s) else f"{compile_s:.1f}"
        rows.append(f"| {name} | {n_params / 1e6:.2f} M | {compile_col} | {forward_ms[name]:.1f} | "
                    f"{train_ms[name]:.1f} | {flops / forward_ms[name] / 1e6:.1f} | {err} |")

    table = "\n".join([
        "| implementation | params | compile s | forward ms | fwd+bwd ms | GFLOP/s (fwd) | rel err vs torch |",
        "|---|---|---|---|---|---|---|", *rows])
    cfg = DIFFUSERS_CONFIG
    body = (f"`python benchmarks/bench_unet.py --batch {args.batch} --size {args.size} --repeats {args.repeats}` - "
            f"{platform.machine()}, {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the end: "
            f"the machine is shared), jax {jax.__version__}"
            f"{', torch ' + torch.__version__ if torch is not None else ''}.\n\n"
            f"SD-1.x-shaped U-Net: block_out_channels={cfg['block_out_channels']}, layers_per_block="
            f"{cfg['layers_per_block']}, {cfg['attention_head_dim']} heads, cross_attention_dim="
            f"{cfg['cross_attention_dim']}; x [{args.batch}, {args.size}, {args.size}, 4], context "
            f"[{args.batch}, {CONTEXT_LEN}, {cfg['cross_attention_dim']}]. Same weights on both sides; times are the "
            f"best of {args.repeats} warm runs, implementations interleaved; forward FLOPs {flops / 1e9:.2f} G (XLA cost analysis). "
            f"bf16 compute keeps fp32 params, norm statistics and softmax in fp32.\n\n{table}\n")
    print(table)
    write_section("U-Net", body)


if __name__ == "__main__":
    main()
