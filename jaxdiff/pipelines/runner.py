"""What every pipeline does around its one jitted program: check the prompts, seed and guidance, merge
the sampler options, cache the compiled program per static setup, split the batch over a mesh's 'data'
axis, show a progress bar over the denoising steps, and refuse a result that is not finite.

    runner = Runner()
    program = runner.program(key, build)          # jax.jit(build()) the first time `key` is seen (or on disk)
    out = runner.run(program, params, batch, *rest, steps=25, progress=True, mesh=mesh)

A pipeline owns one Runner (its programs close over the pipeline's modules); editing functions
reach the cache through `program`, never through the pipeline's fields.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.driver import check_number
from jaxdiff.trace_cache import StoredProgram

# jax.random.key keeps 32 bits of a seed: a larger one would silently give a smaller one's images.
MAX_SEED = 2**32 - 1


class NonFiniteOutputError(ValueError):
    """A generated batch holds NaN or inf: nothing is returned."""


def prompt_lists(prompts, negative_prompts) -> tuple[list[str], list[str]]:
    """Prompts and one negative prompt each ("" when none are given), checked."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    negative = [""] * len(prompts) if negative_prompts is None else (
        [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts))
    if len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one per prompt")
    return prompts, negative


def check_seed(seed, count: int = 1, name: str = "seed") -> None:
    """Seeds seed .. seed+count-1 (a run that uses one per batch or grid row) must lie in 0..MAX_SEED."""
    top = MAX_SEED - (count - 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= top:
        used = f" (this run also uses {name} + 1 .. {name} + {count - 1})" if count > 1 else ""
        raise ValueError(f"{name} must be an integer in 0..{top}{used}, got {seed!r}")


def check_guidance(guidance_scale, guidance_rescale) -> None:
    check_number("guidance_scale", guidance_scale)
    check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)


def check_finite_outputs(outputs) -> None:
    """Refuses a result with NaN or inf in any array (images, latents, trajectory), naming the likely causes."""
    for a in jax.tree.leaves(outputs):
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            continue
        # on the host: an eager device op would compile a program in every fresh process
        bad = ~np.isfinite(np.asarray(a, np.float32)).reshape(a.shape[0], -1).all(axis=1)
        if bool(bad.any()):
            raise NonFiniteOutputError(
                f"the generated batch holds NaN or inf ({int(bad.sum())} of {a.shape[0]} examples), so nothing is "
                f"returned: the model's weights or the inputs (guidance scale, noise, images) are not finite or too large; "
                f"check the inputs, and the model folder against a fresh export or download")


def sampler_options(defaults: dict, overrides: dict) -> tuple:
    """A pipeline's sampler defaults updated by one call's `samplers.sample` keyword arguments, as a
    sorted tuple: hashable, so it is part of a program's cache key."""
    return tuple(sorted({**defaults, **overrides}.items()))


def shard_over_data(mesh, params, batch: Sequence):
    """Batch arrays [B, ...] (or tuples of them; None kept) split over the mesh's 'data' axis, params replicated
    on every device unless they are already placed on this mesh."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    if "data" not in mesh.axis_names:
        raise ValueError(f"the mesh needs a 'data' axis, it has {mesh.axis_names}")
    n = mesh.shape["data"]
    size = jax.tree.leaves(batch[0])[0].shape[0]
    if size % n:
        raise ValueError(f"batch {size} is not divisible by the mesh's data axis ({n}); pad the prompts")
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    # params loaded onto this mesh (`from_pretrained(mesh=...)`) keep their shardings; others are replicated
    on_mesh = lambda p: isinstance(p, jax.Array) and getattr(p.sharding, "mesh", None) == mesh
    params = jax.tree.map(lambda p: p if on_mesh(p) else jax.device_put(p, replicated), params)
    return params, [None if a is None else jax.device_put(a, data) for a in batch]


def progress_bar(steps: int):
    from tqdm import tqdm

    return tqdm(total=steps, desc="denoising", unit="step", leave=False)


class Runner:
    """The compile cache of one pipeline's programs and the progress bar of the run in flight."""

    def __init__(self):
        self.programs: dict[tuple, Callable] = {}
        self._bar: Any = None

    def program(self, key: tuple, build: Callable[[], Callable],
                identity: Callable[[], str | None] = lambda: None) -> Callable:
        """The jitted program cached under `key` (its static setup); `build()` makes the function the first time.
        `identity()`: a text naming everything that function reads besides its arguments, under which a fresh process
        finds it traced on disk (`jaxdiff.trace_cache.StoredProgram`; None: traced in every process)."""
        if key not in self.programs:
            self.programs[key] = StoredProgram(jax.jit(build()), identity())
        return self.programs[key]

    def sampler_kwargs(self, options: tuple, progress: bool) -> dict:
        """`samplers.sample` keyword arguments of `sampler_options`; with `progress`, the step callback
        that moves the bar (part of the program, hence `progress` in its key)."""
        kwargs = dict(options)
        if progress:
            kwargs["callback"] = self._on_step
        return kwargs

    def _on_step(self, step):
        """Host side of the progress bar: called from inside the sampling scan after every step."""
        if self._bar is not None:
            self._bar.update(int(step) - self._bar.n)

    def run(self, program: Callable, params, batch: Sequence, *rest, steps: int, progress: bool, mesh=None):
        """program(params, *batch, *rest), waited for and checked finite (`check_finite_outputs`). With a
        `mesh` (a `jax.sharding.Mesh` with a 'data' axis) the batch arrays [B, ...] are split over that axis
        and the params replicated; `progress` shows a bar over the `steps` denoising steps."""
        if mesh is not None:
            params, batch = shard_over_data(mesh, params, batch)
        self._bar = progress_bar(steps) if progress else None
        try:
            out = jax.block_until_ready(program(params, *batch, *rest))
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
        check_finite_outputs(out)
        return out
