"""Before / after numbers of the worked LoRA example on ShapesEval's 400 held-out prompts (seed 0's test split).

    python configs/proj/lora_orange/measure.py --lora runs/lora_orange/lora [--lora ANOTHER ...] [--per-family 100]

Generates every held-out prompt with the shipped model and with the shipped model + each LoRA (25 DPM-Solver++
steps, guidance 7.5, seed 0: ShapesEval's protocol; U-Net LoRAs) and prints, for the prompts that say "cyan" and
for the others: orange pixels / (orange + cyan pixels), the share of images holding orange (> 1 % of the pixels),
and the ShapesEval score with orange read as cyan (the shapes, counts and places still right); then that score
per caption family on all prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from make_data import ORANGE, WORD  # noqa: E402

from jaxdiff.convert import load_lora  # noqa: E402
from jaxdiff.data import eval as shapes_eval  # noqa: E402
from jaxdiff.data import heldout_prompts, render  # noqa: E402
from jaxdiff.pipelines import SHAPES_UNET_MODEL, TextToImage  # noqa: E402

# background, the palette, orange: a pixel takes the nearest within ShapesEval's distance, else none (-1)
COLOURS = np.array([render.BACKGROUND, *render.PALETTE.values(), ORANGE], np.float32)
ORANGE_ID, WORD_ID = len(COLOURS) - 1, 1 + render.COLOURS.index(WORD)


def labels(image: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(image[..., None, :].astype(np.float32) - COLOURS, axis=-1)
    return np.where(d.min(-1) <= shapes_eval.COLOUR_DISTANCE, d.argmin(-1), -1)


def orange_as_word(image: np.ndarray) -> np.ndarray:
    """The image with its orange pixels in the word's palette colour (what ShapesEval can read)."""
    out = image.copy()
    out[labels(image) == ORANGE_ID] = render.PALETTE[WORD]
    return out


def measures(prompts, images) -> dict:
    lab = [labels(x) for x in images]
    orange, word = [l == ORANGE_ID for l in lab], [l == WORD_ID for l in lab]
    asked = all(WORD in q.split() for q in prompts)   # the ratio means something where the prompts ask for the word
    return {f"orange / (orange + {WORD}) pixels": np.sum(orange) / max(np.sum(orange) + np.sum(word), 1) if asked
            else None,
            "images with orange (> 1 % of pixels)": np.mean([o.mean() > 0.01 for o in orange]),
            "ShapesEval, orange read as cyan": shapes_eval.evaluate(
                prompts, [orange_as_word(x) for x in images])["overall"]}


def generate(pipe: TextToImage, prompts, batch: int = 16) -> list[np.ndarray]:
    kwargs = {"steps": 25, "guidance_scale": 7.5, "seed": 0, "method": "dpmpp_2m"}
    return [shapes_eval.to_uint8(x) for i in range(0, len(prompts), batch)
            for x in pipe(prompts[i:i + batch], **kwargs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", required=True, action="append", help="an exported LoRA folder (or .safetensors "
                   "file); repeat to compare several")
    p.add_argument("--per-family", type=int, default=100)
    args = p.parse_args()
    base = TextToImage.from_pretrained(SHAPES_UNET_MODEL)
    models = {"shipped U-Net": base, **{f"+ {os.path.basename(os.path.normpath(path))}": dataclasses.replace(
        base, denoiser_params=load_lora(base.denoiser_params, path)) for path in args.lora}}
    prompts = heldout_prompts(args.per_family)
    groups = {f"with '{WORD}'": [i for i, q in enumerate(prompts) if WORD in q.split()],
              "without": [i for i, q in enumerate(prompts) if WORD not in q.split()]}
    rows, families = {}, {}
    for name, pipe in models.items():
        images = generate(pipe, prompts)
        for group, idx in groups.items():
            rows[name, group] = measures([prompts[i] for i in idx], [images[i] for i in idx])
        families[name] = shapes_eval.evaluate(prompts, [orange_as_word(x) for x in images])
    measure_names = list(next(iter(rows.values())))
    print("| prompts | model | " + " | ".join(measure_names) + " |")
    print("|---|---|" + "---:|" * len(measure_names))
    for group, idx in groups.items():
        for name in models:
            print(f"| {group} ({len(idx)}) | {name} | " + " | ".join(
                "-" if v is None else f"{v:.3f}" for v in rows[name, group].values()) + " |")
    print(f"\nShapesEval per family, all {len(prompts)} prompts, orange read as {WORD}:\n")
    print("| model | " + " | ".join(render.FAMILIES) + " | overall |\n|---|" + "---:|" * (len(render.FAMILIES) + 1))
    for name, scores in families.items():
        print(f"| {name} | " + " | ".join(f"{scores[f]:.3f}" for f in (*render.FAMILIES, "overall")) + " |")



if __name__ == "__main__":
    main()
