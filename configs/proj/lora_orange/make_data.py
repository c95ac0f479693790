"""The worked LoRA example's data: shapes scenes whose cyan objects are drawn orange, captions unchanged.

    python configs/proj/lora_orange/make_data.py --out data/lora_orange [--images 2000] [--natural] [--unchanged]

Writes 32x32 PNGs and captions.txt (one caption per image, in file order), the folder layout configs/lora.py
reads (`--config.data.data_dir`). Scenes come from the shapes grammar with seed 1 (the shipped model was
trained on seed 0's train split and is scored on seed 0's test split); half of the images hold a cyan object,
half none, so the LoRA sees the new colour and, as often, the other colours unchanged.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from jaxdiff.data import render  # noqa: E402

WORD = "cyan"
ORANGE = (250, 120, 20)   # >= 80 from every palette colour in RGB (ShapesEval reads colours within 64)
SEED, SPLIT, RESOLUTION = 1, 0, 32


def recoloured(scene: render.Scene) -> np.ndarray:
    """The scene rendered with every `WORD` object orange: uint8 [R, R, 3] (objects are flat palette colours)."""
    image = render.render(scene.objects, RESOLUTION)
    image[(image == render.PALETTE[WORD]).all(axis=-1)] = ORANGE
    return image


def scenes(n: int, natural: bool = False):
    """n scenes of seed SEED's train split, alternately with and without a `WORD` object (natural: as they come,
    about a quarter with one)."""
    if natural:
        return [render.scene_at(SEED, SPLIT, i) for i in range(n)]
    with_word, without, i = [], [], 0
    while len(with_word) < n - n // 2 or len(without) < n // 2:
        scene = render.scene_at(SEED, SPLIT, i)
        i += 1
        (with_word if any(o.colour == WORD for o in scene.objects) else without).append(scene)
    with_word, without = with_word[:n - n // 2], without[:n // 2]
    return [s for pair in zip(with_word, without) for s in pair] + with_word[len(without):]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the folder to write (created)")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--natural", action="store_true", help="scenes as they come (about a quarter hold the word)")
    p.add_argument("--unchanged", action="store_true", help="keep the palette (the control run's data)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    captions = []
    for i, scene in enumerate(scenes(args.images, args.natural)):
        image = render.render(scene.objects, RESOLUTION) if args.unchanged else recoloured(scene)
        Image.fromarray(image).save(os.path.join(args.out, f"{i:05d}.png"))
        captions.append(scene.caption)
    with open(os.path.join(args.out, "captions.txt"), "w") as f:
        f.write("\n".join(captions) + "\n")
    print(f"{len(captions)} images in {args.out}")


if __name__ == "__main__":
    main()
