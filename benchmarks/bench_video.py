"""Text-to-video generation speed here vs diffusers' TextToVideoSDPipeline, same tiny model and latents.

    python benchmarks/bench_video.py [--batch 2] [--frames 8] [--steps 25] [--repeats 1]

The model is the golden-file pipeline (tests/fixtures/diffusers_video/pipeline_t2v: a tiny
UNet3DConditionModel; VAE, CLIP and tokenizer from tests/fixtures/pipeline_sd), 16x16 videos,
DDIM with classifier-free guidance. Both sides start from the same initial latents.

Columns:
  compile    seconds of the first call minus a warm one (jax: trace + compile of the whole program)
  generate   warm seconds per call: text encoding, --steps guided U-Net steps, VAE decode of every frame
             (best of --repeats; the default is one run)
  frames/s   batch * frames / generate
  rel err    ||latents - latents_diffusers|| / ||latents_diffusers|| (final latents)
Prints a table and writes it to BENCHMARKS.md (section "Text-to-video"). The diffusers row is
skipped when torch/diffusers are not installed.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import jaxdiff as jd  # noqa: E402
from jaxdiff.convert.common import read_config  # noqa: E402
from jaxdiff.convert.scheduler import schedule_from_config  # noqa: E402
from jaxdiff.pipelines import TextToVideo  # noqa: E402
from report import write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2V = os.path.join(ROOT, "tests", "fixtures", "diffusers_video", "pipeline_t2v")
SD = os.path.join(ROOT, "tests", "fixtures", "pipeline_sd")
PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right",
           "a yellow circle moving down"]


def jax_pipeline() -> TextToVideo:
    sd = jd.convert.load_pipeline(SD)
    unet, params = jd.convert.from_diffusers(os.path.join(T2V, "unet"))
    schedule, defaults = schedule_from_config(read_config(os.path.join(T2V, "scheduler"), "scheduler_config.json"))
    return TextToVideo(unet, params, sd.vae, sd.vae_params, sd.text_encoder, sd.text_params, sd.tokenizer, schedule,
                       {"method": "ddim", **defaults})


def torch_pipeline():
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_grad_enabled(False)
    return TextToVideoSDPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(SD, "vae")),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(SD, "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(SD, "tokenizer")),
        unet=UNet3DConditionModel.from_pretrained(os.path.join(T2V, "unet")),
        scheduler=DDIMScheduler.from_pretrained(os.path.join(T2V, "scheduler")))


def timed(fn, repeats: int):
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return first, best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--note", default="", help="a sentence about this run for BENCHMARKS.md (e.g. the machine's load)")
    args = ap.parse_args()
    prompts = (PROMPTS * args.batch)[: args.batch]
    pipe = jax_pipeline()
    noise = np.asarray(jax.random.normal(jax.random.key(0), pipe.video_latent_shape(args.batch, args.frames, 16, 16)))
    n_frames = args.batch * args.frames

    run = lambda: pipe(prompts, num_frames=args.frames, steps=args.steps, guidance_scale=args.guidance,
                       noise=jnp.asarray(noise), return_latents=True)
    first, warm, (_, latents) = timed(lambda: jax.block_until_ready(run()), args.repeats)
    rows = [("jaxdiff (jax, float32)", first - warm, warm, n_frames / warm, np.asarray(latents))]

    try:
        import torch
        tpipe = torch_pipeline()
    except ImportError:
        tpipe = None
    if tpipe is not None:
        tpipe.set_progress_bar_config(disable=True)
        latents_nc = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 4, 1, 2, 3)))
        trun = lambda: tpipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                             num_frames=args.frames, height=16, width=16, latents=latents_nc.clone(),
                             output_type="np")
        tpipe(prompts, num_inference_steps=1, guidance_scale=args.guidance, num_frames=args.frames, height=16,
              width=16, latents=latents_nc.clone(), output_type="np")   # warm-up, not timed
        _, twarm, _ = timed(trun, args.repeats - 1) if args.repeats > 1 else (None, *_one(trun))
        tlat = tpipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, num_frames=args.frames,
                     height=16, width=16, latents=latents_nc.clone(), output_type="latent").frames
        tlat = tlat.numpy().transpose(0, 2, 3, 4, 1)
        rows.append((f"diffusers {_version('diffusers')} (torch {torch.__version__}, float32)", float("nan"), twarm,
                     n_frames / twarm, tlat))
    ref = rows[-1][4]
    header = "| implementation | compile s | generate s | frames/s | rel err |\n|---|---:|---:|---:|---:|"
    lines = [header] + [
        f"| {name} | {'' if np.isnan(c) else f'{c:.1f}'} | {g:.2f} | {fps:.1f} | "
        f"{np.linalg.norm(lat - ref) / np.linalg.norm(ref):.1e} |" for name, c, g, fps, lat in rows]
    setup = (f"`python benchmarks/bench_video.py --batch {args.batch} --frames {args.frames} --steps {args.steps} "
             f"--repeats {args.repeats}`: the tiny golden-file text-to-video model (UNet3DConditionModel "
             f"(8, 16) channels, 16x16 videos = 8x8x4 latents, CLIP 32 wide), {args.batch} prompts x "
             f"{args.frames} frames, {args.steps} DDIM steps with CFG (batch {2 * args.batch} through the U-Net), "
             f"per-frame VAE decode; same initial latents on both sides. {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores (shared with other jobs while measured), jax {jax.__version__} on "
             f"{jax.default_backend()}. Timed after a warm-up (jax: the first call, which compiles, then the best of "
             f"{args.repeats} calls; torch: a 1-step call, then the best of {max(args.repeats - 1, 1)} full calls "
             f"after an untimed one when --repeats > 1), so expect noise of tens of percent from the shared machine.")
    table = "\n".join(lines) + (f"\n\n{args.note}" if args.note else "")
    print(setup + "\n\n" + table)
    if not args.no_write:
        write_section("Text-to-video", setup + "\n\n" + table)


def _one(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
