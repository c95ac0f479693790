"""The 2-D toy: diffusion as a random walk, reversed.

Trains a small MLP denoiser on a 2-D point cloud, then plots to one PNG:
the data, DDPM samples (noise re-injected at every step, reproducing the data), the same
DDPM steps without the noise (every path slides to a posterior mean and the cloud collapses
toward the centre), sample trajectories, and the learned probability-flow vector field.

    python -m jaxdiff.toy2d --dataset gaussians8 --out toy2d.png
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdiff as jd

DATASETS = ("gaussians8", "moons", "spiral")


def make_dataset(name: str, n: int, seed: int = 0) -> np.ndarray:
    """[n, 2] float32 points, roughly unit scale."""
    rng = np.random.default_rng(seed)
    if name == "gaussians8":
        angle = rng.integers(0, 8, n) * (2 * np.pi / 8)
        pts = 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.1 * rng.standard_normal((n, 2))
    elif name == "moons":
        upper = rng.random(n) < 0.5
        th = rng.random(n) * np.pi
        pts = np.where(upper[:, None], np.stack([np.cos(th), np.sin(th)], 1),
                       np.stack([1 - np.cos(th), 0.5 - np.sin(th)], 1))
        pts = (pts - [0.5, 0.25]) * 1.5 + 0.05 * rng.standard_normal((n, 2))
    elif name == "spiral":
        r = np.sqrt(rng.random(n)) * 3.0 * np.pi
        pts = np.stack([r * np.cos(r), r * np.sin(r)], 1) / 4.0 + 0.05 * rng.standard_normal((n, 2))
    else:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return pts.astype(np.float32)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of t [B] -> [B, dim] (Vaswani et al.; as DDPM's)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t) for 2-D points: time-conditioned residual MLP."""

    hidden: int = 128
    depth: int = 3

    @nn.compact
    def __call__(self, x, t):
        temb = nn.Dense(self.hidden)(nn.silu(nn.Dense(self.hidden)(timestep_embedding(t, 64))))
        h = nn.Dense(self.hidden)(x)
        for _ in range(self.depth):
            h = h + nn.Dense(self.hidden)(nn.silu(nn.LayerNorm()(h) + temb))
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(nn.silu(h))


def train(data: np.ndarray, schedule, *, steps: int = 3000, batch: int = 512, lr: float = 2e-3, hidden: int = 128,
          seed: int = 0, log_every: int = 0):
    """Trains eps-prediction with L_simple; returns (model, params, losses)."""
    model = MLPDenoiser(hidden=hidden)
    key = jax.random.key(seed)
    params = model.init(key, jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr * 0.05))
    opt_state = opt.init(params)
    data = jnp.asarray(data)

    @jax.jit
    def step(params, opt_state, key):
        k_idx, k_t, k_eps = jax.random.split(key, 3)
        x0 = data[jax.random.randint(k_idx, (batch,), 0, data.shape[0])]
        t = jd.losses.sample_timesteps(k_t, batch, schedule)
        noise = jax.random.normal(k_eps, x0.shape)
        xt = jd.diffusion.q_sample(schedule, x0, t, noise)

        def loss_fn(p):
            return jd.losses.diffusion_loss(model.apply({"params": p}, xt, t), x0, noise, t, schedule)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
        losses.append(loss)
        if log_every and (i + 1) % log_every == 0:
            print(f"step {i + 1:5d}  loss {float(loss):.4f}", flush=True)
    return model, params, np.asarray(jnp.stack(losses))


def ddpm_samples(model, params, schedule, n: int, steps: int, seed: int, with_noise: bool = True):
    """DDPM ancestral samples; with_noise=False runs the same steps with the fresh noise set to zero."""
    model_fn = lambda x, t: model.apply({"params": params}, x, t)
    noise = jax.random.normal(jax.random.key(seed), (n, 2))
    zeros = None if with_noise else jnp.zeros((steps, 1, n, 2))
    return jd.samplers.sample(model_fn, schedule, noise, key=jax.random.key(seed + 1), method="ddpm", steps=steps,
                              step_noise=zeros, return_trajectory=True)


def plot(path: str, data, samples, collapsed, trajectory, model, params, schedule, title: str):
    """Writes the five-panel figure to `path` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 5, figsize=(22, 4.6))
    lim = float(np.abs(data).max()) * 1.3
    for a, pts, name in ((ax[0], data, "data"), (ax[1], samples, "DDPM (noise re-injected)"),
                         (ax[2], collapsed, "same steps, no noise: collapse")):
        a.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        a.set_title(name)
    paths = np.asarray(trajectory)[:, :24]  # [steps, paths, 2]
    for k in range(paths.shape[1]):
        ax[3].plot(paths[:, k, 0], paths[:, k, 1], lw=0.7, alpha=0.8)
        ax[3].scatter(paths[-1, k, 0], paths[-1, k, 1], s=8, c="k")
    ax[3].set_title("DDPM trajectories (x_t per step)")
    g = np.linspace(-lim, lim, 21, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    t = 100
    eps = model.apply({"params": params}, jnp.asarray(grid), jnp.full((grid.shape[0],), t))
    score = -np.asarray(eps) / schedule.sigma[t]
    ax[4].quiver(grid[:, 0], grid[:, 1], score[:, 0], score[:, 1], angles="xy", scale_units="xy",
                 scale=np.abs(score).max() / (g[1] - g[0]) * 1.2)
    ax[4].scatter(data[:500, 0], data[:500, 1], s=1, c="r", alpha=0.3)
    ax[4].set_title(f"learned score field at t={t}")
    for a in ax:
        a.set_xlim(-lim, lim)
        a.set_ylim(-lim, lim)
        a.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdiff.toy2d", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="gaussians8", choices=DATASETS)
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="toy2d.png")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.train_steps < 1 or args.sample_steps < 1 or args.samples < 1:
        p.error("--train-steps, --sample-steps and --samples must be >= 1")
    if not args.out.lower().endswith(".png"):
        p.error(f"--out must be a .png file, got {args.out!r}")
    if os.path.exists(args.out) and not args.overwrite:
        p.error(f"{args.out!r} exists; pass --overwrite to replace it")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        p.error(f"cannot write to folder {out_dir!r}")

    schedule = jd.schedules.get("linear", 1000)
    data = make_dataset(args.dataset, 20000, args.seed)
    print(f"training an MLP denoiser on {args.dataset} for {args.train_steps} steps ...", flush=True)
    model, params, losses = train(data, schedule, steps=args.train_steps, seed=args.seed,
                                  log_every=max(args.train_steps // 5, 1))
    samples, traj = ddpm_samples(model, params, schedule, args.samples, args.sample_steps, args.seed)
    collapsed, _ = ddpm_samples(model, params, schedule, args.samples, args.sample_steps, args.seed, with_noise=False)
    spread = lambda x: float(np.sqrt(np.trace(np.cov(np.asarray(x).T))))
    print(f"spread (rms distance from the mean): data {spread(data):.3f}, DDPM {spread(samples):.3f}, "
          f"DDPM without noise {spread(collapsed):.3f}")
    plot(args.out, data, np.asarray(samples), np.asarray(collapsed), traj["x"], model, params, schedule,
         f"{args.dataset}: {args.train_steps} training steps, final loss {losses[-100:].mean():.3f}; "
         f"{args.sample_steps} DDPM steps")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
