"""python -m sample "a red circle above a blue square" --out image.png    # the shipped shapes model
python -m sample --video "a red circle moving left" --out clip.gif     # the shipped shapes video model

A thin command line over `jaxdiff.pipelines`: text-to-video with --video (GIF or MP4 by
extension; with --init-image, image-to-video), text-to-image, and with --init-image:
img2img (--strength), inpainting (--mask), outpainting (--outpaint T,R,B,L) or inversion
editing (--edit "new caption", the prompt being the image's caption). Each PNG records the
prompt, seed, sampler and model in its metadata. --grid-seeds/--grid-guidance write a grid
of seeds x guidance scales; --trajectory a strip of x_t and predicted x_0 per step.
Bad input ends with one line on stderr and exit status 2, any other failure with one line and status 1,
never a traceback (unless --debug or JAXDIFF_DEBUG=1); whatever can be checked before the model loads
is (prompts, seeds, images, the output folder). Existing files are kept unless --overwrite is given,
and a batch that comes out NaN or inf is an error, not an image.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Sequence

import numpy as np

from jaxdiff import cli
from jaxdiff.pipelines.runner import MAX_SEED, check_seed
from jaxdiff.samplers import METHODS

PROG = "python -m sample"


def parse_args(argv):
    p = cli.Parser(prog=PROG, description="Generate and edit images from text prompts.")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line; writes NNNN.png into --out")
    p.add_argument("--model", help="a diffusers pipeline folder (model_index.json; unet/ or transformer/, ...); "
                                    "default: the shipped shapes model (images only)")
    p.add_argument("--out", default="sample.png", help="a .png file, or a folder for several images")
    p.add_argument("--negative", help="negative prompt (none given: SDXL guides against zeros, as diffusers does)")
    p.add_argument("--sampler", default=None, choices=list(METHODS), help="default: the model's scheduler")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=cli.finite_float, default=None,
                   help="classifier-free guidance scale (Flux: its embedded guidance); default: the scale a folder "
                        "trained here was trained for (its training.json: 5 for the shipped model), else the model "
                        "family's (7.5 SD, 5 SDXL, 7 SD3, 3.5 Flux)")
    p.add_argument("--true-cfg", type=cli.finite_float, default=1.0,
                   help="Flux only: with --negative, classifier-free guidance at this scale against it (> 1)")
    p.add_argument("--guidance-rescale", type=cli.finite_float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help=f"0..{MAX_SEED} (jax's PRNG keeps 32 bits of a seed)")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    p.add_argument("--batch", type=int, default=8, help="prompts per compiled batch with --prompts-file")
    p.add_argument("--init-image", help="an RGB image to edit: img2img, or with --mask / --outpaint / --edit; "
                                        "sides up to twice the model's working size (larger ones are refused)")
    p.add_argument("--strength", type=cli.finite_float, default=0.6,
                   help="img2img: how much of the way to re-noise (0..1)")
    p.add_argument("--mask", help="inpainting mask, same size as --init-image: white = repaint, black = keep")
    p.add_argument("--outpaint", help="extend --init-image by TOP,RIGHT,BOTTOM,LEFT pixels and paint the border")
    p.add_argument("--edit", metavar="CAPTION", help="inversion editing: regenerate --init-image under CAPTION")
    p.add_argument("--grid-seeds", type=int, default=0, help="write a grid of this many seeds (rows) ...")
    p.add_argument("--grid-guidance", default="", help="... by these comma-separated guidance scales (columns)")
    p.add_argument("--trajectory", action="store_true", help="write a strip of x_t and predicted x_0 per step")
    p.add_argument("--video", action="store_true", help="text-to-video (image-to-video with --init-image)")
    p.add_argument("--frames", type=int, default=None,
                   help="video frames (default: the frames the video model trained on, from its training.json; "
                        "81 for Wan folders, which take 1 + 4k frames)")
    p.add_argument("--fps", type=int, default=8, help="video frames per second")
    p.add_argument("--video-format", default="gif", choices=["gif", "mp4"], help="file type with --prompts-file")
    p.add_argument("--progress", action="store_true",
                   help="a per-step progress bar: its host callback is part of the compiled program, which the "
                        "compilation cache cannot store, so every run compiles it anew")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.prompts_file is None):
        p.error("give exactly one of: a prompt, or --prompts-file")
    if args.model is None:
        from jaxdiff.pipelines import SHAPES_MODEL, SHAPES_VIDEO_MODEL

        shipped, what = (SHAPES_VIDEO_MODEL, "video") if args.video else (SHAPES_MODEL, "")
        if not os.path.isfile(os.path.join(shipped, "model_index.json")):
            p.error(f"no --model given and the shipped shapes {what + ' ' if what else ''}model is missing from this "
                    f"installation (expected {shipped})")
        args.model = shipped
    for name in ("steps", "batch", "frames", "fps", "height", "width"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        p.error(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    if not 0.0 <= args.strength <= 1.0:
        p.error(f"--strength must be in [0, 1], got {args.strength}")
    modes = [m for m in ("mask", "outpaint", "edit") if getattr(args, m)]
    if len(modes) > 1:
        p.error(f"--{modes[0]} and --{modes[1]} cannot be combined")
    if modes and not args.init_image:
        p.error(f"--{modes[0]} needs --init-image")
    if args.video and (modes or args.grid_seeds or args.trajectory):
        p.error("--video takes a prompt (or --prompts-file) and optionally --init-image; no editing flags, grids or "
                "--trajectory")
    special = (args.init_image and not args.video) or args.grid_seeds or args.trajectory
    if special and args.prompts_file:
        p.error("--prompts-file makes plain text-to-image batches; --init-image, grids and --trajectory take one prompt")
    if bool(args.grid_seeds) != bool(args.grid_guidance):
        p.error("--grid-seeds and --grid-guidance go together")
    try:
        args.grid_scales = [cli.finite_float(g) for g in args.grid_guidance.split(",")] if args.grid_guidance else []
    except argparse.ArgumentTypeError:
        p.error(f"--grid-guidance must be comma-separated finite numbers, got {args.grid_guidance!r}")
    try:
        args.margins = [int(m) for m in args.outpaint.split(",")] if args.outpaint else None
    except ValueError:
        p.error(f"--outpaint must be TOP,RIGHT,BOTTOM,LEFT integers, got {args.outpaint!r}")
    return p, args


def read_prompts(p, args) -> list[str]:
    if args.prompt is not None:
        if not args.prompt.strip():
            p.error("the prompt is empty")
        return [args.prompt]
    try:
        with open(args.prompts_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        p.error(f"cannot read --prompts-file: {e}")
    except UnicodeDecodeError as e:
        p.error(f"--prompts-file {args.prompts_file!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                f"{e.start}); save it as UTF-8, one prompt per line")
    if "\0" in text:
        p.error(f"--prompts-file {args.prompts_file!r} holds NUL bytes: a binary file, not one prompt per line")
    prompts = [line.strip() for line in text.split("\n")]
    while prompts and not prompts[-1]:
        prompts.pop()
    if not prompts:
        p.error(f"{args.prompts_file!r} holds no prompts")
    if not all(prompts):
        p.error(f"{args.prompts_file!r} has an empty line (line {prompts.index('') + 1}); one prompt per line")
    return prompts


def negatives(args, n: int) -> list[str] | None:
    """--negative for n prompts; None without it (an SDXL folder then guides against zeros)."""
    return None if args.negative is None else [args.negative] * n


def check_seeds(p, args, n: int) -> None:
    """Every seed the run uses (--seed plus a batch's first index, or a grid row) must be in 0..MAX_SEED."""
    count = (n - 1) // args.batch * args.batch + 1 if args.prompts_file else max(args.grid_seeds, 1)
    try:
        check_seed(args.seed, count, "--seed")
    except ValueError as e:
        p.error(str(e))


def check_writable(p, folder: str) -> None:
    """Writes (and removes) a probe file, so an unwritable --out fails now, not after the sampling."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sample-probe-"):
            pass
    except OSError as e:
        p.error(f"cannot write to folder {folder!r}: {e.strerror or e}")


def output_paths(p, args, n: int) -> list[str]:
    """Where each image goes; checked before any work so nothing is half-written."""
    ext = "." + args.video_format if args.video else ".png"
    if args.prompts_file is None:
        allowed = (".gif", ".mp4") if args.video else (".png",)
        if not args.out.lower().endswith(allowed):
            p.error(f"--out must end in {' or '.join(allowed)} for a single prompt, got {args.out!r}")
        paths = [args.out]
        folder = os.path.dirname(os.path.abspath(args.out))
    else:
        folder = args.out
        if os.path.exists(folder) and not os.path.isdir(folder):
            p.error(f"--out {folder!r} exists and is not a folder")
        try:
            os.mkdir(folder)  # only the last level: a missing parent is likely a typo
        except FileExistsError:
            pass
        except OSError as e:
            p.error(f"cannot create folder --out {folder!r}: {e.strerror or e}")
        paths = [os.path.join(folder, f"{i:04d}{ext}") for i in range(n)]
    if not os.path.isdir(folder):
        p.error(f"cannot write to folder {folder!r}: it does not exist (or is not a folder)")
    check_writable(p, folder)
    existing = [q for q in paths if os.path.exists(q)]
    if existing and not args.overwrite:
        p.error(f"{existing[0]!r} exists ({len(existing)} of {n} outputs do); pass --overwrite to replace")
    return paths


def load_image(p, path: str, what: str, modes: Sequence[str]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        p.error(f"cannot read {what} {path!r}: {e}")
    if img.mode not in modes:
        p.error(f"{what} {path!r} has mode {img.mode}; it must be {' or '.join(modes)} "
                f"(convert it, e.g. Image.open(f).convert('{modes[0]}'))")
    return np.asarray(img)


def save_png(path: str, image: np.ndarray, meta: dict) -> None:
    """image [H, W, 3] in [0, 1] -> PNG with text metadata, written atomically."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    tmp = path + ".tmp"
    try:
        Image.fromarray(np.round(np.clip(np.asarray(image), 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG",
                                                                                               pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def tile(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """A grid of equal-size images [H, W, 3] with white gutters."""
    h, w = rows[0][0].shape[:2]
    out = np.ones((len(rows) * (h + pad) - pad, len(rows[0]) * (w + pad) - pad, 3), np.float32)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = img
    return out


def read_images(p, args) -> tuple[np.ndarray | None, np.ndarray | None]:
    """--init-image [H, W, 3] and --mask [H, W] (None when not given), read and checked before the model loads."""
    if not args.init_image:
        return None, None
    image = load_image(p, args.init_image, "--init-image", ("RGB",))
    if not args.mask:
        return image, None
    mask = load_image(p, args.mask, "--mask", ("L", "1"))
    if mask.shape != image.shape[:2]:
        p.error(f"--mask is {mask.shape[1]}x{mask.shape[0]} but --init-image is {image.shape[1]}x{image.shape[0]}")
    return image, mask


def load_model(p, args, cls, what: str, **kwargs):
    """cls.from_pretrained(--model); a folder that cannot be loaded (CheckpointError is a ValueError) is one line."""
    try:
        return cls.from_pretrained(args.model, **kwargs)
    except (OSError, ValueError) as e:
        p.error(f"cannot load {what} from {args.model!r}: {e}")


def run_edits(p, args, pipe, prompt: str, image: np.ndarray, mask: np.ndarray | None, common: dict) -> np.ndarray:
    """The --init-image modes; returns one image [H, W, 3]."""
    from jaxdiff.pipelines import editing

    pipe.check_size(image.shape[0], image.shape[1], "--init-image")
    common = {k: v for k, v in common.items() if k not in ("height", "width")}
    f = pipe.size_multiple
    if mask is not None:
        out = editing.inpaint(pipe, [prompt], image, (mask > 127)[None].astype(np.float32), paste_back=True,
                              **common)
    elif args.margins is not None:
        if len(args.margins) != 4 or min(args.margins) < 0 or any(m % f for m in args.margins):
            p.error(f"--outpaint needs 4 non-negative multiples of {f} (TOP,RIGHT,BOTTOM,LEFT), got {args.outpaint}")
        out = editing.outpaint(pipe, [prompt], image, args.margins, **common)
    elif args.edit:
        common.pop("method", None)
        out = editing.edit(pipe, [prompt], image, [args.edit], **common)
    else:
        out = editing.img2img(pipe, [prompt], image, strength=args.strength, **common)
    return np.asarray(out)[0]


def main(argv: Sequence[str] | None = None) -> int:
    p, args = parse_args(argv)
    prompts = read_prompts(p, args)
    check_seeds(p, args, len(prompts))
    image, mask = read_images(p, args)
    paths = output_paths(p, args, len(prompts))

    from jaxdiff import compilation_cache
    from jaxdiff.pipelines import TextToImage

    compilation_cache.enable()
    if args.video:
        return run_video(p, args, prompts, paths, image)
    pipe = load_model(p, args, TextToImage, "the model")
    args.guidance = pipe.default_guidance if args.guidance is None else args.guidance
    sampler = {"method": args.sampler} if args.sampler else {}
    true_cfg = {"true_cfg_scale": args.true_cfg} if args.true_cfg != 1.0 else {}
    common = {"steps": args.steps, "guidance_scale": args.guidance, "guidance_rescale": args.guidance_rescale,
              "seed": args.seed, "height": args.height, "width": args.width, "progress": args.progress,
              **sampler, **true_cfg}
    meta = {"negative_prompt": args.negative or "",
            "sampler": sampler.get("method", pipe.sampler_defaults.get("method")),
            "steps": args.steps, "guidance_scale": args.guidance, "model": os.path.abspath(args.model)}
    try:
        if image is not None:
            image = run_edits(p, args, pipe, prompts[0], image, mask, common)
            mode = "inpaint" if args.mask else "outpaint" if args.margins else "edit" if args.edit else "img2img"
            save_png(paths[0], image, {"prompt": prompts[0], "seed": args.seed, "mode": mode,
                                       "init_image": os.path.abspath(args.init_image), **meta,
                                       **({"edit": args.edit} if args.edit else {})})
            print(paths[0])
        elif args.grid_seeds or args.trajectory:
            image = grid_or_trajectory(args, pipe, prompts[0], common)
            save_png(paths[0], image, {"prompt": prompts[0], "seed": args.seed, **meta})
            print(paths[0])
        else:
            for start in range(0, len(prompts), args.batch):
                chunk = prompts[start:start + args.batch]
                images = pipe(chunk, negatives(args, len(chunk)), **{**common, "seed": args.seed + start})
                for i, image in enumerate(np.asarray(images)):
                    save_png(paths[start + i], image, {"prompt": chunk[i], "seed": args.seed + start,
                                                       "batch_index": i, **meta})
                    print(paths[start + i])
    except ValueError as e:
        p.error(str(e))
    return 0


def run_video(p, args, prompts: list[str], paths: list[str], image: np.ndarray | None) -> int:
    """Text-to-video (image-to-video with --init-image): one GIF/MP4 per prompt."""
    from jaxdiff.pipelines import TextToVideo
    from jaxdiff.video_io import write_video

    pipe = load_model(p, args, TextToVideo, "a video model", num_frames=args.frames)
    args.guidance = pipe.default_guidance if args.guidance is None else args.guidance
    init = None if image is None else image.astype(np.float32) / 255.0
    sampler = {"method": args.sampler} if args.sampler else {}
    try:
        for start in range(0, len(prompts), args.batch):
            chunk = prompts[start:start + args.batch]
            videos = pipe(chunk, negatives(args, len(chunk)), steps=args.steps,
                          guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
                          seed=args.seed + start, height=args.height, width=args.width, init_image=init,
                          progress=args.progress, **sampler)
            for i, video in enumerate(np.asarray(videos)):
                write_video(paths[start + i], video, fps=args.fps)
                print(paths[start + i])
    except ValueError as e:
        p.error(str(e))
    return 0


def grid_or_trajectory(args, pipe, prompt: str, common: dict) -> np.ndarray:
    if args.trajectory:
        out = pipe.generate([prompt], negatives(args, 1), return_trajectory=True, **common)
        traj = out["trajectory"]
        return tile([list(np.asarray(traj["x"])[:, 0]), list(np.asarray(traj["x0"])[:, 0])])
    rows = []
    for s in range(args.grid_seeds):
        rows.append([np.asarray(pipe([prompt], negatives(args, 1), **{**common, "seed": args.seed + s,
                                                                    "guidance_scale": g}))[0]
                     for g in args.grid_scales])
    return tile(rows)


if __name__ == "__main__":
    sys.exit(cli.run(main, prog=PROG))
