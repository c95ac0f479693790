"""The config every recipe shares (an `ml_collections.ConfigDict`) and its validation.

A recipe file under configs/ starts from `base_config()` and fills in `recipe`, `model`,
`data` and whatever it changes; `validate` runs at the edge (the command line, `train`)
and names the bad value and the allowed ones.
"""
from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections

from jaxdiff.parallel import DEFAULT_RULES, check_rules
from jaxdiff.training.lora import LoRAConfig

RECIPES = ("clip", "vae", "diffusion", "toy2d", "layout")
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.recipe = ""
    c.seed = 0
    c.steps = 1000                # optimizer updates in the whole run (the LR schedule's length)
    c.batch_size = 32             # global examples per update
    c.accumulate = 1              # micro-batches per update (gradient accumulation)
    c.dtype = "float32"           # compute dtype; params and optimizer state stay float32
    c.ema_decay = 0.999
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=100, min_lr_ratio=0.1, b1=0.9, b2=0.999,
                                             eps=1e-8, weight_decay=0.01, clip_norm=1.0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
    c.rules = [list(r) for r in DEFAULT_RULES]
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.log_every = 10
    c.sample_every = 0            # 0: no sample grids during training (one is still written at the end if >0)
    c.eval_every = 0              # held-out evaluation (recipes that have one) every N steps; always at the end
    c.eval_examples = 1000        # held-out examples per evaluation
    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0))
    c.data = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    return c


def _positive(c, path: str, allow_zero: bool = False):
    value = c
    for part in path.split("."):
        value = value[part]
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"config.{path}={value!r}: need a {'non-negative' if allow_zero else 'positive'} int")


def validate(c) -> None:
    """Raises ValueError naming the first bad field, its value and what is allowed."""
    if c.recipe not in RECIPES:
        raise ValueError(f"config.recipe={c.recipe!r}: unknown recipe; choose one of: {', '.join(RECIPES)}")
    if c.dtype not in DTYPES:
        raise ValueError(f"config.dtype={c.dtype!r}: choose one of: {', '.join(DTYPES)}")
    for path in ("steps", "batch_size", "accumulate", "keep_checkpoints", "eval_examples"):
        _positive(c, path)
    for path in ("checkpoint_every", "log_every", "sample_every", "eval_every", "optim.warmup_steps"):
        _positive(c, path, allow_zero=True)
    if c.batch_size % c.accumulate:
        raise ValueError(f"config.batch_size={c.batch_size} is not a multiple of config.accumulate={c.accumulate}")
    if not c.optim.lr > 0:
        raise ValueError(f"config.optim.lr={c.optim.lr!r}: need a positive learning rate")
    if not 0.0 <= c.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay={c.ema_decay!r}: need 0 <= decay < 1")
    if not 0.0 <= c.optim.min_lr_ratio <= 1.0:
        raise ValueError(f"config.optim.min_lr_ratio={c.optim.min_lr_ratio!r}: need a value in [0, 1]")
    check_rules(c.rules)
    if "lora" in c:
        if c.recipe != "diffusion":
            raise ValueError(f"config.lora: LoRA training is for the diffusion recipe, not config.recipe={c.recipe!r}")
        LoRAConfig.of(c.lora)


def check_batch_fits(c, mesh) -> None:
    """Each micro-batch must split evenly over the mesh's batch axes (data x fsdp)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = c.batch_size // c.accumulate
    if micro % shards:
        raise ValueError(f"config.batch_size={c.batch_size} / accumulate={c.accumulate} = {micro} examples per "
                         f"micro-batch do not split over data x fsdp = {shards} devices")


def choice(value, allowed, name: str):
    """`value` if it is one of `allowed`, else a ValueError naming `name`, the value and the choices."""
    if value not in allowed:
        shown = (repr(a) if a == "" else str(a) for a in allowed)   # '' (off) must show
        raise ValueError(f"config.{name}={value!r}: choose one of: {', '.join(shown)}")
    return value


def load_config(spec: str) -> ml_collections.ConfigDict:
    """get_config(variant) of the recipe file in `spec`, 'path/to/recipe.py[:variant]' (as ml_collections'
    config flag reads it); FileNotFoundError naming the recipes beside a missing file."""
    path, *variant = spec.split(":", 1)
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        there = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")) \
            if os.path.isdir(folder) else []
        raise FileNotFoundError(f"config file {path!r} does not exist" +
                                (f"; {folder}/ has: {', '.join(there)}" if there else ""))
    module_spec = importlib.util.spec_from_file_location("_recipe_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*variant)


def unknown_field(c, path: str) -> str | None:
    """None if the dotted `path` names a field of config `c`; else the error naming the first missing
    part and the fields meant (close matches, or all of that level)."""
    node, where = c, "config"
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"{where} is {type(node).__name__} {node!r}, it has no field {part!r}"
        if part not in node:
            fields = sorted(node.keys())
            close = difflib.get_close_matches(part, fields, n=3)
            return (f"{where} has no field {part!r}; " +
                    (f"did you mean: {', '.join(close)}" if close else f"its fields: {', '.join(fields)}"))
        node, where = node[part], f"{where}.{part}"
    return None
