"""python -m sample "a red circle above a blue square" --model PATH --out image.png

A thin command line over `jaxdiff.pipelines.TextToImage`: prompts in, PNGs out (with the
prompt, seed, sampler and model in each PNG's metadata). Bad input ends with a message and
exit status 2, never a traceback; existing files are kept unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from jaxdiff.samplers import METHODS


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m sample", description="Generate images from text prompts.")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line; writes NNNN.png into --out")
    p.add_argument("--model", required=True, help="a diffusers Stable Diffusion folder (model_index.json, unet/, ...)")
    p.add_argument("--out", default="sample.png", help="a .png file, or a folder for several images")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--sampler", default=None, choices=list(METHODS), help="default: the model's scheduler")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts per compiled batch with --prompts-file")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.prompts_file is None):
        p.error("give exactly one of: a prompt, or --prompts-file")
    if args.steps <= 0:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.batch <= 0:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        p.error(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    return p, args


def read_prompts(p, args) -> list[str]:
    if args.prompt is not None:
        if not args.prompt.strip():
            p.error("the prompt is empty")
        return [args.prompt]
    try:
        with open(args.prompts_file) as f:
            prompts = [line.strip() for line in f]
    except OSError as e:
        p.error(f"cannot read --prompts-file: {e}")
    if not prompts or not any(prompts):
        p.error(f"{args.prompts_file!r} holds no prompts")
    if not all(prompts):
        p.error(f"{args.prompts_file!r} has empty lines (line {prompts.index('') + 1}); one prompt per line")
    return prompts


def output_paths(p, args, n: int) -> list[str]:
    """Where each image goes; checked before any work so nothing is half-written."""
    if args.prompts_file is None:
        if not args.out.lower().endswith(".png"):
            p.error(f"--out must end in .png for a single prompt, got {args.out!r}")
        paths = [args.out]
        folder = os.path.dirname(os.path.abspath(args.out))
    else:
        folder = args.out
        if os.path.exists(folder) and not os.path.isdir(folder):
            p.error(f"--out {folder!r} exists and is not a folder")
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, f"{i:04d}.png") for i in range(n)]
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        p.error(f"cannot write to folder {folder!r}")
    existing = [q for q in paths if os.path.exists(q)]
    if existing and not args.overwrite:
        p.error(f"{existing[0]!r} exists ({len(existing)} of {n} outputs do); pass --overwrite to replace")
    return paths


def save_png(path: str, image: np.ndarray, meta: dict) -> None:
    """image [H, W, 3] in [0, 1] -> PNG with text metadata, written atomically."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    tmp = path + ".tmp"
    Image.fromarray(np.round(np.asarray(image) * 255).astype(np.uint8)).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p, args = parse_args(argv)
    prompts = read_prompts(p, args)
    paths = output_paths(p, args, len(prompts))

    from jaxdiff.convert.common import CheckpointError
    from jaxdiff.pipelines import TextToImage

    try:
        pipe = TextToImage.from_pretrained(args.model)
    except (OSError, ValueError, CheckpointError) as e:
        p.error(f"cannot load the model from {args.model!r}: {e}")
    sampler = {"method": args.sampler} if args.sampler else {}
    method = sampler.get("method", pipe.sampler_defaults.get("method"))
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start:start + args.batch]
        try:
            images = pipe(chunk, [args.negative] * len(chunk), steps=args.steps, guidance_scale=args.guidance,
                          guidance_rescale=args.guidance_rescale, seed=args.seed + start, **sampler)
        except ValueError as e:
            p.error(str(e))
        for i, image in enumerate(np.asarray(images)):
            meta = {"prompt": chunk[i], "negative_prompt": args.negative, "seed": args.seed + start,
                    "batch_index": i, "sampler": method, "steps": args.steps, "guidance_scale": args.guidance,
                    "model": os.path.abspath(args.model)}
            save_png(paths[start + i], image, meta)
            print(paths[start + i])
    return 0


if __name__ == "__main__":
    sys.exit(main())
