"""Held-out evaluation of trained components on the `shapes` test split.

- CLIP: zero-shot classification of single-object test images among the 24 prompts
  "a {colour} {shape}"; colour accuracy counts the predicted prompt's colour, shape accuracy
  its shape (so both are read off one 24-way decision).
- VAE: PSNR (dB, images in [-1, 1]) of the reconstruction through the posterior mean (what
  `TextToImage.encode_image` / `decode` do), averaged over images, and the standard deviation
  of the latents, whose inverse is the `scaling_factor` that gives diffusion unit-variance latents.

Test images are rendered from the split's scenes (`jaxdiff.data.render.scene_at(seed, 2, i)`),
which is exactly what the tfds `shapes` test split stores, so no prepared data is needed.

    python -m jaxdiff.training.evaluate --workdir runs/clip_shapes   # a clip or vae run
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import cli
from jaxdiff.data import render

TEST_SPLIT = 2  # split id of `test` in jaxdiff.data.shapes
TEST_SIZE = 1000  # examples in the default `shapes` test split


def shapes_test_set(resolution: int, examples: int, family: str | None = None, seed: int = 0):
    """(images float32 [N, R, R, 3] in [-1, 1], scenes): the first `examples` test scenes, or those of
    them in caption `family` (families interleave, so a quarter)."""
    if not 1 <= examples <= TEST_SIZE:
        raise ValueError(f"examples={examples}: the test split has {TEST_SIZE}; choose 1..{TEST_SIZE}")
    if family is not None and family not in render.FAMILIES:
        raise ValueError(f"family {family!r}: choose one of: {', '.join(render.FAMILIES)}")
    scenes = [render.scene_at(seed, TEST_SPLIT, i) for i in range(examples)
              if family is None or render.family_of(i) == family]
    if not scenes:
        raise ValueError(f"the first {examples} test examples hold no {family!r} scene")
    images = np.stack([render.render(s.objects, resolution) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return images, scenes


ZERO_SHOT_CLASSES = [(colour, shape) for colour in render.COLOURS for shape in render.SHAPES]


def clip_zero_shot(model, params, tokenize, resolution: int, examples: int = 1000, batch_size: int = 250) -> dict:
    """{'zero_shot_colour', 'zero_shot_shape'}: accuracies on the single-object images among the first
    `examples` of the test split (250 of the 1000).

    model: a `CLIPModel`; tokenize: list of str -> int32 [K, L] (the run's tokenizer)."""
    from jaxdiff.models.clip import zero_shot_classify

    images, scenes = shapes_test_set(resolution, examples, family="single")
    class_ids = jnp.asarray(tokenize([f"a {c} {s}" for c, s in ZERO_SHOT_CLASSES]))
    classify = jax.jit(lambda p, x: zero_shot_classify(model, p, x, class_ids)[1])
    predicted = np.concatenate([np.asarray(classify(params, images[i:i + batch_size]))
                                for i in range(0, len(images), batch_size)])
    truth = [(s.objects[0].colour, s.objects[0].shape) for s in scenes]
    guess = [ZERO_SHOT_CLASSES[k] for k in predicted]
    return {"zero_shot_colour": float(np.mean([g[0] == t[0] for g, t in zip(guess, truth)])),
            "zero_shot_shape": float(np.mean([g[1] == t[1] for g, t in zip(guess, truth)]))}


def psnr(reconstruction, target):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), per image: [B]."""
    mse = jnp.mean(jnp.square(jnp.clip(reconstruction, -1, 1) - target), axis=tuple(range(1, target.ndim)))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def vae_reconstruction(vae, params, resolution: int, examples: int = 1000, batch_size: int = 100) -> dict:
    """{'psnr': mean over test images, 'psnr_min', 'latent_std': std of the posterior means (unscaled)}."""
    images, _ = shapes_test_set(resolution, examples)

    @jax.jit
    def run(p, x):
        mean, _ = vae.apply({"params": p}, x, method=vae.encode)
        return psnr(vae.apply({"params": p}, mean, method=vae.decode), x), mean

    scores, means = zip(*(jax.device_get(run(params, images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)))
    scores = np.concatenate(scores)
    return {"psnr": float(np.mean(scores)), "psnr_min": float(np.min(scores)),
            "latent_std": float(np.std(np.concatenate(means)))}


# ---------------------------------------------------------------- a finished run

def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run wrote into its workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir!r} is not a training run's folder: no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def evaluate_run(workdir: str, step: int | None = None, examples: int = 1000) -> dict:
    """The held-out metrics of a run's EMA parameters (latest checkpoint, or `step`)."""
    from jaxdiff.training import recipes
    from jaxdiff.training.checkpoint import load_params
    from jaxdiff.training.data import data_spec

    config = read_run_config(workdir)
    config.eval_examples = examples
    task = recipes.build(config, data_spec(config.data))
    if task.evaluate is None:
        raise ValueError(f"recipe {config.recipe!r} on data {config.data.get('source')!r} has no held-out "
                         f"evaluation here (text-to-image models: export, then "
                         f"python -m jaxdiff.pipelines.shapes_eval --model)")
    import flax.linen as nn

    frozen = None if task.frozen is None else nn.meta.unbox(task.frozen)
    return task.evaluate(load_params(workdir, "ema", step), frozen)


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m jaxdiff.training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a clip or vae training run's folder")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--examples", type=int, default=1000, help="test-split examples to use (default: all 1000)")
    args = p.parse_args(argv)
    if not 1 <= args.examples <= TEST_SIZE:
        p.error(f"--examples={args.examples}: choose 1..{TEST_SIZE}")
    try:
        from jaxdiff.training.checkpoint import checkpoint_step

        read_run_config(args.workdir)
        checkpoint_step(args.workdir, args.step)  # both before the model and data load
        metrics = evaluate_run(args.workdir, args.step, args.examples)
    except (FileNotFoundError, ValueError) as e:
        if cli.debugging(argv):
            raise
        print(f"{p.prog}: error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m jaxdiff.training.evaluate"))
