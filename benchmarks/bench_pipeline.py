"""Text-to-image pipeline speed: jaxdiff vs diffusers' PyTorch pipeline on this CPU, same model folder.

    python benchmarks/bench_pipeline.py [--model tests/fixtures/pipeline_sd] [--steps 25] [--sampler dpmpp_2m]

Rows, each measured in one run:
  first image, fresh process  wall time of a new Python process that imports, loads the folder and
                              writes one image (jaxdiff: cold, then warm persistent compilation cache)
  images/s at batch 1 / 16    warm throughput in a running process
Same sampler (DPM-Solver++ 2M unless --sampler names jaxdiff's), steps and guidance (the folder's default) on
both sides. Needs the [dev] extra for torch.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from jaxdiff.convert.common import read_config  # noqa: E402
from jaxdiff.samplers import METHODS  # noqa: E402
from report import write_section  # noqa: E402

JAX_FIRST = """
import sys, time, jaxdiff as jd
from jaxdiff import compilation_cache
compilation_cache.enable(sys.argv[2])
pipe = jd.pipelines.TextToImage.from_pretrained(sys.argv[1])
pipe(["a red circle above a blue square"], steps=int(sys.argv[3]), method=sys.argv[4]).block_until_ready()
"""
TORCH_FIRST = """
import sys, torch, diffusers
pipe = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None)
pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
pipe(["a red circle above a blue square"], num_inference_steps=int(sys.argv[3]), output_type="np")
"""


def fresh_process(code: str, model: str, cache: str, steps: int, sampler: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, model, cache, str(steps), sampler], check=True, capture_output=True)
    return time.perf_counter() - t0


def jax_throughput(model: str, steps: int, batch: int, sampler: str, repeat: int = 2) -> float:
    import jaxdiff as jd

    pipe = jd.pipelines.TextToImage.from_pretrained(model)
    prompts = ["a red circle above a blue square"] * batch
    pipe(prompts, steps=steps, method=sampler).block_until_ready()
    t0 = time.perf_counter()
    for s in range(repeat):
        pipe(prompts, steps=steps, method=sampler, seed=s).block_until_ready()
    return batch * repeat / (time.perf_counter() - t0)


def torch_throughput(model: str, steps: int, batch: int, repeat: int = 2) -> float:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle above a blue square"] * batch
    pipe(prompts, num_inference_steps=steps, output_type="np")
    t0 = time.perf_counter()
    for _ in range(repeat):
        pipe(prompts, num_inference_steps=steps, output_type="np")
    return batch * repeat / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "pipeline_sd"))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="dpmpp_2m", choices=list(METHODS),
                   help="jaxdiff's sampler; diffusers' side is compared only with dpmpp_2m")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    model = os.path.abspath(args.model)
    try:
        import diffusers  # noqa: F401
        # diffusers cannot load a folder whose tokenizer is jaxdiff's own (the shipped shapes model's WordTokenizer)
        have_torch = read_config(model, "model_index.json")["tokenizer"][0] != "jaxdiff" and \
            args.sampler == "dpmpp_2m"
    except ImportError:
        have_torch = False

    with tempfile.TemporaryDirectory() as cache:
        cold = fresh_process(JAX_FIRST, model, cache, args.steps, args.sampler)
        warm = fresh_process(JAX_FIRST, model, cache, args.steps, args.sampler)
    rows = [("first image, fresh process (s)", f"{cold:.1f} cold cache / {warm:.1f} warm cache",
             f"{fresh_process(TORCH_FIRST, model, '', args.steps, args.sampler):.1f}" if have_torch else "n/a")]
    for batch in (1, 16):
        rows.append((f"images/s, batch {batch}", f"{jax_throughput(model, args.steps, batch, args.sampler):.2f}",
                     f"{torch_throughput(model, args.steps, batch):.2f}" if have_torch else "n/a"))
        print(rows[-1], flush=True)
    table = "| measure | jaxdiff | diffusers (torch) |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows)
    meta = (f"Model folder `{os.path.relpath(model)}`, sampler `{args.sampler}`, {args.steps} steps, CFG, float32, "
            f"{os.cpu_count()} CPU cores.")
    print(meta)
    print(table)
    if not args.no_write:
        default = model == os.path.abspath(p.get_default("model"))
        write_section("Text-to-image pipeline" + ("" if default else f": {os.path.relpath(model)}"),
                      f"`python benchmarks/bench_pipeline.py --model {os.path.relpath(model)} --steps {args.steps} "
                      f"--sampler {args.sampler}`"
                      f"\n\n{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
