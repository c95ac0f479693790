"""Text-to-video generation speed here vs diffusers, same tiny model and latents.

    python benchmarks/bench_video.py [--model t2v|wan] [--batch 2] [--frames 8] [--steps 25] [--repeats 1]

--model t2v (default): diffusers' TextToVideoSDPipeline on the golden-file pipeline
(tests/fixtures/diffusers_video/pipeline_t2v: a tiny UNet3DConditionModel; VAE, CLIP and tokenizer from
tests/fixtures/pipeline_sd), 16x16 videos, DDIM with classifier-free guidance.
--model wan: diffusers' WanPipeline on the tiny Wan 2.1 folder tests/fixtures/pipeline_wan (WanTransformer3DModel,
AutoencoderKLWan, UMT5), 32x48 videos of --frames (1 + 4k; default 9), the folder's UniPC on flow sigmas, CFG
against empty negative prompts; jaxdiff runs the same folder through TextToVideo.from_pretrained.
Both sides start from the same initial latents.

Columns:
  compile    seconds of the first call minus a warm one (jax: trace + compile of the whole program)
  generate   warm seconds per call: text encoding, --steps guided U-Net steps, VAE decode of every frame
             (best of --repeats; the default is one run)
  frames/s   batch * frames / generate
  rel err    ||latents - latents_diffusers|| / ||latents_diffusers|| (final latents)
Prints a table and writes it to BENCHMARKS.md (section "Text-to-video", or "Text-to-video (Wan)"). The
diffusers row is skipped when torch/diffusers are not installed.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

# torch's OpenMP threads spin while waiting by default; on cores shared with other jobs that stalls every parallel
# region (bench_mmdit.py measured up to 40x). Passive waiting fixes it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import jaxdiff as jd  # noqa: E402
from jaxdiff.convert.common import read_config  # noqa: E402
from jaxdiff.convert.scheduler import schedule_from_config  # noqa: E402
from jaxdiff.pipelines import TextToVideo  # noqa: E402
from report import write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2V = os.path.join(ROOT, "tests", "fixtures", "diffusers_video", "pipeline_t2v")
SD = os.path.join(ROOT, "tests", "fixtures", "pipeline_sd")
WAN = os.path.join(ROOT, "tests", "fixtures", "pipeline_wan")
PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right",
           "a yellow circle moving down"]


def jax_pipeline(model: str) -> TextToVideo:
    if model == "wan":
        return TextToVideo.from_pretrained(WAN)
    sd = jd.convert.load_pipeline(SD)
    unet, params = jd.convert.from_diffusers(os.path.join(T2V, "unet"))
    schedule, defaults = schedule_from_config(read_config(os.path.join(T2V, "scheduler"), "scheduler_config.json"))
    return TextToVideo(unet, params, sd.vae, sd.vae_params, sd.text_encoder, sd.text_params, sd.tokenizer, schedule,
                       {"method": "ddim", **defaults})


def torch_pipeline(model: str):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel, WanPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_grad_enabled(False)
    if model == "wan":
        return WanPipeline.from_pretrained(WAN)
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


# --model -> (height, width, default frames, default guidance, BENCHMARKS.md section)
MODELS = {"t2v": (16, 16, 8, 7.5, "Text-to-video"), "wan": (32, 48, 9, 5.0, "Text-to-video (Wan)")}


def describe(model: str, args, latent_shape) -> str:
    """The model and the request, for the table's setup sentence."""
    b, n, h, w, c = latent_shape
    if model == "wan":
        return (f"the tiny Wan 2.1 folder tests/fixtures/pipeline_wan (WanTransformer3DModel 2 blocks x 24 wide, patch "
                f"(1, 2, 2); causal video VAE x8 space x4 time; UMT5 16 wide, 512 text tokens), {args.batch} prompts x "
                f"{args.frames} frames of 32x48 = {n}x{h}x{w}x{c} latents ({n * h * w // 4} patch tokens), "
                f"{args.steps} steps of the folder's UniPC on flow sigmas (flow_shift 3) with CFG {args.guidance} "
                f"against empty negative prompts (batch {2 * b} through the transformer), causal VAE decode")
    return (f"the tiny golden-file text-to-video model (UNet3DConditionModel (8, 16) channels, 16x16 videos = "
            f"8x8x4 latents, CLIP 32 wide), {args.batch} prompts x {args.frames} frames, {args.steps} DDIM steps "
            f"with CFG (batch {2 * b} through the U-Net), per-frame VAE decode")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="t2v")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, help="default: 8 (t2v), 9 (wan)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, help="default: 7.5 (t2v), 5.0 (wan)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--note", default="", help="a sentence about this run for BENCHMARKS.md (e.g. the machine's load)")
    args = ap.parse_args()
    height, width, frames, guidance, section = MODELS[args.model]
    args.frames, args.guidance = args.frames or frames, args.guidance or guidance
    prompts = (PROMPTS * args.batch)[: args.batch]
    pipe = jax_pipeline(args.model)
    shape = pipe.video_latent_shape(args.batch, args.frames, height, width)
    noise = np.asarray(jax.random.normal(jax.random.key(0), shape))
    n_frames = args.batch * args.frames
    request = dict(num_frames=args.frames, height=height, width=width)

    run = lambda: pipe(prompts, steps=args.steps, guidance_scale=args.guidance, noise=jnp.asarray(noise),
                       return_latents=True, **request)
    first, warm, (_, latents) = timed(lambda: jax.block_until_ready(run()), args.repeats)
    rows = [("jaxdiff (jax, float32)", first - warm, warm, n_frames / warm, np.asarray(latents))]

    try:
        import torch
        tpipe = torch_pipeline(args.model)
    except ImportError:
        tpipe = None
    if tpipe is not None:
        tpipe.set_progress_bar_config(disable=True)
        latents_nc = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 4, 1, 2, 3)))
        tcall = lambda steps, output_type: tpipe(prompts, num_inference_steps=steps, guidance_scale=args.guidance,
                                                 latents=latents_nc.clone(), output_type=output_type, **request).frames
        trun = lambda: tcall(args.steps, "np")
        tcall(1, "np")   # warm-up, not timed
        _, twarm, _ = timed(trun, args.repeats - 1) if args.repeats > 1 else (None, *_one(trun))
        tlat = tcall(args.steps, "latent").numpy().transpose(0, 2, 3, 4, 1)
        rows.append((f"diffusers {_version('diffusers')} (torch {torch.__version__}, {torch.get_num_threads()} "
                     f"threads, float32)", float("nan"), twarm, n_frames / twarm, tlat))
    ref = rows[-1][4]
    header = "| implementation | compile s | generate s | frames/s | rel err |\n|---|---:|---:|---:|---:|"
    lines = [header] + [
        f"| {name} | {'' if np.isnan(c) else f'{c:.1f}'} | {g:.2f} | {fps:.1f} | "
        f"{np.linalg.norm(lat - ref) / np.linalg.norm(ref):.1e} |" for name, c, g, fps, lat in rows]
    setup = (f"`python benchmarks/bench_video.py --model {args.model} --batch {args.batch} --frames {args.frames} "
             f"--steps {args.steps} --repeats {args.repeats}`: {describe(args.model, args, shape)}; same initial "
             f"latents on both sides. {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared "
             f"with other jobs while measured, load average {os.getloadavg()[0]:.1f} at the end), jax "
             f"{jax.__version__} on {jax.default_backend()}. Timed after a warm-up (jax: the first call, which "
             f"compiles, then the best of {args.repeats} calls; torch: a 1-step call, then the best of "
             f"{max(args.repeats - 1, 1)} full calls after an untimed one when --repeats > 1), so expect noise of "
             f"tens of percent from the shared machine.")
    table = "\n".join(lines) + (f"\n\n{args.note}" if args.note else "")
    print(setup + "\n\n" + table)
    if not args.no_write:
        write_section(section, setup + "\n\n" + table)


def _one(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
