"""What a fresh process would otherwise trace again, kept on disk beside JAX's persistent compilation cache
(`jaxdiff.compilation_cache.enable`, as the CLIs run): a model's param shapes (`load_shapes` / `store_shapes`) and
whole programs as `jax.export` artifacts (`StoredProgram`).

The persistent cache skips compiling, not tracing: a warm process still traces every Flax module of a sampling
program to find its cache entry (1-2 s of a 3-4 s first image on 2 cores). A stored program is traced once; later
processes deserialize it and compile it from the cache.

Every entry is named by what made it: its own identity (a model's class and fields, or a pipeline's `fingerprint`
and static setup), the argument shapes and dtypes, the jax / jaxlib / flax versions and the size and time of every
jaxdiff source file (`source_stamp`: an edit or an upgrade makes new entries). A damaged entry is made again; an
unwritable cache folder only costs the next process the trace. Off while the persistent cache is off, and on more
than one device (stored programs carry no shardings).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from typing import Any, Callable

import jax
import numpy as np

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def folder(kind: str) -> str | None:
    """`<compilation cache dir>-<kind>`, or None while the persistent compilation cache is off."""
    cache = jax.config.jax_compilation_cache_dir
    return cache.rstrip(os.sep) + "-" + kind if cache else None


@functools.lru_cache(maxsize=None)
def source_stamp() -> tuple:
    """The jax, jaxlib and flax versions and (name, mtime, size) of every jaxdiff source file (read once a process)."""
    import flax
    import jaxlib

    files = []
    for root, _, names in os.walk(_PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                stat = os.stat(path)
                files.append((os.path.relpath(path, _PACKAGE), stat.st_mtime_ns, stat.st_size))
    return jax.__version__, jaxlib.__version__, flax.__version__, tuple(sorted(files))


def entry(kind: str, key: Any, suffix: str) -> str | None:
    """The file of `key` (any JSON-able value) in folder(kind), named by its hash with the source stamp."""
    where = folder(kind)
    if where is None:
        return None
    text = json.dumps([key, source_stamp()], default=str)
    return os.path.join(where, hashlib.sha256(text.encode()).hexdigest() + suffix)


def write_atomically(path: str, data: bytes) -> None:
    """`data` to `path` through a temporary file (a reader never sees half an entry); a read-only cache is skipped."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=os.path.dirname(path), delete=False, suffix=".tmp") as f:
            f.write(data)
        os.replace(f.name, path)
    except OSError:
        pass


# -- param shapes -------------------------------------------------------------------------------------------------

def shapes_file(module) -> str | None:
    """Where `module`'s param shapes are kept: named by its class and fields (config, dtypes)."""
    return entry("param-shapes", [type(module).__module__, type(module).__qualname__, repr(module)], ".json")


def load_shapes(module):
    """`module`'s boxed abstract params as `store_shapes` kept them, or None (none kept, or a damaged entry)."""
    import flax.linen as nn
    from flax import traverse_util

    path = shapes_file(module)
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            leaves = json.load(f)

        def leaf(shape, dtype, names):
            value = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
            return value if names is None else nn.LogicallyPartitioned(value, tuple(names))

        return traverse_util.unflatten_dict({k: leaf(*v) for k, v in leaves.items()}, sep="/")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_shapes(module, params) -> None:
    """Keeps boxed abstract `params` of `module` as {'/'-joined path: [shape, dtype, logical axis names or None]}."""
    import flax.linen as nn
    from flax import traverse_util

    path = shapes_file(module)
    if path is None:
        return
    flat = traverse_util.flatten_dict(params, sep="/", is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    leaves = {k: [list(v.value.shape), str(v.value.dtype), list(v.names)] if isinstance(v, nn.Partitioned)
              else [list(v.shape), str(v.dtype), None] for k, v in flat.items()}
    write_atomically(path, json.dumps(leaves).encode())


# -- whole programs -----------------------------------------------------------------------------------------------

class Unstable(TypeError):
    """A value with no text that names it the same way in every process (an object compared by its address)."""


def fingerprint(value) -> str:
    """A text naming `value` the same way in every process: arrays by dtype, shape and the hash of their bytes,
    containers and dataclasses field by field, Flax modules by their repr (class and fields), numbers and strings by
    repr. Raises Unstable for anything else."""
    import flax.linen as nn

    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        a = np.asarray(value)
        return f"array({a.dtype}, {a.shape}, {hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()})"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}({', '.join(fingerprint(v) for v in value)})"
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{fingerprint(k)}: {fingerprint(v)}" for k, v in
                                   sorted(value.items(), key=lambda kv: repr(kv[0]))) + ")"
    if isinstance(value, nn.Module):
        text = repr(value)
        if " at 0x" in text:
            raise Unstable(f"{type(value).__name__} holds an object named by its address")
        return text
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={fingerprint(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return f"{type(value).__module__}.{type(value).__qualname__}({fields})"
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return repr(np.dtype(value))
    raise Unstable(f"no stable name for a {type(value).__name__}")


def identity(*parts) -> str | None:
    """A StoredProgram's identity: the `fingerprint`s of `parts`, or None where one has none (never stored)."""
    try:
        return json.dumps([fingerprint(part) for part in parts])
    except Unstable:
        return None


def signature(args) -> str | None:
    """The arguments' tree structure, shapes, dtypes and weak types; None where one is not an array or scalar."""
    leaves, tree = jax.tree.flatten(args)
    avals = []
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            aval = jax.typeof(leaf)
            avals.append([list(aval.shape), str(aval.dtype), bool(aval.weak_type)])
        elif isinstance(leaf, (np.ndarray, np.generic)):
            avals.append([list(leaf.shape), str(leaf.dtype), False])
        elif isinstance(leaf, (bool, int, float)):
            avals.append([[], type(leaf).__name__, True])
        else:
            return None
    return json.dumps([str(tree), avals])


class StoredProgram:
    """`jitted` (a jax.jit function), called through a `jax.export` of it kept on disk per argument signature, so a
    fresh process deserializes the traced program instead of tracing it again. `identity`: a text naming everything
    the function reads besides its arguments (None: never stored, every call is `jitted`'s)."""

    def __init__(self, jitted: Callable, identity: str | None):
        self.jitted, self.identity = jitted, identity
        self.calls: dict[str, Callable] = {}

    def __call__(self, *args):
        if self.identity is None or folder("programs") is None or jax.device_count() != 1:
            return self.jitted(*args)
        sig = signature(args)
        if sig is None:
            return self.jitted(*args)
        if sig not in self.calls:
            self.calls[sig] = self._exported(sig, args)
        return self.calls[sig](*args)

    def cache_size(self) -> int:
        """How many traced programs this holds: the jitted function's, and one per signature read from disk."""
        return self.jitted._cache_size() + sum(call is not self.jitted for call in self.calls.values())

    def _exported(self, sig: str, args) -> Callable:
        path = entry("programs", [self.identity, sig], ".bin")
        if os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    return jax.jit(jax.export.deserialize(bytearray(f.read())).call)
            except Exception:   # noqa: BLE001  a damaged entry: exported again below
                pass
        try:
            exported = jax.export.export(self.jitted)(*args)
        except Exception:   # noqa: BLE001  not exportable (a host callback); a bad input fails again in `jitted`
            return self.jitted
        write_atomically(path, bytes(exported.serialize()))
        return jax.jit(exported.call)
