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

import hashlib
import json
import os
from typing import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from jaxdiff.models.checks import CheckpointError

TorchKeyOf = Callable[[tuple[str, ...]], str]

# A model folder's record of its weights' sha256, written at export, verified when loading (`verify_checksums`).
CHECKSUMS = "checksums.json"


def inside(folder: str, name: str, what: str) -> str:
    """folder/name, refusing a `name` (from an index or a listing in the folder) that points outside the folder."""
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise CheckpointError(f"{what} names {name!r}, which is outside the folder {folder!r}; a model folder's "
                              f"files must lie inside it")
    return os.path.join(folder, norm)


def _weight_files(folder: str) -> list[str]:
    """The *.safetensors files under `folder`, as sorted '/'-separated relative paths."""
    found = [os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder)
             for f in files if f.endswith(".safetensors")]
    return sorted(p.replace(os.sep, "/") for p in found)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: str) -> None:
    """Records the sha256 of every *.safetensors file under `folder` in folder/checksums.json."""
    sums = {rel: sha256_of(os.path.join(folder, rel)) for rel in _weight_files(folder)}
    with open(os.path.join(folder, CHECKSUMS), "w") as f:
        json.dump({"sha256": sums}, f, indent=2, sort_keys=True)
        f.write("\n")


def verify_checksums(folder: str) -> None:
    """Checks the weights against folder/checksums.json (if the folder has one): a file that is missing or whose
    sha256 differs from the recorded one is an error naming it."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            sums = json.load(f)["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path!r} is not a checksum listing ({{'sha256': {{file: digest}}}}): {e!r}") from e
    for rel, digest in sorted(sums.items()):
        file = inside(folder, rel, f"{CHECKSUMS} entry")
        if not os.path.isfile(file):
            raise CheckpointError(f"{rel!r} is listed in {path!r} but missing from the folder")
        if sha256_of(file) != digest:
            raise CheckpointError(f"{rel!r} in {folder!r} does not match the sha256 recorded in {CHECKSUMS}: the "
                                  f"file changed or was damaged after export; re-export or re-download the folder "
                                  f"(or delete {CHECKSUMS} to load it anyway)")


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
            files = [inside(path, f, f"{indexes[0]}'s weight_map") for f in _indexed_files(path, indexes[0])]
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


def _indexed_files(folder: str, index: str) -> list[str]:
    """The distinct files a sharded checkpoint's index (`{'weight_map': {tensor: file}}`) names."""
    try:
        with open(os.path.join(folder, index)) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{os.path.join(folder, index)!r} is not a safetensors index "
                              f"({{'weight_map': {{tensor: file}}}}): {e!r}") from e


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
        used.add(key)
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            problems.append(f"tensor {key!r} holds NaN or inf (damaged weights, or a training run that diverged)")
            continue
        out[path] = value.astype(leaf.dtype)
    unused = sorted(k for k in state_dict if k not in used and not ignore(k))
    problems += [f"unused tensor {k!r} {tuple(np.shape(state_dict[k]))}" for k in unused]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"checkpoint does not fit the module ({len(problems)} problems):\n  {shown}{more}")
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
