"""Checkpoints through orbax's CheckpointManager: the train state, the data iterator's position
and the config, one step per folder.

Orbax writes each step into a temporary folder and renames it when complete, so a save that
is interrupted leaves the previous checkpoints untouched (the partial folder is ignored and
cleaned up). Restoring takes target shardings, so a checkpoint written on one mesh restores
onto any other mesh or device count. A checkpoint that cannot be used (damaged on disk, or one whose
state gave a non-finite loss) is moved aside into `checkpoints_set_aside/`, never deleted.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed: none is intact, or the newest readable one does not fit the config."""


class Checkpoints:
    """Save every `every` steps (the caller decides when), keep the last `keep`."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}   # item_metadata needs them
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, config: dict) -> None:
        """Blocks until the step is on disk (and renamed into place)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state),
                                                        config=ocp.args.JsonSave(config)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """(state, data_state) of `step`; `abstract_state`: a tree of jax.ShapeDtypeStruct with the
        target shardings (any mesh)."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 data=ocp.args.JsonRestore()))
        return out.state, out.data

    def restore_newest(self, abstract_state) -> tuple[int, Any, dict]:
        """(step, state, data_state) of the newest checkpoint that restores. A newer damaged one (files
        missing or unreadable) is reported in one warning and set aside; CheckpointError when none is
        intact, or when the newest readable one's shapes differ from `abstract_state` (the config changed)."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                saved = self.manager.item_metadata(step).state
                mismatch = saved is not None and shape_mismatch(saved, abstract_state)
            except Exception as e:  # orbax and tensorstore raise many kinds; any means unreadable
                self._damaged(step, e)
                continue
            if mismatch:
                raise CheckpointError(f"checkpoint {self._folder(step)} does not fit this config: {mismatch}; "
                                      f"resume with the config it was written with, or use a new workdir")
            try:
                return (step, *self.restore(step, abstract_state))
            except Exception as e:
                self._damaged(step, e)
        raise CheckpointError(f"no intact checkpoint to resume in {self.directory} (damaged ones are in "
                              f"{self.set_aside_dir}); start the run again without --resume")

    @property
    def set_aside_dir(self) -> str:
        return self.directory + "_set_aside"

    def set_aside(self, step: int, why: str) -> str:
        """Moves `step`'s folder out of the manager's sight into `set_aside_dir/<step>.<why>` (never
        deleted; a later save of the same step does not collide with it); returns the new path."""
        target = os.path.join(self.set_aside_dir, f"{step}.{why}")
        n = 1
        while os.path.exists(target):
            target, n = os.path.join(self.set_aside_dir, f"{step}.{why}.{n}"), n + 1
        if jax.process_index() == 0:
            os.makedirs(self.set_aside_dir, exist_ok=True)
            os.rename(self._folder(step), target)
        self.manager.reload()
        return target

    def _damaged(self, step: int, error: Exception) -> None:
        moved = self.set_aside(step, "damaged")
        log.warning("checkpoint %s is damaged (%s: %s); moved to %s, trying the one before it",
                    self._folder(step), type(error).__name__, _first_line(error), moved)

    def _folder(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree, shardings):
    """jax.ShapeDtypeStruct leaves carrying `shardings` (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def shape_mismatch(saved, wanted) -> str | None:
    """The first leaf (parameters first) whose shape differs between two state trees, or that only one
    has, as 'params/Dense_0/kernel has shape (32, 2) in the checkpoint, (32, 4) here'; None if all match."""
    saved, wanted = _shapes(saved), _shapes(wanted)
    for path in sorted(saved.keys() | wanted.keys(), key=lambda p: (not p.startswith("params/"), p)):
        there, here = saved.get(path), wanted.get(path)
        if there != here:
            return (f"{path} is not in the checkpoint" if there is None else
                    f"{path} is in the checkpoint but not in this config" if here is None else
                    f"{path} has shape {there} in the checkpoint, {here} here")
    return None


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in leaves
            if hasattr(x, "shape")}


def _first_line(error: Exception) -> str:
    return next((l.strip() for l in str(error).splitlines() if l.strip()), "no message")


def latest_step(workdir: str) -> int:
    """The newest checkpointed step of the training run in `workdir`."""
    return checkpoint_step(workdir)


def checkpoint_step(workdir: str, step: int | None = None) -> int:
    """`step` if the run in `workdir` has a checkpoint of it, the newest step if None; FileNotFoundError
    naming the steps there otherwise."""
    directory = _checkpoints_dir(workdir)
    manager = ocp.CheckpointManager(directory)
    steps = list(manager.all_steps())
    manager.close()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory!r}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory!r}; its steps: {', '.join(map(str, steps))}")
    return max(steps) if step is None else step


def load_params(workdir: str, which: str = "ema", step: int | None = None):
    """The `params` or `ema` tree of a training run's checkpoint (in `workdir/checkpoints`, latest
    step by default), as host numpy arrays; for loading a trained model (e.g. the frozen text
    encoder of latent diffusion) without knowing its optimizer."""
    if which not in ("ema", "params"):
        raise ValueError(f"which={which!r}: choose one of: ema, params")
    step = checkpoint_step(workdir, step)
    manager = ocp.CheckpointManager(_checkpoints_dir(workdir))
    # Without a target orbax restores the saved tree as nested dicts of arrays.
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    manager.close()
    return jax.tree.map(np.asarray, state[which])


def _checkpoints_dir(workdir: str) -> str:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints folder in {workdir!r} (expected {directory})")
    return directory
