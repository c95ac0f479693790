"""Does a model's U-Net know where it is? Absolute position read off its feature maps.

For each model folder: the U-Net runs on pure noise (128 latents, t = 999, the unguided text
context of the empty caption) and a least-squares linear probe, fitted on the feature vectors of
half of the latents, predicts each feature pixel's column on the other half. Columns are what a
place word needs: "on the left" means the object's centre is in the left 40% of the image. Reported
per layer: R^2 of the predicted column, and how often the probe puts a pixel in the correct half,
over all columns and over the two centre columns only (furthest from both borders, where
zero-padded convolutions carry the least position).

    python benchmarks/bench_position_probe.py jaxdiff/assets/shapes [more folders]

Prints a table and writes it to BENCHMARKS.md (section "Position probe"); never used as a test.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_section  # noqa: E402

# outputs of these modules: the cross-attention inputs at 8x8 and the U-Net's input and output convs
LAYERS = ("conv_in", "down_blocks_1/resnets_0", "mid_block/resnets_0", "up_blocks_0/resnets_0",
          "up_blocks_1/resnets_1")
LATENTS = 128


def features(pipe, layer_names):
    """{layer: float64 [N, h, w, C]} of the U-Net on pure-noise latents at t = 999."""
    shape = pipe.latent_shape(LATENTS, *(2 * (pipe.default_size,)))
    noise = jax.random.normal(jax.random.key(0), shape)
    context = pipe.encode_text(pipe.text_params, jnp.asarray(pipe.tokenize([""] * LATENTS)))
    _, state = pipe.unet.apply({"params": pipe.unet_params}, noise, jnp.full((LATENTS,), 999.0), context,
                               capture_intermediates=True, mutable=["intermediates"])
    tree = state["intermediates"]
    out = {}
    for name in layer_names:
        node = tree
        for part in name.split("/"):
            node = node[part]
        out[name] = np.asarray(node["__call__"][0], np.float64)
    return out


def probe(f):
    """(R^2 of the column, correct half over all columns, correct half over the centre two columns)."""
    n, h, w, ch = f.shape
    cols = np.broadcast_to(np.arange(w, dtype=np.float64), (n, h, w))
    design = lambda x: np.c_[x.reshape(-1, ch), np.ones(x[..., 0].size)]
    train, test = design(f[: n // 2]), design(f[n // 2:])
    target, truth = cols[: n // 2].reshape(-1), cols[n // 2:].reshape(-1)
    weights = np.linalg.solve(train.T @ train + 1e-3 * np.eye(ch + 1), train.T @ target)
    pred = test @ weights
    half = (pred > (w - 1) / 2) == (truth > (w - 1) / 2)
    centre = (truth == w // 2 - 1) | (truth == w // 2)
    return 1 - np.mean((pred - truth) ** 2) / truth.var(), half.mean(), half[centre].mean()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="text-to-image model folders")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    from jaxdiff.pipelines import TextToImage

    rows = []
    for folder in args.folders:
        pipe = TextToImage.from_pretrained(folder)
        coords = "yes" if pipe.unet.config.input_coordinates else "no"
        for layer, f in features(pipe, LAYERS).items():
            r2, half, centre = probe(f)
            rows.append(f"| {folder} | {coords} | {layer} | {f.shape[1]}x{f.shape[2]}x{f.shape[3]} | {r2:.3f} | "
                        f"{half:.3f} | {centre:.3f} |")
    table = "\n".join(["| model | input coordinates | layer output | size | R^2 (column) | correct half | "
                       "correct half, centre columns |", "|---|---|---|---|---:|---:|---:|", *rows])
    print(table)
    if not args.no_write:
        write_section("Position probe", __doc__.split("\n\n")[1] + "\n\n" + table)


if __name__ == "__main__":
    main()
