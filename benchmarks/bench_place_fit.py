"""Can a U-Net learn a place word, and how fast? A clean two-prompt regression at pure noise.

For each model folder: the U-Net's output at t = 999 on 8 noise latents, read as the x_0 prediction
(minus the output: v-prediction at SNR 0; for other objectives it is just a regression head), is fitted
with Adam (lr 1e-4, full batch) to the mean VAE latent of the training images captioned "... on the
left" for the prompt "a red circle on the left", and to that of "... on the right" for "a red circle on
the right", with the same noise for both prompts. The only way to fit both is to read the place word.
Reported: the mean |left - right| gap of the model's predictions (the data's gap is the target) at
steps 0, 100, ... The loss first plateaus at the prompts' common mean; the step where the gap opens
is how hard the place word is to pick up from the starting weights.

    python benchmarks/bench_place_fit.py jaxdiff/assets/shapes [more folders] [--steps 600]

Needs the shapes/32px training split (python -m jaxdiff.data.prepare shapes --resolution 32).
Prints a table and writes it to BENCHMARKS.md (section "Place-word fit"); never used as a test.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_section  # noqa: E402

PROMPTS = {"left": "a red circle on the left", "right": "a red circle on the right"}
EXAMPLES = 20000     # training records scanned for the two captions' images
NOISE = 8


def place_means(pipe) -> dict:
    """{'left' | 'right': mean VAE latent [h, w, C] of the training images whose caption ends that way}."""
    import tensorflow_datasets as tfds

    import jaxdiff.data  # noqa: F401  registers the builders

    records = tfds.data_source("shapes/32px", split="train")
    images = {k: [] for k in PROMPTS}
    for i in range(EXAMPLES):
        caption = records[i]["caption"].decode()
        for k in PROMPTS:
            if caption.endswith(f"on the {k}"):
                images[k].append(np.asarray(records[i]["image"]))
    return {k: np.asarray(pipe.encode_image(pipe.vae_params, jnp.asarray(np.stack(v), jnp.float32) / 127.5 - 1))
            .mean(0) for k, v in images.items()}


def fit(pipe, means, steps: int, every: int = 100):
    """[(step, loss, gap)] of the two-prompt regression."""
    z = jax.random.normal(jax.random.key(0), pipe.latent_shape(NOISE, 32, 32))
    noise = jnp.concatenate([z, z])
    context = pipe.encode_text(pipe.text_params, jnp.asarray(pipe.tokenize([PROMPTS["left"]] * NOISE
                                                                           + [PROMPTS["right"]] * NOISE)))
    target = jnp.concatenate([jnp.broadcast_to(means[k], (NOISE, *means[k].shape)) for k in PROMPTS])
    t = jnp.full((2 * NOISE,), 999.0)

    def loss(p):
        x0 = -pipe.unet.apply({"params": p}, noise, t, context)
        return jnp.mean((x0 - target) ** 2), x0

    opt = optax.adam(1e-4)

    @jax.jit
    def step(p, state):
        (value, x0), grads = jax.value_and_grad(loss, has_aux=True)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value, x0

    params, state, rows = pipe.unet_params, opt.init(pipe.unet_params), []
    for i in range(steps + 1):
        new_params, new_state, value, x0 = step(params, state)
        if i % every == 0:
            rows.append((i, float(value), float(jnp.abs(x0[:NOISE].mean(0) - x0[NOISE:].mean(0)).mean())))
        params, state = new_params, new_state
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="text-to-image model folders")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    from jaxdiff.pipelines import TextToImage

    lines = []
    for folder in args.folders:
        pipe = TextToImage.from_pretrained(folder)
        means = place_means(pipe)
        target = float(np.abs(means["left"] - means["right"]).mean())
        rows = fit(pipe, means, args.steps)
        lines.append(f"| {folder} | {target:.3f} | " + " | ".join(f"{gap:.4f} ({value:.4f})" for _, value, gap in rows)
                     + " |")
    steps = [i for i, _, _ in rows]
    table = "\n".join([f"| model | data gap | " + " | ".join(f"step {i}: gap (loss)" for i in steps) + " |",
                       "|---|---:|" + "---:|" * len(steps), *lines])
    print(table)
    if not args.no_write:
        write_section("Place-word fit", __doc__.split("\n\n")[1] + "\n\n" + table)


if __name__ == "__main__":
    main()
