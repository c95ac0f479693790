"""Meshes, logical axis rules and sharding helpers: the same training code on any device mesh.

Models name their parameter and activation axes logically (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); a list of rules, plain config data, maps each logical name
to mesh axes. A logical name may appear in several rules: Flax takes the first whose mesh
axes are still free in that array, which lets `embed` shard parameters over `fsdp` while
activations, whose batch already uses `fsdp`, keep `embed` whole.

    mesh = make_mesh({"data": -1, "fsdp": 2, "context": 1, "tensor": 1})
    shardings = shardings_for(jax.eval_shape(init_fn, key), mesh, DEFAULT_RULES)
    batch = global_batch(local_numpy_batch, mesh)
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# `context` splits the token sequence of activations (long videos): see `jaxdiff.models.attention`.
MESH_AXES = ("data", "fsdp", "context", "tensor")
# The mesh axes a batch is split over: pure data parallelism and FSDP both split the batch.
BATCH_AXES = ("data", "fsdp")

# Every logical axis name used by jaxdiff.models (parameters and activations).
# tests/test_parallel.py checks that this list covers every name the models emit.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    # parameters: FSDP over the input (embedding) side, tensor parallelism over the output side
    ("embed", "fsdp"),
    # Conv kernels split only their output channels. Splitting their input channels over fsdp,
    # which also splits the batch, gave wrong gradients (relative error ~1) on XLA:CPU in jax
    # 0.10.2 on a (2, 2, 2) mesh, while each axis alone was exact: measured, see tests/test_parallel.py.
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("channels", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed_proj", "tensor"),
    # activations: a token sequence is split over context (sequence parallelism; size 1 unless configured)
    ("length", "context"),
    # fallbacks when the mesh axis is already taken in that array (e.g. activations' embed)
    ("embed", None),
    ("channels", None),
    ("patch", None),
    ("norm", None),
    ("conv_time", None),
    ("conv_height", None),
    ("conv_width", None),
    ("height", None),
    ("width", None),
)


def mesh_shape(sizes: Mapping[str, int], device_count: int) -> tuple[int, ...]:
    """Resolves the sizes of (data, fsdp, context, tensor); absent ones are 1, at most one may be -1 (all remaining
    devices).

    Raises ValueError naming the bad size and the device count it must divide.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; choose from: {', '.join(MESH_AXES)}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    for axis, n in zip(MESH_AXES, shape):
        if n == 0 or n < -1:
            raise ValueError(f"mesh.{axis}={n}: a mesh axis size must be a positive int or -1 (infer)")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        if device_count % known:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))}: the fixed axes ({known} devices) do not "
                             f"divide the {device_count} devices")
        shape[shape.index(-1)] = device_count // known
    if math.prod(shape) != device_count:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))} use {math.prod(shape)} devices, "
                         f"but there are {device_count}")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, context, tensor) mesh over all devices (of every process), sizes from config, -1 inferred.

    Axis types are Auto: the logical-axis style (`with_logical_constraint`) needs them.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def check_rules(rules) -> tuple[tuple[str, Any], ...]:
    """Rules as config data -> a tuple of (logical name, mesh axis | tuple of axes | None)."""
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"bad logical axis rule {rule!r}; need (logical_name, mesh_axis or None)")
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"logical axis rule {rule!r} names mesh axis {a!r}; choose from: "
                                 f"{', '.join(MESH_AXES)} or None")
        out.append((name, axes))
    return tuple(out)


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))


def spec_for(shape: Sequence[int], names: Sequence[str | None] | None, mesh, rules) -> PartitionSpec:
    """The mesh PartitionSpec for an array of `shape` with logical axis `names`.

    A dimension that its mesh axes do not divide stays whole (e.g. 3 RGB input channels on
    tensor=2): jit's in/out shardings need even splits, and such arrays are small.
    """
    if not names:
        return PartitionSpec()
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    return PartitionSpec(*(axes if dim % _axis_size(mesh, axes) == 0 else None for dim, axes in zip(shape, spec)))


def shardings_for(abstract_tree, mesh, rules):
    """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes (e.g. `jax.eval_shape` of an init).

    Boxed leaves shard by their logical names; plain leaves are replicated. The result has the
    structure of the *unboxed* tree (`nn.meta.unbox(abstract_tree)`).
    """
    rules = check_rules(rules)

    def one(leaf):
        names = leaf.names if isinstance(leaf, nn.Partitioned) else None
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        return NamedSharding(mesh, spec_for(np.shape(value), names, mesh, rules))

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over (data, fsdp), the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local_batch, mesh):
    """This process's rows of the batch (numpy tree) -> global jax Arrays split over (data, fsdp).

    Each process passes the rows its devices hold (rows [p*B/P, (p+1)*B/P) of the global
    batch on the usual device order, see `process_rows`).
    """
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), x),
                        local_batch)


def process_rows(global_batch_size: int) -> slice:
    """The slice of a global batch that this process feeds to `global_batch`."""
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"batch_size={global_batch_size} is not a multiple of the process count {n}")
    per = global_batch_size // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def initialize_distributed(coordinator: str = "", num_processes: int = 1, process_id: int = 0,
                           cpu_collectives: str = "gloo") -> None:
    """`jax.distributed.initialize` for a multi-process run; no-op for one process.

    With an empty coordinator on a cluster (SLURM, TPU pods, ...), JAX discovers the values
    itself. On CPU, cross-process collectives need an implementation: gloo ships with jaxlib.
    """
    if num_processes == 1 and not coordinator:
        return
    # Must precede any backend use, so it is set without asking which backend runs.
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
