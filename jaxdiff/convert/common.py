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

import functools
import hashlib
import json
import os
from typing import Callable, Mapping

import flax.linen as nn
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


class LazyTensor:
    """One tensor of an open .safetensors file, read only when asked: whole (`np.asarray(t)`) or a slice
    (`t.read(index)`, reading just those bytes). `shape` and `dtype` come from the file's header."""

    def __init__(self, handle, key: str):
        self._handle, self._key = handle, key
        self._slice = handle.get_slice(key)
        self.shape = tuple(self._slice.get_shape())
        self.ndim = len(self.shape)

    def read(self, index: tuple) -> np.ndarray:
        return np.asarray(self._slice[index]) if self.ndim else self.__array__()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self._handle.get_tensor(self._key)
        return a if dtype is None else a.astype(dtype)


def load_state_dict(path: str, lazy: bool = False) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file, or a folder holding one or a sharded set.

    A folder may hold `*.safetensors` directly or a `*.safetensors.index.json`
    (sharded checkpoints, as diffusers and transformers write them). With `lazy`, the values are
    `LazyTensor`s: the headers are read now, each tensor (or slice of it) when it is used.
    """
    from safetensors import safe_open
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
    tensors: dict = {}
    for file in files:
        try:
            if lazy:
                handle = safe_open(file, framework="numpy")
                tensors.update({key: LazyTensor(handle, key) for key in handle.keys()})
            else:
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


def _flax_axes(name: str, ndim: int) -> tuple[int, ...]:
    """For each Flax axis, the torch axis it comes from (a conv kernel (O, I, *k) -> (*k, I, O); a linear
    one (out, in) -> (in, out); anything else keeps its layout)."""
    if name == "kernel" and ndim >= 3:
        return (*range(2, ndim), 1, 0)
    if name == "kernel" and ndim == 2:
        return (1, 0)
    return tuple(range(ndim))


def to_flax_layout(name: str, tensor: np.ndarray) -> np.ndarray:
    return np.transpose(tensor, _flax_axes(name, tensor.ndim))


def to_torch_layout(name: str, array: np.ndarray) -> np.ndarray:
    return np.transpose(array, np.argsort(_flax_axes(name, array.ndim)))


def _read(name: str, tensor, index: tuple, dtype) -> np.ndarray:
    """The Flax-layout slice `index` of a torch-layout tensor (read lazily if it is a LazyTensor), cast to
    `dtype`; a slice holding NaN or inf is an error."""
    axes = _flax_axes(name, tensor.ndim)
    torch_index = [slice(None)] * tensor.ndim
    for flax_axis, torch_axis in enumerate(axes):
        torch_index[torch_axis] = index[flax_axis] if flax_axis < len(index) else slice(None)
    part = tensor.read(tuple(torch_index)) if isinstance(tensor, LazyTensor) else np.asarray(tensor)[tuple(torch_index)]
    if np.issubdtype(part.dtype, np.inexact) and not np.isfinite(part).all():
        raise CheckpointError("holds NaN or inf (damaged weights, or a training run that diverged)")
    return np.transpose(part, axes).astype(dtype)


def import_params(state_dict: Mapping[str, np.ndarray], template, torch_key_of: TorchKeyOf,
                  ignore: Callable[[str], bool] = lambda key: False, shardings=None):
    """Fills a Flax param template from a PyTorch state dict.

    Args:
      state_dict: torch key -> array (or `LazyTensor`, see `load_state_dict(lazy=True)`).
      template: pytree of arrays or `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape(module.init, ...)['params']`).
      torch_key_of: Flax path (tuple of names) -> torch key.
      ignore: torch keys that are expected to be unused (buffers such as `position_ids`).
      shardings: optional tree of `jax.sharding.Sharding`s shaped like `template`: each param is then built on
        its devices from the slices each one holds (`jax.make_array_from_callback`), and with lazy tensors only
        those slices are read, so no host or device holds a whole tensor that the mesh splits.
    Returns: the params pytree in the template's dtypes: numpy arrays, or jax Arrays placed by `shardings`.
    """
    flat = traverse_util.flatten_dict(template)
    placements = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    out, used, problems = {}, set(), []
    for path, leaf in flat.items():
        key = torch_key_of(path)
        if key not in state_dict:
            problems.append(f"missing tensor {key!r} (for flax param {'/'.join(path)})")
            continue
        tensor = state_dict[key]
        shape = tuple(tensor.shape[a] for a in _flax_axes(path[-1], len(tensor.shape)))
        if shape != tuple(leaf.shape):
            problems.append(f"tensor {key!r} has shape {shape} after layout change, "
                            f"but flax param {'/'.join(path)} needs {tuple(leaf.shape)}")
            continue
        used.add(key)
        read = functools.partial(_read, path[-1], tensor, dtype=leaf.dtype)
        try:
            out[path] = jax.make_array_from_callback(shape, placements[path], read) if path in placements \
                else read(())
        except CheckpointError as e:
            problems.append(f"tensor {key!r} {e}")
    unused = sorted(k for k in state_dict if k not in used and not ignore(k))
    problems += [f"unused tensor {k!r} {tuple(state_dict[k].shape)}" for k in unused]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"checkpoint does not fit the module ({len(problems)} problems):\n  {shown}{more}")
    return traverse_util.unflatten_dict(out)


def placement(abstract_params, param_dtype, mesh=None, rules=None) -> tuple:
    """(template, shardings) for `import_params` from a model's abstract params in their `nn.Partitioned` boxes
    (e.g. `jax.eval_shape` of its init): ShapeDtypeStructs in `param_dtype`, and with a `mesh` the
    NamedShardings its logical axis names get under `rules` (default `jaxdiff.parallel.DEFAULT_RULES`);
    without a mesh, None (plain arrays)."""
    from jaxdiff import parallel

    template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype), nn.meta.unbox(abstract_params))
    if mesh is None:
        return template, None
    return template, parallel.shardings_for(abstract_params, mesh, parallel.DEFAULT_RULES if rules is None else rules)


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
