"""Does a video model lay out the prompted motion at pure noise? The t = 999 drift against the data's.

For each text-to-video model folder and the 24 prompts "a {red|blue|green} {circle|square} moving
{left|right|up|down}": the guided (7.5) x_0 prediction at t = 999 (v-prediction at SNR 0: minus the
U-Net's output) from 4 frame-correlated noise draws, decoded frame by frame; in each frame the centroid of
the prompted colour (pixels weighted by their projection on the line from the background to that colour),
and its least-squares velocity. Reported: the share of the 96 predictions whose velocity points the
prompted way, and its mean component along that way (image sides per frame), against the same measure on
the data's mean clip of each caption (the moving_shapes training videos with that exact caption, averaged
in pixels), which is what a caption-mean target at t = 999 asks for.

    python benchmarks/bench_video_directions.py VIDEO_FOLDER [more folders]

Needs the moving_shapes training split the models trained on (python -m jaxdiff.data.prepare moving_shapes
--resolution 32 --num_frames 8). Prints a table and writes it to BENCHMARKS.md (section "Video
directions"); never used as a test.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_section  # noqa: E402

COLOURS, SHAPES = ("red", "blue", "green"), ("circle", "square")
DIRECTIONS = ("left", "right", "up", "down")
PROMPTS = tuple(f"a {c} {s} moving {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS)
NOISE = 4
GUIDANCE = 7.5


def along_velocity(video: np.ndarray, prompt: str) -> float:
    """The prompted colour's centroid velocity along the prompted direction (image sides per frame) in a video
    [T, H, W, 3] with values in [0, 255]."""
    from jaxdiff.data import render

    colour, direction = prompt.split()[1], prompt.split()[-1]
    bg, c = np.asarray(render.BACKGROUND, np.float64), np.asarray(render.PALETTE[colour], np.float64)
    w = np.clip(((video - bg) @ (c - bg)) / ((c - bg) @ (c - bg)), 0.0, 1.0)      # [T, H, W]
    t, h, wd = w.shape
    mass = w.sum((1, 2)) + 1e-9
    xs = (w * (np.arange(wd) + 0.5)[None, None, :]).sum((1, 2)) / mass / wd
    ys = (w * (np.arange(h) + 0.5)[None, :, None]).sum((1, 2)) / mass / h
    velocity = np.polyfit(np.arange(t), np.stack([xs, ys], 1), 1)[0]
    return float(np.dot(velocity, render.VELOCITIES[direction]))


def data_velocities(name: str) -> dict[str, float]:
    """The along-velocity of each prompt's mean training clip (pixels, exact caption)."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, split="train")
    sums, counts = {}, {}
    for i in range(len(source)):
        ex = source[i]
        caption = ex["caption"].decode()
        if caption in PROMPTS:
            sums[caption] = sums.get(caption, 0.0) + ex["image"].astype(np.float64)
            counts[caption] = counts.get(caption, 0) + 1
    missing = [p for p in PROMPTS if p not in counts]
    if missing:
        raise ValueError(f"{name} has no training clip captioned {missing[0]!r}")
    return {p: along_velocity(sums[p] / counts[p], p) for p in PROMPTS}


def t999_velocities(pipe) -> list[float]:
    """The along-velocity of each guided t = 999 x_0 prediction, NOISE per prompt (prompt-major)."""
    from jaxdiff import diffusion

    shape = pipe.video_latent_shape(NOISE, pipe.num_frames, pipe.default_size, pipe.default_size)
    z = diffusion.frame_correlated_noise(jax.random.key(0), shape, pipe.frame_noise_correlation)
    out = []
    for prompt in PROMPTS:
        model = pipe.guided_model(pipe.unet_params, pipe.text_params, jnp.asarray(pipe.tokenize([prompt] * NOISE)),
                                  jnp.asarray(pipe.tokenize([""] * NOISE)), jnp.float32(GUIDANCE))
        x0 = -model(z, jnp.full((NOISE,), 999.0))
        videos = np.asarray(pipe.decode_video(pipe.vae_params, x0)) * 255.0
        out += [along_velocity(v, prompt) for v in videos]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="text-to-video model folders")
    p.add_argument("--data", default="moving_shapes/32px-8f", help="the tfds name of the models' training data")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    from jaxdiff.pipelines import TextToVideo

    data = data_velocities(args.data)
    lines = [f"| data: mean clip per caption | {np.mean([v > 0 for v in data.values()]):.3f} | "
             f"{np.mean(list(data.values())):.4f} |"]
    for folder in args.folders:
        v = t999_velocities(TextToVideo.from_pretrained(folder))
        lines.append(f"| {folder} | {np.mean(np.asarray(v) > 0):.3f} | {np.mean(v):.4f} |")
    table = "\n".join(["| model | t = 999 drift the prompted way | mean velocity along it (sides / frame) |",
                       "|---|---:|---:|", *lines])
    print(table)
    if not args.no_write:
        write_section("Video directions", __doc__.split("\n\n")[1] + "\n\n" + table)


if __name__ == "__main__":
    main()
