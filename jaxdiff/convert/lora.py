"""LoRA adapters: read diffusers / peft and kohya files, merge them, apply them inside `jit`, export them.

    unet_params = jd.convert.load_lora(unet_params, "my_lora/", scale=0.8)          # merged: a new tree
    text_params = jd.convert.load_lora(text_params, "my_lora/", component="text_encoder")

    style = lora.read_lora("style.safetensors", unet_params)                         # unmerged
    detail = lora.read_lora("detail.safetensors", unet_params)
    denoise = jax.jit(lambda p, a, s, x, t, c: unet.apply({"params": lora.apply_lora(p, a, s)}, x, t, c))
    denoise(unet_params, [style, detail], jnp.array([1.0, 0.4]), x, t, c)  # new scales: no recompilation

A LoRA (Hu et al. 2021, eq. 3) adds to a weight W (torch layout [out, in] or [out, in, kh, kw]) the update

    delta W = scale * (alpha / r) * B @ A,   A: [r, in(, kh, kw)] (lora_A, kohya's lora_down),
                                             B: [out, r(, 1, 1)]  (lora_B, kohya's lora_up).

On a conv, A is a conv with W's kernel, stride and padding and B a 1x1 conv, so B @ A over the flattened
kernel is exactly the merged conv. `alpha / r` is peft's `scaling`: from the `lora_adapter_metadata`
that diffusers' `save_lora_weights` / `save_lora_adapter` write (`lora_alpha`, `r`, per-module
`alpha_pattern` / `rank_pattern`, `use_rslora`: alpha / sqrt(r)), from kohya's `<module>.alpha`
tensors, else 1 (alpha = r, diffusers' reading of a file without either).

Modules are found by inverting the converters' own `torch_key_of` over the params tree, so any model
`from_diffusers` / `from_transformers` loads (UNet2DCondition, SD3 / Flux transformers, CLIP text
encoders) takes LoRAs without a per-model table. Kohya names flatten the module path to underscores
(`lora_unet_down_blocks_0_attentions_0_..._to_q`) and are resolved against the model's module names
flattened the same way; SDXL's kohya files name U-Net blocks as the original (sgm) code does
(`input_blocks_4_1_...`, `middle_block_1_...`, `output_blocks_2_0_in_layers_2`), mapped here to
diffusers' blocks.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.convert import diffusers as diffusers_convert
from jaxdiff.convert import transformers as transformers_convert
from jaxdiff.convert.common import to_flax_layout, to_torch_layout
from jaxdiff.models.checks import CheckpointError

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights writes in a folder
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_transformer_": "transformer", "lora_te_": "text_encoder",
                   "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_TEXT_TOWER = "text_model."  # CLIP's tower level: transformers 4.x names it, 5.x's CLIPTextModel does not


class LoRAWeights(NamedTuple):
    """One module's LoRA in Flax layout: kernel delta = scale * down @ up (contracting r)."""

    down: jax.Array  # A: [in, r] (linear) or [kh, kw, in, r] (conv)
    up: jax.Array  # B: [r, out]
    scale: jax.Array  # alpha / r (alpha / sqrt(r) for rsLoRA), a scalar


Adapters = dict  # {flax path of a kernel (tuple of names): LoRAWeights}, one component's LoRA


# ----------------------------------------------------------------------------- applying


def lora_delta(w: LoRAWeights) -> jax.Array:
    """The kernel update in Flax layout: [in, out] or [kh, kw, in, out]."""
    down, up = jnp.asarray(w.down, jnp.float32), jnp.asarray(w.up, jnp.float32)
    return w.scale * jnp.einsum("...r,ro->...o", down, up)


def apply_lora(params, adapters: Adapters | Sequence[Adapters], scales=1.0):
    """params with every targeted kernel W replaced by W + sum_i scales[i] * delta_i: pure and jittable.

    Args:
      params: a model's plain params tree.
      adapters: one `read_lora` result, or a list of them (several LoRAs at once).
      scales: a scalar for one adapter, or one per adapter (a list or a [n] array); pass them as a traced
        argument of `jit` and changing them never recompiles.
    Returns: a new params tree (the untouched leaves shared with `params`).
    """
    if isinstance(adapters, Mapping):
        adapters, scales = [adapters], [scales]
    if not (isinstance(scales, (list, tuple)) or getattr(scales, "ndim", 0) == 1) or len(scales) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but scales {scales!r}; give one scale per adapter")
    flat = traverse_util.flatten_dict(params)
    for adapter, scale in zip(adapters, scales):
        for path, w in adapter.items():
            if path not in flat:
                raise KeyError(f"the adapter targets {'/'.join(path)}, which the params do not have")
            kernel = flat[path]
            flat[path] = (kernel.astype(jnp.float32) + scale * lora_delta(w)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def load_lora(params, path: str, scale: float = 1.0, component: str = "unet"):
    """Reads the LoRA at `path` (a `.safetensors` file or the folder holding it) for `component` and returns
    params with it merged at `scale` (a new tree; `params` is untouched). See `read_lora` for the formats."""
    return apply_lora(params, read_lora(path, params, component), scale)


# ----------------------------------------------------------------------------- reading


def read_lora(path: str, params, component: str = "unet") -> Adapters:
    """One component's LoRA from a diffusers / peft or kohya `.safetensors` file, for the model of `params`.

    Args:
      path: the `.safetensors` file, or a folder holding one (diffusers' `pytorch_lora_weights.safetensors`).
      params: the model's params (only their paths and shapes are read).
      component: which part of the pipeline `params` is: unet, transformer, text_encoder or text_encoder_2.
    Returns: {flax path of each targeted kernel: LoRAWeights}, arrays in float32.
    Raises: CheckpointError naming the key for a file that is not a LoRA, a module the params do not have,
      a shape that does not fit, NaN or inf.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose one of: {', '.join(COMPONENTS)}")
    file = _lora_file(path)
    tensors, metadata = _read_safetensors(file)
    modules, config, in_file = _split_components(tensors, metadata, component, file)
    kernels = traverse_util.flatten_dict(params)
    lookup = _ModuleLookup(kernels, component)
    adapters = {}
    for name, parts in sorted(modules.items()):
        where = f"{file!r}, {component} module {name!r}"
        kernel_path = lookup.find(name, parts["kohya"])
        if kernel_path is None:
            raise CheckpointError(f"{where}: the params have no such module; are they the {component}'s params? "
                                  f"(the file has LoRAs for: {', '.join(in_file)}; choose one with component=)")
        adapters[kernel_path] = _weights(parts, name, kernels[kernel_path].shape, config, where)
    return adapters


def _lora_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"LoRA path {path!r} does not exist")
    if os.path.isfile(os.path.join(path, WEIGHT_NAME)):
        return os.path.join(path, WEIGHT_NAME)
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) != 1:
        raise CheckpointError(f"{path!r} holds {len(found)} .safetensors files ({', '.join(found) or 'none'}) and "
                              f"no {WEIGHT_NAME}: pass the LoRA file itself")
    return os.path.join(path, found[0])


def _read_safetensors(file: str) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            header = f.metadata() or {}
        metadata = json.loads(header[METADATA_KEY]) if header.get(METADATA_KEY) else {}
    except Exception as e:  # safetensors and json raise several types for damaged files
        raise CheckpointError(f"cannot read LoRA file {file!r}: {e}") from e
    return tensors, metadata


# `<module>.<part>` endings, as (regex, part): peft's, older diffusers' and kohya's spellings.
_PARTS = [(re.compile(r"^(.*)\.lora_A(?:\.default)?\.weight$"), "down"),
          (re.compile(r"^(.*)\.lora_B(?:\.default)?\.weight$"), "up"),
          (re.compile(r"^(.*)\.(?:lora\.|lora_linear_layer\.|lora_)down\.weight$"), "down"),
          (re.compile(r"^(.*)\.(?:lora\.|lora_linear_layer\.|lora_)up\.weight$"), "up"),
          (re.compile(r"^(.*)\.alpha$"), "alpha")]
# diffusers' attention-processor LoRAs (`attn1.processor.to_q_lora.down.weight`) name a module the old way.
_OLD_PROCESSOR = re.compile(r"\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
# Adapters of other kinds (regex on a key -> what it is), refused by name rather than as unknown keys.
_UNSUPPORTED = {r"lora_magnitude_vector|dora_scale": "DoRA", r"hada_": "LoHa", r"lokr_": "LoKr",
                r"\.lora_B\.bias$": "lora_bias (a LoRA with a bias)", r"\.diff(_b)?$": "full weight differences"}


def _old_processor_name(key: str, text: bool) -> str:
    """`...attn1.processor.to_out_lora.up.weight` -> `...attn1.to_out.0.lora.up.weight` (U-Net) or
    `...self_attn.out_proj.lora.up.weight` (CLIP, whose projections are q_proj ... out_proj)."""
    def new(m):
        which, part = m.groups()
        module = f"{which}_proj" if text else ("to_out.0" if which == "out" else f"to_{which}")
        return f".{module}.lora.{part}.weight"
    return _OLD_PROCESSOR.sub(new, key.replace(".processor.", "."))


def _component_of(key: str) -> tuple[str | None, str, bool]:
    """(component, rest of the key, whether the name is kohya's); component None for a key without a prefix."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return component, key[len(prefix):], True
    head, _, rest = key.partition(".")
    if head in COMPONENTS:
        return head, rest, False
    return None, key, False


def _split_components(tensors: dict, metadata: dict, component: str, file: str) -> tuple[dict, dict, list]:
    """`component`'s modules {name: {"down", "up", maybe "alpha", "kohya"}}, its peft config (from the metadata),
    and the components the file has. Keys without a component prefix (diffusers' `save_lora_adapter` on one
    model) all belong to `component`."""
    for key in tensors:
        for marker, what in _UNSUPPORTED.items():
            if re.search(marker, key):
                raise CheckpointError(f"{file!r}: key {key!r} belongs to {what}, which jaxdiff's LoRA loader does "
                                      f"not read (it reads LoRA: lora_A/lora_B, lora_down/lora_up, alpha)")
    prefixed = any(_component_of(k)[0] is not None for k in tensors)
    found: dict[str, dict] = collections.defaultdict(dict)
    components = set()
    for key, value in tensors.items():
        owner, rest, kohya = _component_of(key)
        owner = owner if prefixed else component
        if owner is None:
            raise CheckpointError(f"{file!r}: key {key!r} names no component; a LoRA's keys start with one of "
                                  f"{', '.join(COMPONENTS)} (diffusers / peft) or {', '.join(_KOHYA_PREFIXES)} (kohya)")
        components.add(owner)
        if owner != component:
            continue
        rest = _old_processor_name(rest, text=component.startswith("text_encoder"))
        match = next(((m.group(1), part) for pattern, part in _PARTS if (m := pattern.match(rest))), None)
        if match is None:
            raise CheckpointError(f"{file!r}: key {key!r} is not a LoRA tensor (expected <module>.lora_A.weight / "
                                  f".lora_B.weight, or kohya's .lora_down.weight / .lora_up.weight / .alpha)")
        module, part = match
        found[module].update({part: value, "kohya": kohya})
    if component not in components:
        raise CheckpointError(f"{file!r} has no LoRA for component {component!r}; it has: "
                              f"{', '.join(sorted(components)) or 'no tensors'}")
    for module, parts in found.items():
        missing = [p for p in ("down", "up") if p not in parts]
        if missing:
            raise CheckpointError(f"{file!r}: {component} module {module!r} has no {' and no '.join(missing)} "
                                  f"matrix (a LoRA module needs both lora_A and lora_B)")
    config = {k[len(component) + 1:]: v for k, v in metadata.items() if k.startswith(component + ".")} \
        if prefixed else metadata
    return dict(found), config, sorted(components)


def module_name(component: str, path: tuple[str, ...]) -> str:
    """A kernel's Flax path -> the torch module name a LoRA file uses for it (the converters' torch key)."""
    if component.startswith("text_encoder"):
        tower = "" if path[0] in ("text_model", "text_projection") else _TEXT_TOWER
        return transformers_convert.torch_key(path, tower).removesuffix(".weight")
    return diffusers_convert.torch_key_of(path).removesuffix(".weight")


class _ModuleLookup:
    """Torch module names -> Flax kernel paths, for one model's params."""

    def __init__(self, flat_params: dict, component: str):
        self.names = {}
        for path in flat_params:
            if path[-1] == "kernel":
                name = module_name(component, path)
                self.names[name] = path
                if name.startswith(_TEXT_TOWER):  # transformers 5.x's CLIPTextModel has no `text_model.` level
                    self.names.setdefault(name[len(_TEXT_TOWER):], path)
        # kohya flattens names to underscores; a flattened name two modules share is ambiguous (None)
        self.flat: dict[str, tuple | None] = {}
        for name, path in self.names.items():
            key = name.replace(".", "_")
            self.flat[key] = path if self.flat.get(key, path) == path else None
        self.per_block = 1 + max((int(m.group(1)) for n in self.names
                                  if (m := re.match(r"^down_blocks\.0\.resnets\.(\d+)\.", n))), default=-1)

    def find(self, name: str, kohya: bool) -> tuple[str, ...] | None:
        if not kohya:
            return self.names.get(name)
        for candidate in (name, _sgm_to_diffusers(name, self.per_block)):
            if self.flat.get(candidate, ()) is None:
                raise CheckpointError(f"kohya module {name!r} fits several modules of the params")
            if candidate in self.flat:
                return self.flat[candidate]
        return None


# The original (sgm / ldm) U-Net's names for a resnet's layers, and for its top-level layers, in diffusers' terms.
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_SGM_TOP = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
            "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
            "label_emb_0_2": "add_embedding_linear_2"}


def _sgm_to_diffusers(name: str, per_block: int) -> str:
    """An sgm U-Net module name (kohya's SDXL files), underscored, in diffusers' blocks; else `name` itself.

    input_blocks[0] is conv_in; then each down block has `per_block` (resnet, attention) slots and one
    downsampler slot; middle_block is resnet, attention, resnet; each up block has per_block + 1
    (resnet, attention, upsampler) slots.
    """
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    if m := re.match(r"^middle_block_(\d)_(.+)$", name):
        block, rest = ("mid_block_resnets_0", "mid_block_attentions_0", "mid_block_resnets_1")[int(m[1]) % 3], m[2]
    elif m := re.match(r"^input_blocks_(\d+)_(\d+)_(.+)$", name):
        down, slot = divmod(int(m[1]) - 1, per_block + 1)
        if slot == per_block:  # `input_blocks_3_0_op`
            block, rest = f"down_blocks_{down}_downsamplers_0", "conv"
        else:
            block, rest = f"down_blocks_{down}_{'resnets' if m[2] == '0' else 'attentions'}_{slot}", m[3]
    elif m := re.match(r"^output_blocks_(\d+)_(\d+)_(.+)$", name):
        up, slot = divmod(int(m[1]), per_block + 1)
        kind = "resnets" if m[2] == "0" else "upsamplers" if m[3] == "conv" else "attentions"
        block, rest = f"up_blocks_{up}_{kind}_{0 if kind == 'upsamplers' else slot}", m[3]
    else:
        return name
    return f"{block}_{_SGM_RESNET.get(rest, rest)}"


def _pattern_value(patterns: dict | None, module: str, default):
    """peft's per-module override: the value of the first pattern that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _weights(parts: dict, module: str, kernel_shape: tuple, config: dict, where: str) -> LoRAWeights:
    """A module's LoRAWeights from its torch-layout down / up (and alpha), checked against its kernel."""
    down, up = (np.asarray(parts[p], np.float32) for p in ("down", "up"))
    rank = down.shape[0]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != rank or up.shape[2:] not in ((), (1, 1)):
        raise CheckpointError(f"{where}: down {down.shape} and up {up.shape} are not a LoRA pair (down [r, in] or "
                              f"[r, in, kh, kw], up [out, r] or [out, r, 1, 1])")
    delta_shape = to_flax_layout("kernel", np.empty((up.shape[0], *down.shape[1:]), np.float32)).shape
    if delta_shape != tuple(kernel_shape):
        raise CheckpointError(f"{where}: down {down.shape} and up {up.shape} make a delta of shape {delta_shape} "
                              f"in Flax layout, but the kernel is {tuple(kernel_shape)}")
    for part, array in (("down", down), ("up", up)):
        if not np.isfinite(array).all():
            raise CheckpointError(f"{where}: the {part} matrix holds NaN or inf")
    if "alpha" in parts:  # kohya's per-module alpha (some peft files carry one too)
        alpha, r = float(np.asarray(parts["alpha"]).reshape(())), rank
    elif config:
        r = _pattern_value(config.get("rank_pattern"), module, config.get("r", rank))
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
        if r != rank:
            raise CheckpointError(f"{where}: the metadata says rank {r}, the tensors have rank {rank}")
    else:
        alpha, r = rank, rank  # no alpha anywhere: diffusers reads delta W = B @ A
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    if not math.isfinite(scale):
        raise CheckpointError(f"{where}: alpha {alpha} is not finite")
    # down [r, in(, kh, kw)] -> [in, r] / [kh, kw, in, r], like a kernel; up [out, r(, 1, 1)] -> [r, out]
    return LoRAWeights(jnp.asarray(to_flax_layout("kernel", down)), jnp.asarray(up.reshape(up.shape[:2]).T),
                       jnp.float32(scale))


# ----------------------------------------------------------------------------- export


def save_lora(adapters: Mapping[str, Adapters], path: str) -> str:
    """Writes LoRAs as diffusers' `save_lora_weights` does: peft keys (`unet.<module>.lora_A.weight`) and the
    `lora_adapter_metadata` diffusers reads (r, lora_alpha, rank_pattern, alpha_pattern, target_modules).

    Args:
      adapters: {component: that component's adapters (`read_lora`'s result)}.
      path: a `.safetensors` file, or a folder (written as folder/pytorch_lora_weights.safetensors).
    Returns: the file written; diffusers' `pipe.load_lora_weights` loads it.
    """
    from safetensors.numpy import save_file

    unknown = sorted(set(adapters) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from: {', '.join(COMPONENTS)}")
    tensors, metadata = {}, {}
    for component, adapter in sorted(adapters.items()):
        modules = {}
        for kernel_path, w in sorted(adapter.items()):
            name = module_name(component, kernel_path)
            down = to_torch_layout("kernel", np.asarray(w.down, np.float32))  # [r, in] / [r, in, kh, kw]
            up = np.asarray(w.up, np.float32).T  # [out, r]
            tensors[f"{component}.{name}.lora_A.weight"] = down
            tensors[f"{component}.{name}.lora_B.weight"] = up if down.ndim == 2 else up[:, :, None, None]
            rank, alpha = down.shape[0], float(w.scale) * down.shape[0]
            # peft's patterns match the end of a module name: CLIP's written without `text_model.` match both
            # transformers 4.x's modules and 5.x's (the keys keep it; diffusers drops it for 5.x models).
            modules[name.removeprefix(_TEXT_TOWER)] = (rank, int(alpha) if alpha.is_integer() else alpha)
        metadata.update({f"{component}.{k}": v for k, v in _peft_config(modules).items()})
    file = path if path.endswith(".safetensors") else os.path.join(path, WEIGHT_NAME)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, file + ".tmp", metadata=header)
    os.replace(file + ".tmp", file)  # a failed write leaves no partial file
    return file


def _peft_config(modules: dict[str, tuple[int, float]]) -> dict:
    """LoraConfig fields for modules with these (rank, alpha): the most common as r and lora_alpha, the others
    as rank_pattern / alpha_pattern entries naming the module."""
    r = collections.Counter(rank for rank, _ in modules.values()).most_common(1)[0][0]
    alpha = collections.Counter(a for _, a in modules.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
            "rank_pattern": {m: k for m, (k, _) in modules.items() if k != r},
            "alpha_pattern": {m: a for m, (_, a) in modules.items() if a != alpha},
            "use_dora": False, "use_rslora": False, "lora_bias": False}
