"""Does a text-to-image model place the subject of a relation prompt on the named side? For each model folder and
each relation prompt and its swap (the two objects exchanged), the guided x0 prediction at pure noise (flow
matching t = 1: x0 = noise - v; guidance 5, 32 noises, seed 0) is decoded and each named colour's centroid along the
relation's axis is measured (pixels weighted by closeness to the colour). The optimal prediction at t = 1 is the
training images' mean for the caption, which puts the subject on the named side; a model that reads the caption as
a bag of words predicts the same centroids for a prompt and its swap.

    python benchmarks/bench_order_probe.py FOLDER [FOLDER ...]     # flow-matching (MMDiT) folders
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.pipelines import TextToImage

COLOURS = {"red": (1, 0, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "green": (0, 1, 0)}
# (prompt, subject colour, object colour, axis: 0 rows / 1 columns); the subject comes first along the axis
PROMPTS = [("a red circle to the left of a blue square", "red", "blue", 1),
           ("a blue square to the left of a red circle", "blue", "red", 1),
           ("a yellow triangle above a green circle", "yellow", "green", 0),
           ("a green circle above a yellow triangle", "green", "yellow", 0)]
NOISES, GUIDANCE = 32, 5.0


def centroid(images, colour, axis):
    """Mean position in [0, 1) along `axis` of the pixels near `colour`, over images [N, H, W, 3]."""
    weight = np.clip(1 - np.abs(images - np.asarray(colour)).sum(-1) / 1.5, 0, None)   # [N, H, W]
    profile = weight.sum(axis=2 if axis == 0 else 1)                                    # [N, L]
    coords = np.arange(profile.shape[1]) / profile.shape[1]
    return float((profile * coords).sum() / profile.sum())


def main(folders):
    print("| model | prompt | subject centroid | object centroid | subject on the named side |")
    print("|---|---|---:|---:|---|")
    for folder in folders:
        pipe = TextToImage.from_pretrained(folder)
        if pipe.schedule.kind != "flow":
            raise SystemExit(f"{folder}: not a flow-matching model (this probe reads x0 = noise - v at t = 1)")
        side = pipe.denoiser.config.sample_size
        noise = jax.random.normal(jax.random.key(0), (NOISES, side, side, pipe.vae.config.latent_channels))
        for prompt, subject, obj, axis in PROMPTS:
            model_fn = pipe.guided_model(pipe.denoiser_params, pipe.text_params, pipe.tokenize([prompt] * NOISES),
                                         pipe.tokenize([""] * NOISES), GUIDANCE)
            x0 = noise - model_fn(noise, jnp.full((NOISES,), 1000.0))
            images = np.asarray(pipe.decode(pipe.vae_params, x0))
            a, b = centroid(images, COLOURS[subject], axis), centroid(images, COLOURS[obj], axis)
            print(f"| {folder} | {prompt} | {a:.3f} | {b:.3f} | {'yes' if a < b else 'no'} |")


if __name__ == "__main__":
    main(sys.argv[1:])
