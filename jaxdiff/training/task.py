"""What a recipe hands the generic loop."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax


@dataclasses.dataclass
class Task:
    """init(key) -> trainable params (boxed: leaves may be `nn.Partitioned`, giving their shardings);
    loss(params, frozen, batch, key, step) -> (scalar loss, {name: scalar}), pure and jittable;
    frozen: boxed tree of parameters used but not trained (a text encoder, a VAE) or None;
    sample(params, frozen, key) -> images [N, H, W, 3] in [0, 1] for the grid saved during
    training, or None; evaluate(params, frozen) -> {name: float} on held-out data, or None."""
    init: Callable[[jax.Array], Any]
    loss: Callable[..., tuple[jax.Array, dict]]
    frozen: Any = None
    sample: Callable | None = None
    evaluate: Callable | None = None


def rebox(values, boxed_abstract):
    """Puts plain arrays (e.g. loaded from a checkpoint) into the `nn.Partitioned` boxes of
    `boxed_abstract` (e.g. `jax.eval_shape` of the module's init), so they shard like fresh params."""
    is_box = lambda x: isinstance(x, nn.Partitioned)
    flat_boxes, treedef = jax.tree.flatten(boxed_abstract, is_leaf=is_box)
    flat_values = treedef.flatten_up_to(values)
    return treedef.unflatten([b.replace_boxed(v) if is_box(b) else v for b, v in zip(flat_boxes, flat_values)])


def init_boxed(module, key, *args):
    """module.init(key, *args)['params'] (boxed), compiled as one program: run op by op (a frozen part's random
    init outside the jitted train state), a module's init compiles hundreds of small programs."""
    return jax.jit(lambda k, a: module.init(k, *a)["params"])(key, args)
