"""CLIP, T5 and UMT5 weights in and out as transformers folders (`config.json` + `*.safetensors`).

Our CLIP modules use transformers' own module names, so the Flax path of a parameter
spells its torch key: `encoder/layers_3/self_attn/q_proj/kernel` <->
`encoder.layers.3.self_attn.q_proj.weight`. Layout changes (linear transposes, conv
HWIO) are `convert.common`'s.

Standalone towers come in two layouts: transformers 4.x writes `CLIPTextModel` keys
under `text_model.` (every Stable Diffusion `text_encoder/` on the hub), 5.x without.
Import accepts both; export writes the prefixed one, which both versions load.

T5 / UMT5 encoders (`T5EncoderModel`, `UMT5EncoderModel`) tie `encoder.embed_tokens` to `shared`:
transformers 5.x writes `shared.weight` only, older files both (equal); export writes `shared.weight`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert.common import (CheckpointError, export_params, import_params, load_state_dict, placement,
                                    read_config, save_state_dict)
from jaxdiff.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                 CLIPVisionConfig, CLIPVisionModel)
from jaxdiff.models.layers import param_shapes
from jaxdiff.models.t5 import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one transformers class maps onto ours."""

    module_class: type
    config_class: type
    tower_prefix: str  # prefix transformers 4.x puts on a standalone tower's keys; "" if none
    buffers: frozenset[str]  # non-persistent buffers that older transformers versions saved anyway
    example_inputs: Callable  # config -> positional inputs for `init`
    prepare_state: Callable[[dict], dict] | None = None  # state-dict fix-ups before import (tied keys)


def _text_inputs(c: CLIPTextConfig):
    return (jnp.zeros((1, c.max_position_embeddings), jnp.int32),)


def _image_inputs(c: CLIPVisionConfig):
    return (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)


def _token_inputs(c: T5Config):
    return (jnp.zeros((1, 8), jnp.int32),)  # any length: T5's positions are relative


def _tied_t5_embeddings(state: dict) -> dict:
    """`encoder.embed_tokens.weight` is `shared.weight` (tied): dropped when equal, renamed when alone."""
    if "encoder.embed_tokens.weight" not in state:
        return state
    state = dict(state)
    tied = state.pop("encoder.embed_tokens.weight")
    if "shared.weight" not in state:
        state["shared.weight"] = tied
    elif not np.array_equal(tied, state["shared.weight"]):
        raise CheckpointError("tensors 'encoder.embed_tokens.weight' and 'shared.weight' differ, but the model "
                              "ties them (T5's encoder embeds with `shared`)")
    return state


ARCHITECTURES = {
    "CLIPTextModel": Architecture(CLIPTextModel, CLIPTextConfig, "text_model.",
                                  frozenset({"embeddings.position_ids"}), _text_inputs),
    "CLIPTextModelWithProjection": Architecture(CLIPTextModelWithProjection, CLIPTextConfig, "",
                                                frozenset({"text_model.embeddings.position_ids"}), _text_inputs),
    "CLIPVisionModel": Architecture(CLIPVisionModel, CLIPVisionConfig, "vision_model.",
                                    frozenset({"embeddings.position_ids"}), _image_inputs),
    "CLIPModel": Architecture(CLIPModel, CLIPConfig, "",
                              frozenset({"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}),
                              lambda c: _text_inputs(c.text) + _image_inputs(c.vision)),
    "T5EncoderModel": Architecture(T5EncoderModel, T5Config, "", frozenset(), _token_inputs, _tied_t5_embeddings),
    "UMT5EncoderModel": Architecture(UMT5EncoderModel, UMT5Config, "", frozenset(), _token_inputs,
                                     _tied_t5_embeddings),
}
MODEL_TYPES = {"clip": "CLIPModel", "clip_text_model": "CLIPTextModel", "clip_vision_model": "CLIPVisionModel",
               "t5": "T5EncoderModel", "umt5": "UMT5EncoderModel"}

# Flax list members `layers_3` (CLIP), `block_0` / `layer_1` (T5) are torch's `layers.3`, `block.0`, `layer.1`.
_LAYER = re.compile(r"^(layers|block|layer)_(\d+)$")
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_key(path: tuple[str, ...], prefix: str = "") -> str:
    """Flax param path -> transformers state-dict key (`layers_3` -> `layers.3`, `block_0` -> `block.0`,
    kernel/scale/embedding -> weight)."""
    *modules, leaf = path
    return prefix + ".".join([_LAYER.sub(r"\1.\2", m) for m in modules] + [_TORCH_LEAF.get(leaf, leaf)])


def architecture_of(config: dict) -> str:
    """The transformers class a config.json describes: `architectures[0]`, else its `model_type`."""
    names = config.get("architectures") or []
    if names:
        if names[0] not in ARCHITECTURES:
            raise CheckpointError(f"config field architectures={names!r} is not supported; "
                                  f"supported: {', '.join(ARCHITECTURES)}")
        return names[0]
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"config field model_type={model_type!r} is not supported; "
                              f"supported: {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def _strip_tower_prefix(state: dict, prefix: str) -> dict:
    """Accepts transformers 4.x standalone-tower keys (all under `prefix`) as well as 5.x's."""
    if prefix and state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def param_template(module: nn.Module, arch: Architecture, boxed: bool = False):
    """Shapes and dtypes of `module`'s params (plain, or with `boxed` in their logical-axis boxes), without
    allocating them (`layers.param_shapes` on the architecture's example inputs)."""
    return param_shapes(module, boxed, example=lambda: (arch.example_inputs(module.config), {}))


def from_transformers(path: str, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None, rules=None):
    """Loads a transformers folder: CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel,
    T5EncoderModel or UMT5EncoderModel.

    Args:
      path: folder with config.json and model.safetensors (or a sharded set), read lazily tensor by tensor.
      dtype: compute dtype; param_dtype: dtype the params are returned in (e.g. jnp.bfloat16).
      mesh, rules: place each param straight into its sharding on `mesh` (logical axis `rules`, default
        `jaxdiff.parallel.DEFAULT_RULES`), each device reading only its slice (see `from_diffusers`).
    Returns: (module, params), params a plain tree of jax arrays for `module.apply({'params': params}, ...)`.
    Raises: CheckpointError naming any unsupported config value, missing or unused tensor, or wrong shape.
    """
    config = read_config(path)
    name = architecture_of(config)
    arch = ARCHITECTURES[name]
    module = arch.module_class(arch.config_class.from_transformers_config(config), dtype=dtype,
                               param_dtype=param_dtype)
    state = _strip_tower_prefix(load_state_dict(path, lazy=True), arch.tower_prefix)
    if arch.prepare_state is not None:
        state = arch.prepare_state(state)
    template, shardings = placement(param_template(module, arch, boxed=True), param_dtype, mesh, rules)
    params = import_params(state, template, torch_key, ignore=arch.buffers.__contains__, shardings=shardings)
    return module, jax.device_put(params)


def _architecture_name(module: nn.Module) -> str:
    for name, arch in ARCHITECTURES.items():
        if type(module) is arch.module_class:
            return name
    raise TypeError(f"cannot export a {type(module).__name__}; supported: "
                    f"{', '.join(a.module_class.__name__ for a in ARCHITECTURES.values())}")


def to_transformers(module: nn.Module, params, path: str) -> None:
    """Writes `module` + `params` as a transformers folder (config.json + model.safetensors) that
    `transformers.<Architecture>.from_pretrained(path)` loads. Boxed (logically partitioned) params are unboxed;
    each tensor keeps its dtype (bfloat16 params are stored in bfloat16; loading casts to the model's dtype)."""
    name = _architecture_name(module)
    arch = ARCHITECTURES[name]
    params = nn.meta.unbox(params)
    expected = param_template(module, arch)
    if jax.tree.structure(expected) != jax.tree.structure(params):
        raise CheckpointError(f"params do not match the {name} module's parameter tree")
    state = export_params(params, lambda p: torch_key(p, arch.tower_prefix))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": [name], **module.config.to_transformers_config()}, f, indent=2)
    save_state_dict(state, os.path.join(path, "model.safetensors"))
