"""Checkpoints through orbax's CheckpointManager: the train state, the data iterator's position
and the config, one step per folder.

Orbax writes each step into a temporary folder and renames it when complete, so a save that
is interrupted leaves the previous checkpoints untouched (the partial folder is ignored and
cleaned up). Restoring takes target shardings, so a checkpoint written on one mesh restores
onto any other mesh or device count.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
    """Save every `every` steps (the caller decides when), keep the last `keep`."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

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

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree, shardings):
    """jax.ShapeDtypeStruct leaves carrying `shardings` (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def latest_step(workdir: str) -> int:
    """The newest checkpointed step of the training run in `workdir`."""
    directory = _checkpoints_dir(workdir)
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    manager.close()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory!r}")
    return step


def load_params(workdir: str, which: str = "ema", step: int | None = None):
    """The `params` or `ema` tree of a training run's checkpoint (in `workdir/checkpoints`, latest
    step by default), as host numpy arrays; for loading a trained model (e.g. the frozen text
    encoder of latent diffusion) without knowing its optimizer."""
    if which not in ("ema", "params"):
        raise ValueError(f"which={which!r}: choose one of: ema, params")
    step = latest_step(workdir) if step is None else step
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
