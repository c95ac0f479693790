"""ShapesEval from the command line: score a folder of generated images or videos, write the held-out
prompts, or generate them with a model folder and score the result. The analysis is
`jaxdiff.data.eval`; this module adds the part that needs a pipeline.

    python -m jaxdiff.pipelines.shapes_eval --write_prompts prompts.txt   # the held-out prompts
    python -m jaxdiff.pipelines.shapes_eval --images DIR                  # per-family table of a folder
    python -m jaxdiff.pipelines.shapes_eval --model FOLDER                # generate (TextToImage) and score
    python -m jaxdiff.pipelines.shapes_eval --model FOLDER --videos       # TextToVideo, motion family; --frames T

A failure is one line on stderr and a non-zero exit (the traceback with --debug or JAXDIFF_DEBUG=1).
"""
import functools
import json
import os
import sys

from jaxdiff import cli

from jaxdiff.data.eval import (evaluate, evaluate_model, folder_prompts, format_table, heldout_prompts,
                               heldout_video_prompts, load_media)
from jaxdiff.pipelines.text_to_image import TextToImage
from jaxdiff.pipelines.runner import MAX_SEED, check_seed
from jaxdiff.pipelines.text_to_video import TextToVideo, default_frames
from jaxdiff.samplers import METHODS

PROG = "python -m jaxdiff.pipelines.shapes_eval"


def model_generator(path: str, steps: int = 25, guidance_scale: float | None = None, seed: int = 0,
                    num_frames: int | None = None, guidance_rescale: float = 0.0, method: str | None = None):
    """generate(prompts) for `evaluate_model` from a model folder, sampled as `python -m sample` samples it: the
    folder's sampler and default guidance unless `method` / `guidance_scale` say otherwise (a partial of the
    pipeline: `.keywords` are the settings). Images with TextToImage; with `num_frames`, videos of that many
    frames with TextToVideo."""
    if num_frames is None:
        pipe = TextToImage.from_pretrained(path)
    else:
        pipe = TextToVideo.from_pretrained(path, num_frames=num_frames)
    guidance_scale = pipe.default_guidance if guidance_scale is None else guidance_scale
    return functools.partial(pipe, steps=steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                             seed=seed, method=method or pipe.sampler_defaults["method"])


def write_prompts(p, args) -> int:
    prompts = (heldout_video_prompts(args.per_family, args.frames or 16) if args.videos
               else heldout_prompts(args.per_family))
    try:
        with open(args.write_prompts, "w", encoding="utf-8") as f:
            f.write("\n".join(prompts) + "\n")
    except OSError as e:
        p.error(f"cannot write --write_prompts {args.write_prompts!r}: {e.strerror or e}")
    print(f"wrote {len(prompts)} prompts to {args.write_prompts}")
    return 0


def parse_args(argv):
    p = cli.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", help="folder of PNGs (or GIF/.npy videos) and their prompts")
    g.add_argument("--write_prompts", help="write the held-out prompt set to this file and exit")
    g.add_argument("--model", help="a text-to-image (or with --videos text-to-video) model folder: generate the "
                                   "held-out prompts and score them")
    p.add_argument("--per_family", type=int, default=100, help="held-out prompts per family (videos: one family)")
    p.add_argument("--steps", type=int, default=25, help="with --model: sampling steps")
    p.add_argument("--sampler", choices=list(METHODS), default=None,
                   help="with --model: the sampling method (default: the folder's scheduler's)")
    p.add_argument("--guidance", type=cli.finite_float, default=None,
                   help="with --model: classifier-free guidance scale (default: the model's, as python -m sample)")
    p.add_argument("--guidance_rescale", type=cli.finite_float, default=0.0,
                   help="with --model: guidance rescale (Lin et al. 2024), in [0, 1]")
    p.add_argument("--seed", type=int, default=0, help=f"with --model: sampling seed, 0..{MAX_SEED}")
    p.add_argument("--videos", action="store_true",
                   help="with --write_prompts: video prompts; with --model: a text-to-video model, scored on them")
    p.add_argument("--frames", type=int, default=None,
                   help="video frames (the prompts depend on it); default: with --model the frames the model "
                        "trained on (its training.json); with --write_prompts 16")
    args = p.parse_args(argv)
    if args.frames is not None and not args.videos:
        p.error("--frames goes with --videos")
    if args.per_family < 1 or args.steps < 1 or (args.frames is not None and args.frames < 1):
        p.error("--per_family, --steps and --frames must be >= 1")
    if not 0 <= args.guidance_rescale <= 1:
        p.error(f"--guidance_rescale={args.guidance_rescale}: must be in [0, 1]")
    try:
        check_seed(args.seed, name="--seed")
    except ValueError as e:
        p.error(str(e))
    return p, args


def main(argv=None) -> int:
    p, args = parse_args(argv)
    if args.write_prompts:
        return write_prompts(p, args)
    try:
        if args.model:
            frames = (args.frames or default_frames(args.model)) if args.videos else None
            generate = model_generator(args.model, args.steps, args.guidance, args.seed, num_frames=frames,
                                       guidance_rescale=args.guidance_rescale, method=args.sampler)
            print(", ".join(f"{k} {v}" for k, v in generate.keywords.items()))
            result = evaluate_model(generate, args.per_family, num_frames=frames)
        else:
            pairs = folder_prompts(args.images)
            media = [load_media(os.path.join(args.images, f)) for f, _ in pairs]
            result = evaluate([q for _, q in pairs], media)
    except (OSError, ValueError) as e:
        p.error(str(e))
    print(format_table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog=PROG))
