"""Which caption words does a model's U-Net listen to? A diagnostic for prompt adherence.

For each model folder and caption, the influence of every token's text-encoder state on the
U-Net's output at timesteps 999 / 700 / 300: |J^T u| averaged over 4 random unit-variance
probes u, where J is the Jacobian of the (unguided) U-Net output with respect to that token's
state (noise input, seed 0). For image models also: out of 8 seeds, how many give the object
the same place (centres within 0.02 of the image side) for "on the left" and "on the right".

    python benchmarks/bench_text_influence.py jaxdiff/assets/shapes [more folders] [--videos]

Prints a table and writes it to BENCHMARKS.md (section "Text influence", or "Text influence (video)");
never used as a test.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_section  # noqa: E402

IMAGE_CAPTIONS = ("a red circle on the left", "a red circle above a blue square")
VIDEO_CAPTIONS = ("a red circle moving left", "a blue square moving up")
TIMESTEPS = (999.0, 700.0, 300.0)


def token_influence(pipe, captions, latent_shape):
    """{t: float [len(captions), L]}: how much the U-Net output moves with each token's state."""
    ids = jnp.asarray(pipe.tokenize(list(captions)))
    context = pipe.encode_text(pipe.text_params, ids)
    noise = jax.random.normal(jax.random.key(0), (len(captions), *latent_shape))
    result = {}
    for t in TIMESTEPS:
        out, vjp = jax.vjp(lambda c: pipe.unet.apply({"params": pipe.unet_params}, noise,
                                                     jnp.full((len(captions),), t), c), context)
        probes = [jax.random.normal(jax.random.key(k + 1), out.shape) for k in range(4)]
        result[t] = np.mean([np.linalg.norm(np.asarray(vjp(u)[0]), axis=-1) for u in probes], axis=0)
    return result


def same_place(pipe, seeds: int = 8) -> int:
    """Seeds (of `seeds`) whose red circle lands in the same place for 'on the left' and 'on the right'."""
    from jaxdiff.data import eval as shapes_eval

    def centres(prompt):
        images = np.asarray(pipe([prompt] * seeds, steps=25, guidance_scale=7.5, seed=0))
        return [[(d.x, d.y) for d in shapes_eval.analyse(shapes_eval.to_uint8(im))
                 if d.colour == "red" and d.shape == "circle"] for im in images]

    left, right = centres("a red circle on the left"), centres("a red circle on the right")
    return sum(len(a) == len(b) > 0 and all(abs(p - q) <= 0.02 for u, v in zip(a, b) for p, q in zip(u, v))
               for a, b in zip(left, right))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="model folders (TextToImage, or TextToVideo with --videos)")
    p.add_argument("--videos", action="store_true", help="the folders hold text-to-video models")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    if args.videos:
        from jaxdiff.pipelines import TextToVideo as Pipeline
    else:
        from jaxdiff.pipelines import TextToImage as Pipeline
    captions = VIDEO_CAPTIONS if args.videos else IMAGE_CAPTIONS
    rows = []
    for folder in args.folders:
        pipe = Pipeline.from_pretrained(folder)
        shape = pipe.latent_shape(1, *(2 * (pipe.default_size,)))[1:] if not args.videos else \
            (pipe.num_frames, *pipe.latent_shape(1, *(2 * (pipe.default_size,)))[1:])
        influence = token_influence(pipe, captions, shape)
        place = "" if args.videos else f"{same_place(pipe)}/8"
        for i, caption in enumerate(captions):
            words = ["<bos>", *caption.split(), "<eos>"]
            for t in TIMESTEPS:
                values = " ".join(f"{w} {v:.2f}" for w, v in zip(words, influence[t][i]))
                rows.append(f"| {folder} | {caption} | {t:.0f} | {values} | {place if i == 0 and t == 999 else ''} |")
    table = "\n".join(["| model | caption | t | influence per token | same place, left vs right |",
                       "|---|---|---:|---|---:|", *rows])
    print(table)
    if not args.no_write:
        section = "Text influence" + (" (video)" if args.videos else "")
        write_section(section, __doc__.split("\n\n")[1] + "\n\n" + table)


if __name__ == "__main__":
    main()
