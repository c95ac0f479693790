"""The train step: one pure function (state, frozen, batch) -> (state, metrics), jitted once
with NamedSharding in/out shardings and the state donated.

A recipe supplies only its loss, `loss_fn(params, frozen, batch, key, step) -> (loss, metrics)`;
everything else (accumulation, the optimizer, EMA, step count) is here and shared.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdiff.training.ema import ema_update
from jaxdiff.training.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict]]


def micro_batches(batch, k: int):
    """[B, ...] leaves -> [k, B/k, ...]; micro-batch j takes rows j, j+k, j+2k, ... so that, with the
    batch split over devices, every micro-batch is spread over all of them."""
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def accumulate_grads(loss_fn: LossFn, params, frozen, batch, key, step, k: int):
    """Mean loss, metrics and gradients over k equal micro-batches (one `lax.scan`), which equal
    those of the whole batch for a loss that is a mean over examples. Micro-batch j draws its
    randomness from fold_in(key, j). k = 1 is the plain gradient."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        (loss, metrics), grads = grad_fn(params, frozen, batch, key, step)
        return loss, metrics, grads

    def body(carry, xs):
        j, micro = xs
        (loss, metrics), grads = grad_fn(params, frozen, micro, jax.random.fold_in(key, j), step)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    micro = micro_batches(batch, k)
    shapes = jax.eval_shape(grad_fn, params, frozen, jax.tree.map(lambda x: x[0], micro), key, step)
    (loss, metrics), grads = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads), (jnp.arange(k), micro))
    return jax.tree.map(lambda x: x / k, (loss, metrics, grads))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, ema_decay: float,
                    accumulate: int = 1, lr_fn: Callable | None = None):
    """The pure step. Metrics: the recipe's, plus loss, grad_norm (before clipping) and lr."""

    def train_step(state: TrainState, frozen: Any, batch: dict):
        loss, metrics, grads = accumulate_grads(loss_fn, state.params, frozen, batch, state.key(), state.step,
                                                accumulate)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        if lr_fn is not None:
            metrics["lr"] = lr_fn(state.step)
        new = state.replace(step=state.step + 1, params=params, ema=ema_update(state.ema, params, ema_decay),
                            opt_state=opt_state)
        return new, metrics

    return train_step


def jit_train_step(train_step, mesh, rules, state_shardings, frozen_shardings, batch_shardings):
    """jax.jit with NamedSharding in/out shardings (the optimizer state too: without an out
    sharding it would come back replicated) and the state donated. Metrics come back replicated.
    The mesh and logical rules are in scope while tracing, for the models' activation constraints.
    Returns step(state, frozen, batch) -> (state, metrics); step.lower(same arguments) -> the lowered program."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    def step(state, frozen, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, frozen, batch)

    def lower(state, frozen, batch):
        """The step lowered for these arguments, e.g. for `.compile().memory_analysis()` (benchmarks)."""
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(state, frozen, batch)

    step.lower = lower
    return step
