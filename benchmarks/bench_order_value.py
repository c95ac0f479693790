"""What is word order worth to a denoiser at pure noise? At t = 1 the best prediction is the training images' mean
for the caption, so a caption's words are worth the loss that conditioning the mean on them removes. This measures
it on the `shapes` data's relation captions, in colour-map space (one 0/1 map per palette colour: the pixels of
that colour), with leave-one-out group means (no in-sample bias):

  relation only         the mean of all images with the caption's relation word
  + colours, unordered  ... and the same two colours, in either role (what a bag-of-words model can know)
  + colour order        ... and which colour is the subject (what binding adds)

    python benchmarks/bench_order_value.py [--name shapes/32px]      # needs the prepared dataset
"""
import argparse

import numpy as np
import tensorflow_datasets as tfds

import jaxdiff.data.pipeline  # noqa: F401  registers the builders
from jaxdiff.data.eval import parse_prompt
from jaxdiff.data.render import FAMILIES, PALETTE

COLOUR_TOLERANCE = 60   # summed |RGB difference| for a pixel to count as a palette colour (antialiased edges out)


def relation_examples(source):
    """(colour maps [N, C*H*W], relation, subject colour, object colour) of the relation family's records."""
    relation_family = FAMILIES.index("relation")
    palette = {name: np.asarray(rgb, np.float32) for name, rgb in PALETTE.items()}
    maps, keys = [], []
    for i in range(len(source)):
        record = source[i]
        if record["family"] != relation_family:
            continue
        request = parse_prompt(record["caption"].decode())
        subject, obj = (spec.colour for spec in request.objects)
        image = np.asarray(record["image"], np.float32)
        maps.append(np.stack([np.abs(image - rgb).sum(-1) < COLOUR_TOLERANCE for rgb in palette.values()]).ravel())
        keys.append((request.relation, subject, obj))
    return np.asarray(maps, np.float32), keys


def loo_loss(maps, groups):
    """Mean over examples of the squared distance to their group's mean without themselves; groups: tuples of str."""
    groups = np.unique(np.asarray([repr(g) for g in groups]), return_inverse=True)[1]
    total = 0.0
    for g in np.unique(groups):
        members = maps[groups == g]
        n = len(members)
        if n > 1:   # leave-one-out: x - mean_{-x} = (x - mean) * n / (n - 1)
            total += ((members - members.mean(0)) ** 2).sum() * (n / (n - 1)) ** 2
    return total / len(maps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="shapes/32px")
    args = parser.parse_args()
    maps, keys = relation_examples(tfds.builder(args.name).as_data_source(split="train"))
    losses = {"relation only": loo_loss(maps, [k[0] for k in keys]),
              "+ colours, unordered": loo_loss(maps, [(k[0], *sorted(k[1:])) for k in keys]),
              "+ colour order": loo_loss(maps, keys)}
    print(f"{len(maps)} relation images of {args.name}\n")
    print("| conditioned on | colour-map loss at t = 1 | removed from the row above |")
    print("|---|---:|---:|")
    previous = None
    for name, loss in losses.items():
        removed = "" if previous is None else f"{100 * (previous - loss) / previous:.1f}%"
        print(f"| {name} | {loss:.2f} | {removed} |")
        previous = loss


if __name__ == "__main__":
    main()
