"""Caption -> layout (LMD's layout stage, `jaxdiff.models.layout`): teacher-forced slot prediction on the shapes
captions, or with config.data.num_frames on the moving_shapes captions (caption -> trajectories).

config.data (source 'layouts'): seed (the shapes dataset's: training scenes are `render.scene_at(seed, 0, i)`, the
train split, so the held-out prompts of the test split stay out; with num_frames, `render.motion_at(seed, 0, i,
num_frames)`, moving_shapes' of clips of that many frames), max_length, max_objects, num_frames (0: still layouts).
config.model: LayoutConfig's sizes (vocabulary, caption length and padding id come from the data).

Loss: cross-entropy of colour, shape and place class (and direction and speed class), summed over the slots that
hold an object, plus the binary cross-entropy of `present` over all slots. The held-out evaluation samples layouts
of `eval.heldout_prompts` (`heldout_video_prompts`) and scores them with `jaxdiff.data.layout.layout_report`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.data import render
from jaxdiff.data.eval import heldout_prompts, heldout_video_prompts
from jaxdiff.data.layout import layout_report, layout_violations, on_grid
from jaxdiff.models.layout import (
    LayoutConfig,
    LayoutTransformer,
    layout_targets,
    sample_layouts,
)
from jaxdiff.training.data import IndexedBatches, shapes_tokenizer
from jaxdiff.training.task import Task, init_boxed

TRAIN_SPLIT = 0   # split id of `train` in jaxdiff.data.shapes


def layout_examples(rng: np.random.Generator, n: int, seed: int, tokenizer, max_objects: int,
                    num_frames: int = 0) -> dict:
    """n train-split scenes (moving_shapes' of `num_frames`-frame clips if > 0) at indices drawn by `rng`: caption
    'tokens' [n, L] and their `layout_targets`.

    Scenes whose layout breaks a rule once on the place grid (`on_grid`; 4% of them, 8% of counting ones: two boxes
    MIN_GAP apart can touch once each centre moves half a bin; 1.4% of 8-frame motion scenes) are skipped: every
    layout the model learns, it can write.
    """
    scenes, frames = [], num_frames or None
    while len(scenes) < n:
        index = int(rng.integers(2 ** 31))
        scene = (render.motion_at(seed, TRAIN_SPLIT, index, num_frames) if num_frames
                 else render.scene_at(seed, TRAIN_SPLIT, index))
        if not layout_violations(scene.caption, on_grid(scene.objects, frames), frames):
            scenes.append(scene)
    tokens = np.asarray(tokenizer([s.caption for s in scenes]), np.int32)
    return {"tokens": tokens, **layout_targets([s.objects for s in scenes], max_objects, motion=bool(num_frames))}


def layout_batches(data, batch_size: int, seed: int) -> IndexedBatches:
    """config.data (source 'layouts') -> resumable batches of `layout_examples`; pure NumPy, nothing rendered."""
    tokenizer = shapes_tokenizer(data)
    return IndexedBatches(lambda rng, n: layout_examples(rng, n, data.seed, tokenizer, data.max_objects,
                                                         data.get("num_frames", 0)), batch_size, seed)


def layout_loss(logits: dict, batch: dict, fields):
    """(scalar loss, {loss_present, loss_<field> for each slot field, place_accuracy}); each loss part is summed
    over slots and averaged over the batch, the accuracy is over the slots that hold an object."""
    present = batch["present"].astype(jnp.float32)
    parts = {f"loss_{name}": jnp.mean(jnp.sum(
        optax.softmax_cross_entropy_with_integer_labels(logits[name], batch[name]) * present, axis=-1))
        for name in fields}
    parts["loss_present"] = jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits["present"], present), -1))
    hits = (jnp.argmax(logits["place"], axis=-1) == batch["place"]) * present
    return sum(parts.values()), {**parts, "place_accuracy": jnp.sum(hits) / jnp.maximum(jnp.sum(present), 1.0)}


def model_for(c, spec) -> LayoutTransformer:
    return LayoutTransformer(LayoutConfig(vocab_size=spec.vocab_size, max_length=spec.max_length,
                                          max_objects=c.data.max_objects, pad_token_id=spec.pad_token_id,
                                          num_frames=c.data.get("num_frames", 0), **c.model.to_dict()),
                             dtype=jnp.dtype(c.dtype))


def build(c, spec) -> Task:
    model = model_for(c, spec)

    frames = model.config.num_frames

    def init(key):
        return init_boxed(model, key, *model.example_inputs()[0])

    def loss(params, frozen, batch, key, step):
        current = {"current": batch["current"]} if frames else {}
        logits = model.apply({"params": params}, batch["tokens"], batch["previous"], **current)
        return layout_loss(logits, batch, model.config.slot_fields)

    def evaluate(params, frozen):
        """layout_report of one sampled layout per held-out prompt (eval_examples of them, the families
        interleaved; moving_shapes' held-out captions for a trajectory model): the share of valid layouts per
        family and overall, and per rule the share breaking it."""
        prompts = (heldout_video_prompts(c.eval_examples, frames, c.data.seed) if frames else
                   heldout_prompts(max(c.eval_examples // len(render.FAMILIES), 1), c.data.seed))
        report = layout_report(prompts, sample_layouts(model, params, spec.tokenize(prompts), jax.random.key(0)),
                               frames or None)
        scores = {k: v for k, v in report.items() if isinstance(v, float)}
        return {**scores, **{f"broken_{rule}": n / len(prompts) for rule, n in report["failures"].items()}}

    return Task(init=init, loss=loss, evaluate=evaluate)
