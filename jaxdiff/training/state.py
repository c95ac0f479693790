"""The train state: everything a step reads and writes, one pytree."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct


SAMPLE_STREAM = 2**32 - 1  # fold_in data is uint32; no run gets to this step


@struct.dataclass
class TrainState:
    """step: int32 scalar, optimizer updates done; params: trainable float32 master weights;
    ema: their exponential moving average; opt_state: optax state; rng: uint32 key data [2]
    (raw, so checkpoints hold a plain array); step i draws from `fold_in(rng, i)`, the sample grids
    made during training from `fold_in(rng, SAMPLE_STREAM)` (the same noise at every step)."""
    step: jax.Array
    params: Any
    ema: Any
    opt_state: Any
    rng: jax.Array

    def key(self, step=None):
        """The PRNG key of a step (this state's step by default): fold_in(rng, step)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step if step is None else step)


def create(init: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state with params = init(key). Boxed (`nn.Partitioned`) params keep their boxes in
    the EMA and the optimizer state, which is how all their shardings are derived."""
    k_init, k_train = jax.random.split(jax.random.key(seed))
    params = init(k_init)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
                      opt_state=optimizer.init(params), rng=jax.random.key_data(k_train))


def nonfinite_parts(state: TrainState) -> list[str]:
    """The parts of `state` among params, ema and opt_state that hold a NaN or inf (checked before
    every save: such a state is never written)."""
    finite = jax.device_get(_finite_parts(state))
    return [name for name, ok in zip(_CHECKED, finite) if not ok]


_CHECKED = ("params", "ema", "opt_state")


@jax.jit
def _finite_parts(state: TrainState) -> list:
    def finite(tree):
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
        return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
    return [finite(getattr(state, name)) for name in _CHECKED]
