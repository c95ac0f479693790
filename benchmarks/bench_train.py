"""Training speed of the shapes latent-diffusion U-Net here vs the same U-Net trained with
diffusers/torch on this CPU, in one run; achieved FLOP/s against this machine's matmul peak.

    python benchmarks/bench_train.py [--batch 16] [--steps 10]

Rows:
  jaxdiff recipe step   the whole `configs/latent_diffusion.py` train step (frozen VAE encode +
                        CLIP text encoder + U-Net fwd/bwd + AdamW + EMA) through jaxdiff.training
  jaxdiff U-Net step    U-Net denoising loss fwd/bwd + AdamW on latents and context (jit)
  diffusers U-Net step  the same U-Net config in torch (UNet2DConditionModel + torch.optim.AdamW)
GFLOP/s: XLA's cost analysis of the jax U-Net step (the same FLOPs are credited to torch) / time.
Peak: best of float32 2048^2 matmuls with jnp.dot. Steps and implementations are timed in turn
(best of --steps warm steps). Writes the table to BENCHMARKS.md (section "Training").
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(__file__)]
from configs.latent_diffusion import get_config  # noqa: E402
from jaxdiff import diffusion, losses, parallel, schedules  # noqa: E402
from jaxdiff.models import UNet2DCondition, UNetConfig  # noqa: E402
from jaxdiff.training import recipes  # noqa: E402
from jaxdiff.training.data import make_batches  # noqa: E402
from jaxdiff.training.loop import _put, _setup_state  # noqa: E402
from jaxdiff.training.optim import lr_schedule, make_optimizer  # noqa: E402
from jaxdiff.training.steps import jit_train_step, make_train_step  # noqa: E402
from report import program_flops, write_section  # noqa: E402


def matmul_peak(n=2048, repeats=5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def recipe_step(batch: int):
    """The full shapes recipe step on synthetic 32x32 squares (frozen parts randomly initialised)."""
    c = get_config("shapes")
    c.batch_size = batch
    c.data = type(c.data)(dict(source="squares", image_size=32))
    c.model.vae.checkpoint = c.model.text_encoder.checkpoint = ""
    batches, spec = make_batches(c.data, c.batch_size, 0)
    task = recipes.build(c, spec)
    opt = make_optimizer(c.optim, c.steps)
    mesh = parallel.make_mesh(c.mesh)
    rules = parallel.check_rules(c.rules)
    state, sh = _setup_state(c, task, opt, mesh, rules)
    fsh = parallel.shardings_for(task.frozen, mesh, rules)
    frozen = _put(nn.meta.unbox(task.frozen), fsh)
    step = jit_train_step(make_train_step(task.loss, opt, ema_decay=c.ema_decay, lr_fn=lr_schedule(c.optim, c.steps)),
                          mesh, rules, sh, fsh, None)
    data = parallel.global_batch(next(batches), mesh)
    box = [state]

    def run():
        box[0], m = step(box[0], frozen, data)
        jax.block_until_ready(m)
    return run, c


def unet_config(c) -> dict:
    return dict(c.model.unet.to_dict(), in_channels=4, out_channels=4, sample_size=16)


def jax_unet_step(c, batch: int, ctx_len: int):
    cfg = UNetConfig(**unet_config(c))
    net = UNet2DCondition(cfg)
    x = jnp.ones((batch, 16, 16, 4))
    ctx = jnp.ones((batch, ctx_len, cfg.cross_attention_dim))
    params = nn.meta.unbox(net.init(jax.random.key(0), x, jnp.zeros((batch,)), ctx)["params"])
    sched = schedules.get("scaled_linear")
    opt = optax.adamw(1e-4)
    state = [params, opt.init(params)]

    @jax.jit
    def step(params, opt_state, key):
        k1, k2 = jax.random.split(key)
        t = losses.sample_timesteps(k1, batch, sched)
        noise = jax.random.normal(k2, x.shape)
        xt = diffusion.q_sample(sched, x, t, noise)
        loss_fn = lambda p: losses.diffusion_loss(net.apply({"params": p}, xt, t, ctx), x, noise, t, sched)[0]
        loss, g = jax.value_and_grad(loss_fn)(params)
        up, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, up), opt_state, loss

    flops = program_flops(step, params, state[1], jax.random.key(0))
    n_params = sum(p.size for p in jax.tree.leaves(params))

    def run():
        state[0], state[1], loss = step(state[0], state[1], jax.random.key(1))
        loss.block_until_ready()
    return run, flops, n_params


def torch_unet_step(c, batch: int, ctx_len: int):
    import torch
    from diffusers import UNet2DConditionModel

    cfg = unet_config(c)
    heads = cfg.pop("num_attention_heads")
    model = UNet2DConditionModel(**cfg, attention_head_dim=heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.ones(batch, 4, 16, 16)
    ctx = torch.ones(batch, ctx_len, cfg["cross_attention_dim"])
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0).float()

    def run():
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x)
        a = ac[t].sqrt()[:, None, None, None]
        s = (1 - ac[t]).sqrt()[:, None, None, None]
        out = model(a * x + s * noise, t, ctx).sample
        loss = torch.mean((out - noise) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    c_run, c = recipe_step(args.batch)
    runners = {"jaxdiff recipe step": c_run}
    unet_run, flops, n_params = jax_unet_step(c, args.batch, 16)
    runners["jaxdiff U-Net step"] = unet_run
    try:
        runners["diffusers U-Net step"] = torch_unet_step(c, args.batch, 16)
    except ImportError as e:
        print(f"skipping diffusers/torch: {e}")
    for run in runners.values():
        run()  # compile / warm up
    times = {k: [] for k in runners}
    for _ in range(args.steps):
        for k, run in runners.items():
            times[k].append(_timed(run))
    peak = matmul_peak()
    rows = ["| step | steps/s | examples/s | GFLOP/s | fraction of matmul peak |", "|---|---|---|---|---|"]
    for k, ts in times.items():
        best = min(ts)
        gflops = flops / best / 1e9 if "U-Net" in k else float("nan")
        frac = f"{flops / best / peak:.2f}" if "U-Net" in k else "-"
        rows.append(f"| {k} | {1 / best:.2f} | {args.batch / best:.1f} | "
                    f"{'-' if 'recipe' in k else f'{gflops:.1f}'} | {frac} |")
    body = "\n".join([
        f"`python benchmarks/bench_train.py --batch {args.batch} --steps {args.steps}` on {platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs while measured: treat as indicative), jax {jax.__version__}.",
        f"U-Net of `configs/latent_diffusion.py` ({n_params / 1e6:.2f} M params) on 16x16x4 latents, context "
        f"[B, 16, 128]; {flops / 1e9:.1f} GFLOP per U-Net train step (XLA cost analysis); float32 matmul peak "
        f"{peak / 1e9:.0f} GFLOP/s (jnp.dot 2048^2). Best of {args.steps} warm steps, timed in turn.", "",
        *rows])
    print(body)
    if not args.no_write:
        write_section("Training", body)


if __name__ == "__main__":
    main()
