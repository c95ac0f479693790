"""LoRA training (Hu et al. 2021): a recipe's trained model stays frozen; low-rank adapters on chosen
modules are what trains.

    c.lora = dict(rank=4, alpha=4, unet=("to_q", "to_k", "to_v", "to_out.0"), text_encoder=())

`lora_task` turns a recipe's `Task` into one whose trainable params are the adapters only,
{component: the component's params tree with each targeted `kernel` replaced by {"down": A, "up": B}}:
A [in, r] ([kh, kw, in, r] on a conv) drawn as peft draws lora_A (kaiming-uniform with a = sqrt(5):
U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B [r, out] zeros, so step 0 is the base model exactly. The loss
sees `convert.lora.apply_lora(base, adapters)`, W + (alpha / r) A B on every targeted kernel, so the
optimizer state, the EMA and the checkpoints hold adapters only. The base (the recipe's trainable params,
e.g. the U-Net) and every frozen part become the step's `frozen` input: sharded by their logical axes like
any frozen part, read and never updated or donated. The adapters are replicated (0.1-1 % of a model).
Targets are module names as diffusers and peft spell them: a module is targeted when its name is a target
or ends in "." + a target (peft's rule), so `to_out.0` or `attn2.to_k` work.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxdiff.convert.lora import LoRAWeights, apply_lora, module_name
from jaxdiff.training.task import Task

log = logging.getLogger(__name__)

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # a U-Net's attention projections (diffusers' LoRA scripts)
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r and alpha of every adapter (delta W = alpha / r * A B); per component, the targeted modules
    (an empty tuple: that component stays as it is)."""
    rank: int = 4
    alpha: float = 4.0
    unet: tuple = ATTENTION
    text_encoder: tuple = ()

    components = ("unet", "text_encoder")  # the fields that hold targets

    def __post_init__(self):
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0):
            raise ValueError(f"config.lora.rank={self.rank!r}: need a positive int")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"config.lora.alpha={self.alpha!r}: need a positive number (the scale is alpha / rank)")
        for component in self.components:
            targets = getattr(self, component)
            if not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"config.lora.{component}={targets!r}: need module names such as "
                                 f"{', '.join(ATTENTION if component == 'unet' else TEXT_ATTENTION)}")
        if not any(getattr(self, c) for c in self.components):
            raise ValueError(f"config.lora targets no module: set config.lora.unet (e.g. {', '.join(ATTENTION)}) "
                             f"or config.lora.text_encoder (e.g. {', '.join(TEXT_ATTENTION)})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def of(cls, lora) -> "LoRAConfig":
        """A config's `lora` (ConfigDict or dict) -> LoRAConfig; an unknown field is an error naming it."""
        lora = lora.to_dict() if hasattr(lora, "to_dict") else dict(lora)
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(lora) - set(fields))
        if unknown:
            raise ValueError(f"config.lora.{unknown[0]}: unknown field; fields: {', '.join(fields)}")
        return cls(**{k: tuple(v) if k in cls.components else v for k, v in lora.items()})


def targeted_kernels(params, component: str, targets) -> dict[tuple, tuple]:
    """{Flax path of each kernel whose module `targets` names: its shape}; ValueError naming a target that
    matches no module, with the module names there are."""
    kernels = {p: v.shape for p, v in traverse_util.flatten_dict(params).items() if p[-1] == "kernel"}
    names = {p: module_name(component, p) for p in kernels}
    hits = lambda t: [p for p, n in names.items() if n == t or n.endswith("." + t)]
    for target in targets:
        if not hits(target):
            ends = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                           for n in names.values()})
            raise ValueError(f"config.lora.{component}: {target!r} names no module of the {component}; its modules "
                             f"end in: {', '.join(ends)}")
    return {p: kernels[p] for t in targets for p in hits(t)}


def init_adapters(key, kernels: Mapping[tuple, tuple], rank: int) -> dict:
    """Fresh adapters of `kernels` ({path: kernel shape}): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as peft's
    default init, B = 0; nested like the params, each kernel replaced by {"down": A, "up": B}."""
    flat = {}
    for i, (path, shape) in enumerate(sorted(kernels.items())):
        fan_in = math.prod(shape[:-1])
        bound = 1.0 / math.sqrt(fan_in)
        flat[(*path[:-1], "down")] = jax.random.uniform(jax.random.fold_in(key, i), (*shape[:-1], rank),
                                                        jnp.float32, -bound, bound)
        flat[(*path[:-1], "up")] = jnp.zeros((rank, shape[-1]), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def lora_weights(adapters, scale: float) -> dict[tuple, LoRAWeights]:
    """One component's adapters -> {kernel path: LoRAWeights} (what `apply_lora` and `save_lora` take)."""
    flat = traverse_util.flatten_dict(adapters)
    modules = sorted({p[:-1] for p in flat})
    return {(*m, "kernel"): LoRAWeights(flat[(*m, "down")], flat[(*m, "up")], jnp.float32(scale)) for m in modules}


def lora_task(task: Task, config: LoRAConfig, base, where: Mapping[str, str | None]) -> Task:
    """`task` with LoRA adapters as its trainable params.

    Args:
      task: a recipe's Task (its `init` is not used: `base` replaces it).
      config: the adapters' rank, alpha and targets.
      base: the trained params the task would have trained (boxed `nn.Partitioned` leaves give its shardings).
      where: component -> None for `base`, or the key of `task.frozen` holding that component's params.
    The new task's frozen input is {"base": base, "recipe": task.frozen}; its sample and evaluate see the
    adapted model.
    """
    frozen = {"base": base, "recipe": task.frozen or {}}
    plain = nn.meta.unbox(frozen)
    wanted = [c for c in config.components if getattr(config, c)]
    missing = [c for c in wanted if c not in where]
    if missing:
        raise ValueError(f"config.lora.{missing[0]}: this run has no {missing[0]} to adapt; its components: "
                         f"{', '.join(where)}")
    part = lambda tree, c: tree["base"] if where[c] is None else tree["recipe"][where[c]]
    kernels = {c: targeted_kernels(part(plain, c), c, getattr(config, c)) for c in wanted}

    def init(key):
        return {c: init_adapters(jax.random.fold_in(key, i), kernels[c], config.rank) for i, c in enumerate(wanted)}

    def adapted(adapters, frozen):
        """(base with the adapters applied, the recipe's frozen parts with theirs applied)."""
        params, recipe = frozen["base"], dict(frozen["recipe"])
        for c, a in adapters.items():
            weights = lora_weights(a, config.scale)
            if where[c] is None:
                params = apply_lora(params, weights)
            else:
                recipe[where[c]] = apply_lora(recipe[where[c]], weights)
        return params, recipe

    def loss(adapters, frozen, batch, key, step):
        return task.loss(*adapted(adapters, frozen), batch, key, step)

    sample = None if task.sample is None else lambda a, f, key: task.sample(*adapted(a, f), key)
    evaluate = None if task.evaluate is None else lambda a, f: task.evaluate(*adapted(a, f))
    n = sum(math.prod(s[:-1]) * config.rank + config.rank * s[-1] for k in kernels.values() for s in k.values())
    log.info("LoRA: rank %d, alpha %g on %s: %d trainable params", config.rank, config.alpha,
             ", ".join(f"{len(k)} {c} modules" for c, k in kernels.items()), n)
    return Task(init=init, loss=loss, frozen=frozen, sample=sample, evaluate=evaluate)
