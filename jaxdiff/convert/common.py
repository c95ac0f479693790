"""Shared machinery for moving weights between PyTorch state dicts and Flax params.

Every converter describes one thing only: for each Flax parameter path, the PyTorch
key that holds it (`torch_key_of`). Layout changes follow from the Flax leaf name:

- `kernel` of rank >= 3 is a convolution: torch (O, I, *k) <-> flax (*k, I, O);
- `kernel` of rank 2 is a linear layer: torch (out, in) <-> flax (in, out);
- everything else (`bias`, `scale`, `embedding`, raw parameters) keeps its layout.

Import walks the Flax template (from `jax.eval_shape`), so a tensor missing from the
checkpoint, a tensor left over in it, or a shape that does not match is an error that
names the key.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from jaxdiff.models.checks import CheckpointError

TorchKeyOf = Callable[[tuple[str, ...]], str]


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file, or a folder holding one or a sharded set.

    A folder may hold `*.safetensors` directly or a `*.safetensors.index.json`
    (sharded checkpoints, as diffusers and transformers write them).
    """
    from safetensors.numpy import load_file

    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
        if indexes:
            with open(os.path.join(path, indexes[0])) as f:
                weight_map = json.load(f)["weight_map"]
            files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
        else:
            files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {path!r} (pickled .bin files are not read)")
    else:
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"cannot read {file!r}: {e}") from e
    return tensors


def save_state_dict(tensors: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a `.safetensors` file atomically (a failed write leaves no partial file).

    Scalars keep shape () (CLIP's `logit_scale`): np.ascontiguousarray would make them (1,).
    """
    from safetensors.numpy import save_file

    tmp = path + ".tmp"
    save_file({k: np.require(v, requirements="C") for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def to_flax_layout(name: str, tensor: np.ndarray) -> np.ndarray:
    if name == "kernel" and tensor.ndim >= 3:
        return np.transpose(tensor, (*range(2, tensor.ndim), 1, 0))
    if name == "kernel" and tensor.ndim == 2:
        return tensor.T
    return tensor


def to_torch_layout(name: str, array: np.ndarray) -> np.ndarray:
    if name == "kernel" and array.ndim >= 3:
        n = array.ndim
        return np.transpose(array, (n - 1, n - 2, *range(n - 2)))
    if name == "kernel" and array.ndim == 2:
        return array.T
    return array


def import_params(state_dict: Mapping[str, np.ndarray], template, torch_key_of: TorchKeyOf,
                  ignore: Callable[[str], bool] = lambda key: False):
    """Fills a Flax param template from a PyTorch state dict.

    Args:
      state_dict: torch key -> array.
      template: pytree of arrays or `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape(module.init, ...)['params']`).
      torch_key_of: Flax path (tuple of names) -> torch key.
      ignore: torch keys that are expected to be unused (buffers such as `position_ids`).
    Returns: the params pytree, numpy arrays in the template's dtypes.
    """
    flat = traverse_util.flatten_dict(template)
    out, used, problems = {}, set(), []
    for path, leaf in flat.items():
        key = torch_key_of(path)
        if key not in state_dict:
            problems.append(f"missing tensor {key!r} (for flax param {'/'.join(path)})")
            continue
        value = to_flax_layout(path[-1], np.asarray(state_dict[key]))
        if tuple(value.shape) != tuple(leaf.shape):
            problems.append(f"tensor {key!r} has shape {tuple(value.shape)} after layout change, "
                            f"but flax param {'/'.join(path)} needs {tuple(leaf.shape)}")
            continue
        out[path] = value.astype(leaf.dtype)
        used.add(key)
    unused = sorted(k for k in state_dict if k not in used and not ignore(k))
    problems += [f"unused tensor {k!r} {tuple(np.shape(state_dict[k]))}" for k in unused]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"checkpoint does not match the module ({len(problems)} problems):\n  {shown}{more}")
    return traverse_util.unflatten_dict(out)


def export_params(params, torch_key_of: TorchKeyOf) -> dict[str, np.ndarray]:
    """Inverse of `import_params`: Flax params -> PyTorch state dict (numpy, float32 kept)."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    state = {}
    for path, value in flat.items():
        key = torch_key_of(path)
        if key in state:
            raise CheckpointError(f"two flax params map to torch key {key!r}")
        state[key] = to_torch_layout(path[-1], np.asarray(value))
    return state


def read_config(folder: str, filename: str = "config.json") -> dict:
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: expected a model folder with {filename} and *.safetensors")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path!r} is not valid JSON: {e}") from e
