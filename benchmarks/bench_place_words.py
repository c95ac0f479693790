"""Does a model put objects where its caption says? The layout prior at pure noise, and the samples.

For each model folder: the x_0 gap at t = 999, the mean |x_0("... A") - x_0("... B")| of the U-Net's
x_0 predictions (v-prediction at SNR 0: minus its output; unguided, the same 8 noise latents) for caption
pairs that differ only in their place or relation word, against the data's gap for the first pair (the
mean VAE latents of the training images captioned "... on the left" / "... on the right"); and the
named-side accuracy: ShapesEval's verdict on 8 seeds (25 DPM-Solver++ steps, guidance 7.5) of each of 12
prompts "a {red|blue|green} {circle|square} on the {left|right}".

    python benchmarks/bench_place_words.py jaxdiff/assets/shapes [more folders]

Needs the shapes/32px training split for the data's gap (python -m jaxdiff.data.prepare shapes
--resolution 32). Prints a table and writes it to BENCHMARKS.md (section "Place words"); never used as a test.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_place_fit import place_means  # noqa: E402
from report import write_section  # noqa: E402

PAIRS = (("a red circle on the left", "a red circle on the right"),
         ("a blue square at the top", "a blue square at the bottom"),
         ("a red circle to the left of a blue square", "a red circle to the right of a blue square"))
SIDE_PROMPTS = tuple(f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square")
                     for p in ("left", "right"))
NOISE = 8


def x0_gaps(pipe) -> list[float]:
    """The t = 999 x_0 gap of each pair in PAIRS."""
    z = jax.random.normal(jax.random.key(0), pipe.latent_shape(NOISE, 32, 32))
    gaps = []
    for a, b in PAIRS:
        context = pipe.encode_text(pipe.text_params, jnp.asarray(pipe.tokenize([a] * NOISE + [b] * NOISE)))
        x0 = -pipe.unet.apply({"params": pipe.unet_params}, jnp.concatenate([z, z]), jnp.full((2 * NOISE,), 999.0),
                              context)
        gaps.append(float(jnp.abs(x0[:NOISE].mean(0) - x0[NOISE:].mean(0)).mean()))
    return gaps


def named_side(pipe, seeds: int = 8) -> float:
    """Share of the SIDE_PROMPTS samples that ShapesEval finds right (object, colour and side)."""
    from jaxdiff.data import eval as shapes_eval

    hits = 0
    for prompt in SIDE_PROMPTS:
        images = np.asarray(pipe([prompt] * seeds, steps=25, guidance_scale=7.5, seed=0))
        hits += sum(shapes_eval.score(prompt, shapes_eval.to_uint8(im)) for im in images)
    return hits / (seeds * len(SIDE_PROMPTS))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="text-to-image model folders")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    from jaxdiff.pipelines import TextToImage

    lines, data_gap = [], None
    for folder in args.folders:
        pipe = TextToImage.from_pretrained(folder)
        if data_gap is None:
            means = place_means(pipe)
            data_gap = float(np.abs(means["left"] - means["right"]).mean())
        gaps = x0_gaps(pipe)
        lines.append(f"| {folder} | " + " | ".join(f"{g:.4f}" for g in gaps) + f" | {named_side(pipe):.3f} |")
    table = "\n".join([f"| model | x_0 gap left / right (data: {data_gap:.3f}) | top / bottom | left of / right of "
                       f"| named side |", "|---|---:|---:|---:|---:|", *lines])
    print(table)
    if not args.no_write:
        write_section("Place words", __doc__.split("\n\n")[1] + "\n\n" + table)


if __name__ == "__main__":
    main()
