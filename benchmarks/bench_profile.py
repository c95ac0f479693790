"""Where a U-Net training step spends its time, here (XLA's per-op trace) and in diffusers/torch (torch.profiler).

    python benchmarks/bench_profile.py [--batch 2] [--size 32] [--steps 5] [--no-write]

The model is bench_unet.py's SD-1.x-shaped U-Net (8.8 M params, self-attention over 1024 tokens at 32x32); one
step = forward + backward of the denoising MSE + AdamW, same weights both sides. jax: the compiled step is traced
with jax.profiler (one event per XLA thunk) and each thunk is put in a category from its HLO: convolutions by their
window (a backward convolution whose window is larger than the 3x3 kernels is a filter gradient, XLA's rewrite),
then by the flax module path in its metadata (attention = the ops of attn1 / attn2 other than the to_q / to_k /
to_v / to_out projections; norms; ops outside the U-Net = loss and optimizer). torch: self CPU time per aten op,
ops under optimizer.step() counted as the optimizer; torch reports one convolution_backward for the input and
filter gradients together. Prints the table and writes it to BENCHMARKS.md (section "Training step profile").
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
import jaxdiff as jd  # noqa: E402
from bench_unet import CONTEXT_LEN, DIFFUSERS_CONFIG  # noqa: E402
from report import write_section  # noqa: E402

CATEGORIES = ("convolution forward", "convolution input-grad", "convolution filter-grad", "convolution backward",
              "attention (QK, softmax, PV)", "linear layers (matmul)", "norms (GroupNorm, LayerNorm)",
              "copies and transposes", "elementwise (SiLU, residuals, ...)", "loss + optimizer (AdamW)")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
CONTAINERS = {"while", "call", "conditional"}  # their bodies' thunks are traced themselves


# ---------------------------------------------------------------------------------------------------- jax side
def parse_hlo(text: str):
    """{instruction: (opcode, op_name metadata, computation it calls, window)}, {computation: [(opcode, window)]}."""
    instructions, computations, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
        if header:
            current = header.group(1)
            continue
        m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(", line)
        if not m:
            continue
        name, opcode = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%([\w.\-]+)", line)
        window = re.search(r"window=\{size=([\dx]+)", line)
        window = window.group(1) if window else None
        instructions[name] = (opcode, op_name.group(1) if op_name else "", calls.group(1) if calls else None, window)
        computations[current].append((opcode, window))
    return instructions, computations


def jax_category(opcode, op_name, ops) -> str:
    """ops: (opcode, window) of the instruction itself and of everything in the fusion it calls."""
    convs = [w for o, w in ops if o == "convolution"]
    backward = "transpose(" in op_name
    if convs:
        if not backward:
            return "convolution forward"
        big = any(int(s) > 3 for w in convs for s in w.split("x"))
        return "convolution filter-grad" if big else "convolution input-grad"
    segments = op_name.split("/")
    if any(s.startswith("attn") for s in segments) and not any(s.startswith(PROJECTIONS) for s in segments):
        return "attention (QK, softmax, PV)"
    if any(o == "dot" for o, _ in ops):
        return "linear layers (matmul)"
    if all(o in ("copy", "transpose", "bitcast", "parameter", "reshape", "fusion") for o, _ in ops):
        return "copies and transposes"
    if "UNet2DCondition" not in op_name:
        return "loss + optimizer (AdamW)"
    if any(s.startswith("norm") or s == "conv_norm_out" for s in segments):
        return "norms (GroupNorm, LayerNorm)"
    return "elementwise (SiLU, residuals, ...)"


def jax_profile(unet, params, x, t, context, steps: int, trace_dir: str):
    opt = optax.adamw(1e-4)

    def step(params, opt_state, x):
        loss = lambda p: jnp.mean(jnp.square(unet.apply({"params": p}, x, t, context) - x))
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt.init(params), x).compile()
    instructions, computations = parse_hlo(compiled.as_text())
    state = (params, opt.init(params))
    for _ in range(2):
        state = jax.block_until_ready(compiled(*state, x))[:2]
    wall = []
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
        start = time.perf_counter()
        state = jax.block_until_ready(compiled(*state, x))[:2]
        wall.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    trace = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    seconds = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("name") not in instructions:
            continue
        opcode, op_name, calls, window = instructions[e["name"]]
        if opcode in CONTAINERS:
            continue
        ops = [(opcode, window)] + (computations.get(calls, []) if calls else [])
        seconds[jax_category(opcode, op_name, ops)] += e.get("dur", 0) / 1e6 / steps
    return seconds, float(np.median(wall))


# -------------------------------------------------------------------------------------------------- torch side
TORCH_OPS = (  # (category, substrings of aten op names), first match wins
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution", "conv2d")),
    ("attention (QK, softmax, PV)", ("scaled_dot_product", "flash_attention", "softmax", "bmm", "baddbmm")),
    ("linear layers (matmul)", ("addmm", "aten::mm", "aten::linear", "matmul")),
    ("norms (GroupNorm, LayerNorm)", ("group_norm", "layer_norm")),
    ("copies and transposes", ("copy_", "clone", "contiguous", "transpose", "permute", "_to_copy", "cat")),
)


def torch_category(name: str) -> str:
    for category, keys in TORCH_OPS:
        if any(k in name for k in keys):
            return category
    return "elementwise (SiLU, residuals, ...)"


def torch_profile(model, x, t, context, steps: int):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xt, tt, ct = (torch.from_numpy(np.asarray(a)) for a in (np.moveaxis(x, -1, 1), t, context))

    def step():
        loss = torch.mean((model(xt, tt, ct).sample - xt) ** 2)
        opt.zero_grad()
        loss.backward()
        with torch.profiler.record_function("optimizer"):
            opt.step()

    for _ in range(2):
        step()
    wall = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            wall.append(time.perf_counter() - start)
    seconds = collections.Counter()
    for e in prof.events():
        if e.name == "optimizer" or not e.name.startswith("aten::"):
            continue
        parent, in_optimizer = e.cpu_parent, False
        while parent is not None:
            in_optimizer |= parent.name == "optimizer"
            parent = parent.cpu_parent
        category = "loss + optimizer (AdamW)" if in_optimizer else torch_category(e.name)
        seconds[category] += e.self_cpu_time_total / 1e6 / steps
    return seconds, float(np.median(wall))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 4)).astype(np.float32)
    t = np.linspace(1, 999, args.batch).astype(np.int64)
    context = rng.standard_normal((args.batch, CONTEXT_LEN, DIFFUSERS_CONFIG["cross_attention_dim"])).astype(
        np.float32)
    try:
        import torch
        from diffusers import UNet2DConditionModel
    except ImportError:
        sys.exit("bench_profile compares against diffusers/torch: pip install torch diffusers")
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = UNet2DConditionModel(**DIFFUSERS_CONFIG).train()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        unet, params = jd.convert.from_diffusers(tmp)
        ours, our_wall = jax_profile(unet, params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context), args.steps,
                                     os.path.join(tmp, "trace"))
    theirs, their_wall = torch_profile(model, x, t, context, args.steps)

    def cell(seconds, category, total):
        return f"{seconds[category] * 1e3:.1f} ({seconds[category] / total:.0%})" if category in seconds else "-"

    rows = ["| category | jaxdiff ms (share) | diffusers/torch ms (share) |", "|---|---:|---:|"]
    total_ours, total_theirs = sum(ours.values()), sum(theirs.values())
    for category in CATEGORIES:
        if category in ours or category in theirs:
            rows.append(f"| {category} | {cell(ours, category, total_ours)} | {cell(theirs, category, total_theirs)} |")
    rows += [f"| sum of ops | {total_ours * 1e3:.1f} | {total_theirs * 1e3:.1f} |",
             f"| step, wall clock (median) | {our_wall * 1e3:.1f} | {their_wall * 1e3:.1f} |"]
    body = "\n".join([
        f"`python benchmarks/bench_profile.py --batch {args.batch} --size {args.size} --steps {args.steps}` - "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, torch {torch.__version__}.", "",
        f"bench_unet.py's U-Net, x [{args.batch}, {args.size}, {args.size}, 4], one training step (forward + backward "
        f"+ AdamW), time per step by op category (jax: XLA thunks from jax.profiler; torch: aten self CPU time, "
        f"whose convolution_backward is both gradients). Profiling adds time on both sides: compare shares, and the "
        f"wall clock row for speed.", "", *rows])
    print(body)
    if not args.no_write:
        write_section("Training step profile", body)


if __name__ == "__main__":
    main()
