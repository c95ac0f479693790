"""The 2-D toy (`jaxdiff.toy2d`'s dataset and MLP denoiser) through the real trainer.

config.model: hidden, sample_steps and the `Objective` fields (schedule, prediction_type, weighting, ...).
The sample "grid" is a 2-D histogram of DDPM samples, drawn as an image.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff import samplers
from jaxdiff.toy2d import MLPDenoiser
from jaxdiff.training.recipes.diffusion.objective import Objective
from jaxdiff.training.task import Task, init_boxed

EXTENT = 3.5  # the histogram covers [-EXTENT, EXTENT]^2


def histogram_image(points, bins: int = 64):
    """points [N, 2] -> [1, bins, bins, 3] in [0, 1], dark where samples are dense."""
    idx = jnp.clip(((points + EXTENT) / (2 * EXTENT) * bins).astype(jnp.int32), 0, bins - 1)
    counts = jnp.zeros((bins, bins)).at[bins - 1 - idx[:, 1], idx[:, 0]].add(1.0)
    shade = 1.0 - jnp.sqrt(counts / jnp.maximum(counts.max(), 1.0))
    return jnp.broadcast_to(shade[None, :, :, None], (1, bins, bins, 3))


def build(c, spec) -> Task:
    m = c.model
    objective = Objective.of(m)
    schedule = objective.make_schedule()
    net = MLPDenoiser(hidden=m.hidden)

    def init(key):
        return init_boxed(net, key, jnp.zeros((1, 2)), jnp.zeros((1,)))

    def loss(params, frozen, batch, key, step):
        apply_fn = lambda x, t, ctx: net.apply({"params": params}, x, t)
        return objective.loss(apply_fn, batch["x"], key, schedule), {}

    def sample(params, frozen, key):
        noise = jax.random.normal(key, (2048, 2))
        x = samplers.sample(lambda x, t: net.apply({"params": params}, x, t), schedule, noise,
                            key=jax.random.fold_in(key, 1), method="ddpm", steps=m.sample_steps,
                            prediction_type=m.prediction_type)
        return histogram_image(x)

    return Task(init=init, loss=loss, sample=sample)
