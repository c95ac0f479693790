"""A trained latent text-to-image or text-to-video run -> a diffusers pipeline folder.

    python -m jaxdiff.training.export --workdir runs/ld_shapes --out shapes_model
    python -m jaxdiff.training.export --workdir runs/vd_inflated --out /tmp/vd_inflated_model
    python -m jaxdiff.training.export --workdir runs/lora --out my_lora [--merge]

Reads the latent-diffusion run's config, its EMA U-Net, and the EMA weights of the VAE and
CLIP it was trained on (`model.vae.checkpoint`, `model.text_encoder.checkpoint`: runs, or model
folders such as the shipped one, whose parts and training.json records are carried over), and
writes diffusers' layout: model_index.json, unet/ and vae/ (diffusers format), text_encoder/
(transformers' CLIPTextModel), tokenizer/ (the run's WordTokenizer), scheduler/ (a
DPMSolverMultistepScheduler config for the run's noise schedule), plus clip/ (both CLIP towers,
transformers' CLIPModel, for zero-shot use), training.json (each run's config and step; for a fine-tune,
also the record of the run or folder it started from, `config.model.init_from`, while that still exists) and
checksums.json (the sha256 of every weights file, which loading the folder verifies).

The run's `config.model.backbone` picks the pipeline:
- `unet`: StableDiffusionPipeline (unet/ a UNet2DConditionModel); `TextToImage.from_pretrained`
  and `python -m sample --model` load it.
- `mmdit`: transformer/ an SD3Transformer2DModel on the one CLIP text encoder (its states the text tokens, its
  pooled state the pooled embedding) and a FlowMatchEulerDiscreteScheduler config; model_index.json names the
  class MMDiTPipeline (diffusers' StableDiffusion3Pipeline takes three text encoders); `TextToImage` loads it.
  A run with a trained T5 encoder (`config.model.t5`) adds text_encoder_2/ (transformers' T5EncoderModel, whose
  states are then the text tokens; CLIP gives the pooled embedding, as in FluxPipeline) and tokenizer_2/.
- `temporal_unet`: TextToVideoSDPipeline (unet/ a UNet3DConditionModel, from scratch or inflated
  from the image run `config.model.init_from`, whose config.json must still be there);
  `TextToVideo.from_pretrained` loads it. The video U-Net's jaxdiff-only settings (frame position
  embeddings, per-block heads) go into unet/config.json as extra fields that jaxdiff reads back;
  diffusers itself cannot run such a U-Net. The frames it was trained on are in training.json
  (the diffusion run's data name or model.num_frames).
- `wan`: transformer/ a WanTransformer3DModel (diffusers' own config and weights) with a
  FlowMatchEulerDiscreteScheduler config (the run's flow_shift); model_index.json names the class
  WanFrameVAEPipeline and says how it differs from diffusers' WanPipeline (an image VAE on every frame and CLIP's
  states instead of the causal video VAE and UMT5), which cannot run it; `TextToVideo.from_pretrained` loads it.
  A Wan run on a trained T5 (`config.model.t5`) writes that T5 as text_encoder/ (T5EncoderModel) and no CLIP.

A LoRA run (configs/lora.py) exports its adapters as a diffusers LoRA folder instead
(`--out my_lora` -> my_lora/pytorch_lora_weights.safetensors, which diffusers' `pipe.load_lora_weights` and
`jaxdiff.convert.load_lora` read onto the base model, config.model.init_from), or with `--merge` its base
model's pipeline folder with the adapters merged into the U-Net (and text encoder).

`--dtype bfloat16` stores the weights the run trained -- the denoiser's, a T5 trained beside it, the layout
model's -- in bfloat16 (half the bytes; training.json records it); frozen parts (VAE, CLIP) stay as they are.
`--layout RUN` (a layout-to-image run, config.data.layout) adds layout/: the caption -> layout model of a
configs/layout.py run (`jaxdiff.pipelines.layout.LayoutModel`), which draws the layouts the denoiser reads.

The folder is written next to `--out` and renamed into place when complete, so a failed export
never leaves a half-written model, and an existing folder is replaced only with --overwrite.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff import cli
from jaxdiff.convert.common import write_checksums
from jaxdiff.convert.diffusers import DIFFUSERS_FORMAT_VERSION, to_diffusers
from jaxdiff.convert.lora import apply_lora, save_lora
from jaxdiff.convert.transformers import to_transformers
from jaxdiff.models import AutoencoderKL, AutoencoderKLConfig
from jaxdiff.pipelines.layout import CLASS_NAME as LAYOUT_CLASS
from jaxdiff.training import sources
from jaxdiff.training.checkpoint import latest_step, load_params
from jaxdiff.training.evaluate import read_run_config
from jaxdiff.training.lora import LoRAConfig, lora_weights

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "squaredcos_cap_v2": "squaredcos_cap_v2"}


def scheduler_config(m) -> dict:
    """The diffusers scheduler config that reproduces the run's noise schedule and prediction type."""
    n = int(m.num_train_timesteps)
    if m.prediction_type == "flow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": n,
                "shift": float(m.get("flow_shift", 1.0))}
    if m.schedule not in BETA_SCHEDULES:
        raise ValueError(f"config.model.schedule={m.schedule!r} has no diffusers scheduler config; exportable: "
                         f"{', '.join(BETA_SCHEDULES)}, or flow matching")
    config = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": n,
              "beta_schedule": BETA_SCHEDULES[m.schedule], "prediction_type": m.prediction_type,
              "algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "linspace"}
    if m.schedule == "scaled_linear":
        config.update(beta_start=0.00085, beta_end=0.012)
    elif m.schedule == "linear":
        config.update(beta_start=0.0001, beta_end=0.02)
    if m.get("rescale_zero_terminal_snr", False):
        config["rescale_betas_zero_snr"] = True
    return config


def _frozen_run(m, field: str) -> str:
    workdir = m[field].get("checkpoint", "")
    if not workdir:
        raise ValueError(f"config.model.{field}.checkpoint is empty: the run trained on a randomly initialised "
                         f"{field}, which is not a model worth exporting")
    return workdir


@dataclasses.dataclass(frozen=True)
class _Pipeline:
    """What differs between the exported pipelines: the task and the diffusers classes."""

    task: str            # in messages: "text-to-image"
    class_name: str      # model_index.json's _class_name
    denoiser: str        # the denoiser's sub-folder: unet or transformer
    denoiser_class: str  # its diffusers class
    model_index: dict    # further model_index.json entries


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # --dtype: the trained weights' stored dtype
PIPELINES = {  # config.model.backbone -> the pipeline its runs export to
    "unet": _Pipeline("text-to-image", "StableDiffusionPipeline", "unet", "UNet2DConditionModel",
                      {"safety_checker": [None, None], "feature_extractor": [None, None],
                       "requires_safety_checker": False}),
    # an MMDiT on one CLIP text encoder: diffusers has no pipeline class for it (SD3's takes three encoders)
    "mmdit": _Pipeline("text-to-image", "MMDiTPipeline", "transformer", "SD3Transformer2DModel", {}),
    "temporal_unet": _Pipeline("text-to-video", "TextToVideoSDPipeline", "unet", "UNet3DConditionModel", {}),
    "wan": _Pipeline("text-to-video", "WanFrameVAEPipeline", "transformer", "WanTransformer3DModel",
                     {"_note": "transformer/ is diffusers' WanTransformer3DModel, but unlike diffusers' WanPipeline "
                               "its latents are an image VAE's (vae/ AutoencoderKL encodes and decodes every frame "
                               "alone: one latent frame per video frame, scaled by scaling_factor, no latents_mean/"
                               "std) and its text context is CLIP's last hidden states (text_encoder/ CLIPTextModel) "
                               "or a T5 trained with it (text_encoder/ T5EncoderModel), over jaxdiff's WordTokenizer "
                               "(tokenizer/), not UMT5's; jaxdiff's TextToVideo runs it"}),
}


def export_text_to_image(workdir: str, out: str, overwrite: bool = False, weights: str = "ema") -> str:
    """Writes the pipeline folder of latent text-to-image run `workdir` (backbone unet: a StableDiffusionPipeline;
    mmdit: transformer/ an SD3Transformer2DModel) to `out`; returns `out`. `weights`: the checkpoint's 'ema' or
    trained 'params'."""
    return export_run(workdir, out, overwrite, weights, task="text-to-image")


def export_text_to_video(workdir: str, out: str, overwrite: bool = False) -> str:
    """Writes the pipeline folder of latent text-to-video run `workdir` (backbone temporal_unet: a
    TextToVideoSDPipeline; wan: transformer/ a WanTransformer3DModel) to `out`; returns `out`."""
    return export_run(workdir, out, overwrite, task="text-to-video")


def export_run(workdir: str, out: str, overwrite: bool = False, weights: str = "ema", task: str | None = None,
               merge: bool = False, dtype: str = "float32", layout: str | None = None) -> str:
    """Writes the pipeline folder of latent diffusion run `workdir`, text-to-image or text-to-video by its
    config.model.backbone (`task`, if given, must be that one); returns `out`. `weights`: the checkpoint's 'ema'
    (default) or trained 'params'. `dtype`: the stored dtype of the weights the run trained (denoiser, a T5 trained
    beside it, the layout model), 'float32' or 'bfloat16' (half the bytes; loading casts them to the model's dtype). `layout`: the caption -> layout run whose EMA model a layout-to-image
    run's folder carries in layout/. A LoRA run (configs/lora.py) writes its LoRA (`export_lora`), or with
    `merge` the pipeline folder of its base model with the adapters merged in."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of: {', '.join(DTYPES)}")
    config = read_run_config(workdir)
    if merge and "lora" not in config:
        raise ValueError(f"{workdir!r} is not a LoRA run (its config has no lora section): there is nothing to merge")
    if "lora" in config and not merge:
        return export_lora(workdir, out, overwrite, weights)
    backbone = config.model.get("backbone")
    if task is not None and (backbone not in PIPELINES or PIPELINES[backbone].task != task):
        raise ValueError(f"{workdir!r} is not a latent {task} run (recipe {config.get('recipe')!r}, backbone "
                         f"{backbone!r}; {task}: backbone "
                         + " or ".join(repr(b) for b, p in PIPELINES.items() if p.task == task) + ")")
    if config.get("recipe") != "diffusion" or backbone not in PIPELINES:
        raise ValueError(f"{workdir!r} is a {config.get('recipe')!r} run with config.model.backbone={backbone!r}, "
                         f"which has no pipeline export; exportable: diffusion runs with backbone "
                         + ", ".join(f"{b!r} ({p.task})" for b, p in PIPELINES.items()))
    reads_layout = bool(config.data.get("layout", False))
    if reads_layout != (layout is not None):
        raise ValueError(f"{workdir!r} reads layout maps (config.data.layout): pass the caption -> layout run to "
                         f"carry (--layout)" if reads_layout else
                         f"layout={layout!r}: {workdir!r} reads no layout map, so its folder takes no layout model")
    if layout is not None:
        _check_layout_frames(config, layout)
    return _export(workdir, out, overwrite, backbone, weights, dtype, layout)


def _check_layout_frames(config, layout: str) -> None:
    """A layout-to-video run takes a caption -> trajectory run of its clips' frame count, an image run a still one."""
    from jaxdiff.data.moving_shapes import frames_of

    frames = frames_of(config.data.get("name", "")) or 0
    drawn = read_run_config(layout).data.get("num_frames", 0)
    if drawn != frames:
        raise ValueError(f"layout={layout!r} draws {f'{drawn}-frame trajectories' if drawn else 'still layouts'}; "
                         f"this run reads {f'{frames}-frame trajectories' if frames else 'still layouts'} "
                         f"(configs/layout.py:{'motion' if frames else 'shapes'})")


def export_lora(workdir: str, out: str, overwrite: bool = False, weights: str = "ema") -> str:
    """Writes the adapters of LoRA run `workdir` as diffusers' `save_lora_weights` does, into folder `out`:
    pytorch_lora_weights.safetensors (peft keys and lora_adapter_metadata; diffusers' `load_lora_weights`,
    jaxdiff's `convert.load_lora` read it onto the run's base model, config.model.init_from) and training.json
    (the run's config, seed and step). Returns `out`."""
    config = read_run_config(workdir)
    if "lora" not in config:
        raise ValueError(f"{workdir!r} is not a LoRA run (its config has no lora section); export its pipeline "
                         f"folder with export_run")
    _lora_base(config, workdir)
    step = latest_step(workdir)
    lora, adapters = LoRAConfig.of(config.lora), load_params(workdir, _checked(weights), step)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out!r} exists; pass overwrite=True (--overwrite) to replace it")

    def write(folder: str) -> None:
        save_lora({c: lora_weights(a, lora.scale) for c, a in adapters.items()}, folder)
        record = {"step": step, "weights": weights, "seed": config.seed, "config": config.to_dict()}
        _write_json(os.path.join(folder, "training.json"), relative_paths({"lora": record}))

    return _write_atomically(out, write)


def _lora_base(config, workdir: str) -> str:
    """A LoRA run's base model (config.model.init_from), which must exist to export against."""
    base = config.model.get("init_from", "")
    if not base:
        raise ValueError(f"{workdir!r} trained adapters of a randomly initialised U-Net (config.model.init_from is "
                         f"empty), which is not a model worth exporting")
    return base


def _checked(weights: str) -> str:
    if weights not in ("ema", "params"):
        raise ValueError(f"weights={weights!r}: choose one of: ema, params")
    return weights


def _merged(config, adapters, unet_params, text_params):
    """(U-Net, text encoder) params with a LoRA run's adapters merged in."""
    scale = LoRAConfig.of(config.lora).scale
    return tuple(apply_lora(params, lora_weights(adapters[c], scale)) if c in adapters else params
                 for c, params in (("unet", unet_params), ("text_encoder", text_params)))


def _layout_model(workdir: str):
    """(the LayoutModel of caption -> layout run `workdir` with its EMA params, its training.json record)."""
    from jaxdiff.pipelines.layout import LayoutModel
    from jaxdiff.training.data import data_spec, shapes_tokenizer
    from jaxdiff.training.recipes.layout import model_for

    config = read_run_config(workdir)
    if config.get("recipe") != "layout":
        raise ValueError(f"layout={workdir!r} is a {config.get('recipe')!r} run; need a caption -> layout run "
                         f"(configs/layout.py)")
    step = latest_step(workdir)
    tokenizer = shapes_tokenizer(config.data)
    model = LayoutModel(model_for(config, data_spec(config.data)), load_params(workdir, "ema", step), tokenizer)
    return model, {"step": step, "seed": config.seed, "config": config.to_dict()}


def _export(workdir: str, out: str, overwrite: bool, backbone: str, weights: str = "ema",
            dtype: str = "float32", layout: str | None = None) -> str:
    """The export of a run of `backbone`: checks the run, then writes every part into one staging folder."""
    from jaxdiff.training.data import data_spec, shapes_tokenizer
    from jaxdiff.training.recipes.clip import model_for as clip_model_for
    from jaxdiff.training.recipes.diffusion.backbones import network
    from jaxdiff.training.recipes.diffusion.config import ModelConfig
    from jaxdiff.training.recipes.diffusion.latents import text_modules

    pipeline, video_unet = PIPELINES[backbone], backbone == "temporal_unet"
    config = read_run_config(workdir)
    m = config.model
    has_clip, has_t5 = m.get("text_encoder") is not None, m.get("t5") is not None
    if config.recipe != "diffusion" or m.get("space") != "latent" or not (has_clip or has_t5) \
            or m.get("backbone") != backbone:
        raise ValueError(f"{workdir!r} is not a latent {pipeline.task} run (recipe {config.recipe!r}, "
                         f"space {m.get('space')!r}, backbone {m.get('backbone')!r}, text encoder: "
                         f"{has_clip or has_t5}; need recipe 'diffusion', space 'latent', backbone {backbone!r} "
                         f"and a text encoder)")
    if config.data.get("source") != "shapes":
        raise ValueError(f"data.source={config.data.get('source')!r}: only runs on captioned data (shapes) have a "
                         f"tokenizer to export")
    _checked(weights)
    scheduler = {**scheduler_config(m), "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out!r} exists; pass overwrite=True (--overwrite) to replace it")
    vae_source = _frozen_run(m, "vae")
    clip_source = _frozen_run(m, "text_encoder") if has_clip else None
    # what is loaded is what is recorded
    records = {"diffusion": {"step": latest_step(workdir), "weights": weights, "seed": config.seed,
                             "config": config.to_dict()},
               "vae": sources.record(vae_source, "vae")}
    if has_clip:
        records["clip"] = sources.record(clip_source, "clip")
    if m.get("init_from") and os.path.exists(m.init_from):   # the run it started from, with that one's history
        records["diffusion"]["init_from"] = sources.record(m.init_from, "unet" if backbone == "unet" else "transformer")
    spec = data_spec(config.data)

    vae_cfg = AutoencoderKLConfig(**{**{k: v for k, v in m.vae.items() if k != "checkpoint"},
                                     "sample_size": spec.image_size})
    latent_size = spec.image_size // vae_cfg.downsample_factor
    model = ModelConfig.of(m)
    text_encoder, t5, width, pooled_width = text_modules(model, spec)   # the recipe's own builders
    # an inflated video U-Net's architecture comes from its image run
    denoiser = network(model, vae_cfg.latent_channels, latent_size, jnp.float32, width, pooled_width,
                       spec.layout_channels)
    denoiser_params = load_params(workdir, weights, records["diffusion"]["step"])
    if t5:   # the T5 trained beside the denoiser (the recipe's {"denoiser": ..., "t5": ...})
        denoiser_params, t5_params = denoiser_params["denoiser"], denoiser_params["t5"]
    # text_encoder/ holds CLIP (and text_encoder_2/ a T5 beside it), or the one T5 (Wan on T5)
    encoders = ([("CLIPTextModel", text_encoder, sources.ema_params(clip_source, "text_encoder",
                                                                     records["clip"]["step"]))] if has_clip else []) \
        + ([("T5EncoderModel", t5, t5_params)] if has_t5 else [])
    if "lora" in config:   # the checkpoint holds adapters of the base U-Net (and text encoder); clip/ stays the base's
        base = sources.ema_params(_lora_base(config, workdir), "unet")
        denoiser_params, text_params = _merged(config, denoiser_params, base, encoders[0][2])
        encoders[0] = (*encoders[0][:2], text_params)
    vae_params = sources.ema_params(vae_source, "vae", records["vae"]["step"])
    stored = lambda params: jax.tree.map(lambda p: jnp.asarray(p, DTYPES[dtype]), params)
    denoiser_params = stored(denoiser_params)
    if has_t5:
        encoders[-1] = (*encoders[-1][:2], stored(encoders[-1][2]))
    records["diffusion"]["stored_dtype"] = dtype
    layout_model = None
    if layout is not None:
        layout_model, records["layout"] = _layout_model(layout)
        layout_model.params = stored(layout_model.params)

    def write(folder: str) -> None:
        to_diffusers(denoiser, denoiser_params, os.path.join(folder, pipeline.denoiser), jaxdiff_fields=video_unet)
        to_diffusers(AutoencoderKL(vae_cfg), vae_params, os.path.join(folder, "vae"))
        index = {}
        for i, (class_name, module, params) in enumerate(encoders):
            suffix = f"_{i + 1}" if i else ""
            to_transformers(module, params, os.path.join(folder, "text_encoder" + suffix))
            shapes_tokenizer(config.data).save(os.path.join(folder, "tokenizer" + suffix))
            index.update({"text_encoder" + suffix: ["transformers", class_name],
                          "tokenizer" + suffix: ["jaxdiff", "WordTokenizer"]})
        if has_clip:   # both CLIP towers, for zero-shot use
            to_transformers(clip_model_for(sources.run_config(clip_source, "clip"), spec),
                            sources.ema_params(clip_source, "clip", records["clip"]["step"]),
                            os.path.join(folder, "clip"))
        if layout_model is not None:
            layout_model.save(os.path.join(folder, "layout"))
            index["layout"] = ["jaxdiff", LAYOUT_CLASS]
        os.makedirs(os.path.join(folder, "scheduler"))
        _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler)
        _write_json(os.path.join(folder, "model_index.json"), {
            "_class_name": pipeline.class_name, "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
            pipeline.denoiser: ["diffusers", pipeline.denoiser_class], "vae": ["diffusers", "AutoencoderKL"],
            **index, "scheduler": ["diffusers", scheduler["_class_name"]], **pipeline.model_index})
        _write_json(os.path.join(folder, "training.json"), relative_paths(records))
        write_checksums(folder)

    return _write_atomically(out, write)


def _write_atomically(out: str, write: Callable[[str], None]) -> str:
    """Runs write(folder) on a staging folder next to `out`, then renames it into place: `out` is never
    half-written nor half-replaced, and a failed write leaves no staging folder behind."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        write(staging)
        if os.path.exists(out):  # swap, then delete the old folder
            old = staging + ".old"
            os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old)
        else:
            os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# the record fields that name run workdirs or model folders
PATH_FIELDS = ("checkpoint", "init_from", "workdir")


def relative_paths(record):
    """The record with every absolute run or folder path (PATH_FIELDS) relative to the working directory, so
    the provenance names what the reproduction commands name, and no machine's folders."""
    if isinstance(record, dict):
        return {k: os.path.relpath(v) if k in PATH_FIELDS and isinstance(v, str) and os.path.isabs(v)
                else relative_paths(v) for k, v in record.items()}
    return record


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=lambda v: list(v) if isinstance(v, tuple) else str(v))


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m jaxdiff.training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True,
                   help="the latent text-to-image, text-to-video or LoRA diffusion run's folder")
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--weights", choices=("ema", "params"), default="ema",
                   help="the checkpoint's EMA (default) or its trained parameters (a short fine-tune's EMA lags them)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="the trained weights' stored dtype (denoiser, a T5 trained with it, the layout model); "
                        "bfloat16 halves them (loading casts back)")
    p.add_argument("--layout", default=None,
                   help="a layout-to-image run (config.data.layout): the caption -> layout run (configs/layout.py) "
                        "whose model the folder carries")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA run: write its base model's pipeline folder with the adapters merged in, instead of "
                        "the LoRA file")
    args = p.parse_args(argv)
    try:
        print(export_run(args.workdir, args.out, args.overwrite, args.weights, merge=args.merge, dtype=args.dtype,
                         layout=args.layout))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        if cli.debugging(argv):
            raise
        print(f"{p.prog}: error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m jaxdiff.training.export"))
