"""The generic training loop: mesh, sharded state, the jitted step, checkpoints, metrics, samples.

    result = train(config, workdir, resume=True)

Every recipe runs through it (see `jaxdiff.training.recipes`). A run is a function of
(config, seed): batches, per-step keys and initial parameters are all derived from the seed,
so a resumed run continues exactly where the uninterrupted one would be.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff import parallel
from jaxdiff.training import recipes
from jaxdiff.training import state as state_lib
from jaxdiff.training.checkpoint import Checkpoints, abstract_like
from jaxdiff.training.config import check_batch_fits, validate
from jaxdiff.training.data import make_batches
from jaxdiff.training.metrics import MetricWriter
from jaxdiff.training.optim import lr_schedule, make_optimizer
from jaxdiff.training.steps import jit_train_step, make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss, or the state about to be saved, became NaN or infinite; the run stopped without saving it."""


@dataclasses.dataclass
class TrainResult:
    state: state_lib.TrainState
    losses: list[float]          # one per step run in this call
    workdir: str
    mesh: jax.sharding.Mesh
    frozen: Any = None           # the step's frozen input (as sharded over `mesh`), e.g. a LoRA's base model


def _put(tree, shardings):
    """Host arrays -> global arrays with `shardings`, each process filling its own shards."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                        tree, shardings)


def _setup_state(config, task, optimizer, mesh, rules):
    """(initial state, its shardings): initialised directly into its shards, boxes give the layout."""
    create = lambda: state_lib.create(task.init, optimizer, config.seed)
    boxed = jax.eval_shape(create)
    shardings = parallel.shardings_for(boxed, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda: nn.meta.unbox(create()), out_shardings=shardings)()
    return state, shardings


def train(config, workdir: str, *, resume: bool | str = False, stop_after: int | None = None) -> TrainResult:
    """Runs `config` up to `config.steps` updates, checkpointing into `workdir/checkpoints`.

    resume: False: a new run (a workdir that has checkpoints is refused); True: continue the newest
      intact checkpoint in `workdir` (params, EMA, optimizer, step, data position, RNG), an error when
      there is none; "auto": continue one if there is one, else start. Both are checked before the setup.
    stop_after: stop after this many updates without the final save, as if killed (tests).
    Raises NonFiniteLossError naming the step when the loss or the state to save is NaN/inf; the
    checkpoints left on disk are the last good ones; CheckpointError when none can be resumed.
    """
    validate(config)
    parallel.initialize_distributed(**config.distributed)
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.check_rules(config.rules)
    check_batch_fits(config, mesh)
    checkpoints = _open_checkpoints(workdir, config.keep_checkpoints, resume)
    main = jax.process_index() == 0

    batches, spec = make_batches(config.data, config.batch_size, config.seed)
    task = recipes.build(config, spec)
    optimizer = make_optimizer(config.optim, config.steps)
    state, state_shardings = _setup_state(config, task, optimizer, mesh, rules)
    frozen = frozen_shardings = None
    if task.frozen is not None:
        frozen_shardings = parallel.shardings_for(task.frozen, mesh, rules)
        frozen = _put(nn.meta.unbox(task.frozen), frozen_shardings)

    if resume and checkpoints.latest_step() is not None:
        step, state, data_state = checkpoints.restore_newest(abstract_like(state, state_shardings))
        batches.set_state(data_state)
        log.info("resumed from step %d", step)

    step_fn = jit_train_step(make_train_step(task.loss, optimizer, ema_decay=config.ema_decay,
                                             accumulate=config.accumulate,
                                             lr_fn=lr_schedule(config.optim, config.steps)),
                             mesh, rules, state_shardings, frozen_shardings, None)
    sample_fn = None
    if task.sample is not None and config.sample_every:
        replicated = NamedSharding(mesh, PartitionSpec())
        sample_fn = jax.jit(task.sample, out_shardings=replicated)
    writer = MetricWriter(workdir) if main else None
    if main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    losses = []
    start = int(jax.device_get(state.step))
    progress = _Progress(config, start, enabled=main)
    for done in range(start + 1, config.steps + 1):
        if stop_after is not None and done > stop_after:
            break
        batch = parallel.global_batch(next(batches), mesh)
        state, metrics = step_fn(state, frozen, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            progress.close()
            raise NonFiniteLossError(_nonfinite_loss(metrics["loss"], done, checkpoints))
        losses.append(metrics["loss"])
        rates = progress.update(metrics["loss"])
        if main and config.log_every and (done % config.log_every == 0 or done == config.steps):
            writer.scalars(done, {**metrics, **rates})
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps:
            _save(checkpoints, done, state, batches.get_state(), config, progress)
        if sample_fn is not None and (done % config.sample_every == 0 or done == config.steps):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                images = sample_fn(state.ema, frozen, state.key(state_lib.SAMPLE_STREAM))
            if main:
                writer.grid(done, np.asarray(images.addressable_data(0)))
        if task.evaluate is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                scores = task.evaluate(state.ema, frozen)
            if main:
                writer.scalars(done, {f"eval_{k}": v for k, v in scores.items()})
                log.info("step %d held-out: %s", done, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    progress.close()
    if writer:
        writer.close()
    checkpoints.close()
    return TrainResult(state=state, losses=losses, workdir=workdir, mesh=mesh, frozen=frozen)


def _open_checkpoints(workdir: str, keep: int, resume: bool | str) -> Checkpoints:
    """The run's checkpoints, once `workdir` and `resume` are known to fit each other."""
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume={resume!r}: choose one of: False (a new run), True (continue one), 'auto'")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"workdir {workdir!r} is a file; choose a folder (made if missing)")
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=keep)
    latest = checkpoints.latest_step()
    if latest is not None and resume is False:
        raise FileExistsError(f"{workdir!r} already has checkpoints (latest step {latest}); pass --resume to "
                              f"continue that run, or choose a new --workdir")
    if latest is None and resume is True:
        raise FileNotFoundError(f"nothing to resume: no checkpoint in {checkpoints.directory}; leave out --resume "
                                f"to start the run, or pass --resume=auto (resume if there is one)")
    return checkpoints


def _save(checkpoints: Checkpoints, step: int, state, data_state: dict, config, progress) -> None:
    """Saves the state of `step` unless part of it is NaN/inf (then NonFiniteLossError; nothing written)."""
    bad = state_lib.nonfinite_parts(state)
    if bad:
        progress.close()
        raise NonFiniteLossError(f"{', '.join(bad)} hold NaN or inf after step {step}; stopping without saving "
                                 f"this state. {_last_good(checkpoints)}")
    checkpoints.save(step, state, data_state, json.loads(config.to_json()))


def _nonfinite_loss(loss: float, step: int, checkpoints: Checkpoints) -> str:
    """The stop message. The loss of `step` is computed from the state after step - 1: if that state is
    the newest checkpoint, its parameters gave this loss (e.g. weights of 1e29 after a huge learning rate,
    finite but diverging), so resuming from it would fail again; it is set aside."""
    message = f"loss is {loss} at step {step}; stopping without saving this state."
    if checkpoints.latest_step() == step - 1:
        moved = checkpoints.set_aside(step - 1, "nonfinite")
        message += f" The step-{step - 1} checkpoint gave this loss; moved to {moved}."
    return f"{message} {_last_good(checkpoints)}"


def _last_good(checkpoints: Checkpoints) -> str:
    latest = checkpoints.latest_step()
    if latest is None:
        return f"No good checkpoint is left in {checkpoints.directory}."
    return f"The last good checkpoint is step {latest} in {checkpoints.directory}."


class _Progress:
    """tqdm bar with loss, steps/s, examples/s and ETA; rates exclude the first (compiling) step."""

    def __init__(self, config, start: int, enabled: bool):
        from tqdm.auto import tqdm

        self.batch_size = config.batch_size
        self.bar = tqdm(total=config.steps, initial=start, unit="step", disable=not enabled, dynamic_ncols=True,
                        desc=config.recipe)
        self.t0, self.n = None, 0

    def update(self, loss: float) -> dict:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        else:
            self.n += 1
        rate = self.n / max(now - self.t0, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate * self.batch_size:.1f}")
        return {"steps_per_sec": rate, "examples_per_sec": rate * self.batch_size}

    def close(self):
        self.bar.close()
