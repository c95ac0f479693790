"""Does a text-to-image model place the subject of a relation prompt on the named side? For each model folder and
each relation prompt and its swap (the two objects exchanged), the guided x0 prediction at pure noise (flow
matching t = 1: x0 = noise - v; guidance 5, seed 0) is decoded and each named colour's centroid along the
relation's axis is measured (pixels weighted by closeness to the colour). The optimal prediction at t = 1 is the
training images' mean for the caption, which puts the subject on the named side; a model that reads the caption as
a bag of words predicts the same centroids for a prompt and its swap.

Two tables: the four named prompts (32 noises each), then a summary over 40 prompts (each of the four relations,
5 random colour/shape pairs and their 5 swaps, 16 noises each): per relation the mean gap (how far the object's
centroid lies past the subject's on the named side, in image widths; the training scenes' mean is about 0.44, a
bag-of-words model's 0 since swaps cancel) and the share of prompts with a positive gap.

    python benchmarks/bench_order_probe.py FOLDER [FOLDER ...]     # flow-matching (MMDiT) folders
"""
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data.render import PALETTE, RELATIONS, SHAPES
from jaxdiff.pipelines import TextToImage

COLOURS = {name: np.asarray(rgb) / 255 for name, rgb in PALETTE.items()}
# (prompt, subject colour, object colour, axis: 0 rows / 1 columns); the subject comes first along the axis
PROMPTS = [("a red circle to the left of a blue square", "red", "blue", 1),
           ("a blue square to the left of a red circle", "blue", "red", 1),
           ("a yellow triangle above a green circle", "yellow", "green", 0),
           ("a green circle above a yellow triangle", "green", "yellow", 0)]
NOISES, SUMMARY_NOISES, PAIRS, GUIDANCE = 32, 16, 5, 5.0


def centroid(images, colour, axis):
    """Mean position in [0, 1) along `axis` (0 rows, 1 columns) of the pixels near `colour`, over images [N, H, W, 3]."""
    weight = np.clip(1 - np.abs(images - colour).sum(-1), 0, None)                     # [N, H, W]
    profile = weight.sum(axis=2 if axis == 0 else 1)                                    # [N, L]
    coords = np.arange(profile.shape[1]) / profile.shape[1]
    return float((profile * coords).sum() / max(profile.sum(), 1e-9))


def relation_prompts(seed=0):
    """(relation, prompt, subject colour, object colour): PAIRS random pairs per relation, each with its swap."""
    rng = np.random.default_rng(seed)
    pairs = list(itertools.permutations(COLOURS, 2))
    for relation in RELATIONS:
        chosen = [(pairs[i], rng.choice(SHAPES, 2)) for i in rng.choice(len(pairs), PAIRS, replace=False)]
        for (a, b), (sa, sb) in chosen + [((b, a), (sb, sa)) for (a, b), (sa, sb) in chosen]:
            yield relation, f"a {a} {sa} {relation} a {b} {sb}", a, b


class Probe:
    def __init__(self, folder):
        self.pipe = TextToImage.from_pretrained(folder)
        if self.pipe.schedule.kind != "flow":
            raise SystemExit(f"{folder}: not a flow-matching model (this probe reads x0 = noise - v at t = 1)")
        side = self.pipe.denoiser.config.sample_size
        self.noise = jax.random.normal(jax.random.key(0), (NOISES, side, side, self.pipe.vae.config.latent_channels))

    def x0_images(self, prompt, n):
        """Decoded guided x0 predictions at t = 1 for the first n noises: [n, H, W, 3] in [0, 1]."""
        pipe, noise = self.pipe, self.noise[:n]
        model_fn = pipe.guided_model(pipe.denoiser_params, pipe.text_params, pipe.tokenize([prompt] * n),
                                     pipe.tokenize([""] * n), GUIDANCE)
        return np.asarray(pipe.decode(pipe.vae_params, noise - model_fn(noise, jnp.full((n,), 1000.0))))


def main(folders):
    probes = {folder: Probe(folder) for folder in folders}
    print("| model | prompt | subject centroid | object centroid | subject on the named side |")
    print("|---|---|---:|---:|---|")
    for folder, probe in probes.items():
        for prompt, subject, obj, axis in PROMPTS:
            images = probe.x0_images(prompt, NOISES)
            a, b = centroid(images, COLOURS[subject], axis), centroid(images, COLOURS[obj], axis)
            print(f"| {folder} | {prompt} | {a:.3f} | {b:.3f} | {'yes' if a < b else 'no'} |")
    print(f"\n| model | {' | '.join(RELATIONS)} | all |")
    print(f"|---|{'---:|' * (len(RELATIONS) + 1)}")
    for folder, probe in probes.items():
        gaps = {}
        for relation, prompt, subject, obj in relation_prompts():
            axis, sign = RELATIONS[relation]        # render's axis: 0 is x (columns); sign: subject minus object
            images = probe.x0_images(prompt, SUMMARY_NOISES)
            column_axis = 1 if axis == 0 else 0
            gap = -sign * (centroid(images, COLOURS[obj], column_axis) - centroid(images, COLOURS[subject], column_axis))
            gaps.setdefault(relation, []).append(gap)
        cells = [np.asarray(g) for g in gaps.values()] + [np.concatenate(list(gaps.values()))]
        print(f"| {folder} | " + " | ".join(f"{g.mean():+.3f} ({(g > 0).mean():.0%})" for g in cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
