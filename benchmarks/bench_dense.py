"""A linear layer's backward pass on XLA:CPU: [B, L, in] x [in, out] as it is vs with the leading axes merged.

    python benchmarks/bench_dense.py [--repeats 10]

The minimal reproduction behind `jaxdiff.models.layers.flat_dot_general`: a 4-block residual MLP
(x + gelu(x W1) W2, width 256, hidden 1024) in plain jax, forward and forward + backward (gradient of mean(out^2)
wrt the kernels), each matmul either on the [B, L, in] activation ("3-D", what flax's nn.Dense does) or on it
reshaped to [B*L, in] ("merged"). Same values; prints a table and writes it to BENCHMARKS.md ("Linear layers").
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
from report import write_section  # noqa: E402


def mlp(merged: bool):
    def matmul(h, w):
        return (h.reshape(-1, h.shape[-1]) @ w).reshape(h.shape[:-1] + w.shape[1:]) if merged else h @ w

    def net(params, x):
        for w1, w2 in params:
            x = x + matmul(jax.nn.gelu(matmul(x, w1)), w2)
        return x
    return net


def best_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = ["| activation [B, L, D] | matmul | forward ms | fwd+bwd ms | fwd+bwd / forward |", "|---|---|---:|---:|---:|"]
    for shape in ((2, 256, 256), (32, 64, 256), (8, 512, 256)):
        keys = jax.random.split(jax.random.key(0), 9)
        d = shape[-1]
        params = [(0.02 * jax.random.normal(keys[2 * i], (d, 4 * d)), 0.02 * jax.random.normal(keys[2 * i + 1], (4 * d, d)))
                  for i in range(4)]
        x = jax.random.normal(keys[8], shape)
        outs = {}
        for merged in (False, True):
            net = mlp(merged)
            forward = jax.jit(net)
            train = jax.jit(jax.grad(lambda p, x, net=net: jnp.mean(jnp.square(net(p, x)))))
            outs[merged] = train(params, x)
            fwd, both = best_ms(forward, params, x, repeats=args.repeats), best_ms(train, params, x, repeats=args.repeats)
            rows.append(f"| {list(shape)} | {'merged [B*L, D]' if merged else '3-D'} | {fwd:.2f} | {both:.2f} | "
                        f"{both / fwd:.1f} |")
        diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in
                   zip(jax.tree.leaves(outs[False]), jax.tree.leaves(outs[True])))
        assert diff < 1e-4, diff
    body = "\n".join([
        f"`python benchmarks/bench_dense.py --repeats {args.repeats}` - {platform.machine()}, {os.cpu_count()} CPU "
        f"cores, jax {jax.__version__}.", "",
        "A 4-block residual MLP (width 256, hidden 1024) in plain jax, its matmuls on the [B, L, D] activation as it "
        "is or reshaped to [B*L, D] (the same values; gradients agree to 1e-4 relative). Best of "
        f"{args.repeats}. The merged form is what `jaxdiff.models.layers.flat_dot_general` does for every linear layer.",
        "", *rows])
    print(body)
    if not args.no_write:
        write_section("Linear layers", body)


if __name__ == "__main__":
    main()
