"""What every pipeline does around its one jitted program: check the prompts, merge the sampler
options, cache the compiled program per static setup, split the batch over a mesh's 'data' axis,
and show a progress bar over the denoising steps.

    runner = Runner()
    program = runner.program(key, build)          # jax.jit(build()) the first time `key` is seen
    out = runner.run(program, params, batch, *rest, steps=25, progress=True, mesh=mesh)

A pipeline owns one Runner (its programs close over the pipeline's modules); editing functions
reach the cache through `program`, never through the pipeline's fields.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax


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


def sampler_options(defaults: dict, overrides: dict) -> tuple:
    """A pipeline's sampler defaults updated by one call's `samplers.sample` keyword arguments, as a
    sorted tuple: hashable, so it is part of a program's cache key."""
    return tuple(sorted({**defaults, **overrides}.items()))


def shard_over_data(mesh, params, batch: Sequence):
    """Batch arrays [B, ...] (None kept) split over the mesh's 'data' axis, params replicated on every device."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    if "data" not in mesh.axis_names:
        raise ValueError(f"the mesh needs a 'data' axis, it has {mesh.axis_names}")
    n = mesh.shape["data"]
    size = batch[0].shape[0]
    if size % n:
        raise ValueError(f"batch {size} is not divisible by the mesh's data axis ({n}); pad the prompts")
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    return params, [None if a is None else jax.device_put(a, data) for a in batch]


def progress_bar(steps: int):
    from tqdm import tqdm

    return tqdm(total=steps, desc="denoising", unit="step", leave=False)


class Runner:
    """The compile cache of one pipeline's programs and the progress bar of the run in flight."""

    def __init__(self):
        self.programs: dict[tuple, Callable] = {}
        self._bar: Any = None

    def program(self, key: tuple, build: Callable[[], Callable]) -> Callable:
        """The jitted program cached under `key` (its static setup); `build()` makes the function the first time."""
        if key not in self.programs:
            self.programs[key] = jax.jit(build())
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
        """program(params, *batch, *rest), waited for. With a `mesh` (a `jax.sharding.Mesh` with a 'data'
        axis) the batch arrays [B, ...] are split over that axis and the params replicated; `progress`
        shows a bar over the `steps` denoising steps."""
        if mesh is not None:
            params, batch = shard_over_data(mesh, params, batch)
        self._bar = progress_bar(steps) if progress else None
        try:
            return jax.block_until_ready(program(params, *batch, *rest))
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
