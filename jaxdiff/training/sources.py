"""Where a recipe's frozen parts and initial weights come from: a training run's workdir (its EMA
params and config.json) or a model folder that `jaxdiff.training.export` wrote (diffusers /
transformers sub-folders and training.json, e.g. the shipped `jaxdiff/assets/shapes_unet`).

A part is one of PARTS: `vae` (a vae run), `text_encoder` (the text tower of a clip run), `clip`
(both towers of a clip run), `unet` (a latent text-to-image diffusion run) and `transformer` / `t5` (an MMDiT
or Wan diffusion run's transformer and the T5 encoder it trained beside it). From a run workdir
the part's run is that workdir; from a model folder it is the run that training.json records.
"""
from __future__ import annotations

import json
import os

import ml_collections

from jaxdiff.training.checkpoint import latest_step, load_params

# part -> (its run in training.json, its sub-folder of a model folder (a T5's: `_t5_folder`), its subtree of the run's
# EMA params)
PARTS = {"vae": ("vae", "vae", "vae"), "text_encoder": ("clip", "text_encoder", "text_model"),
         "clip": ("clip", "clip", None), "unet": ("diffusion", "unet", None),
         "transformer": ("diffusion", "transformer", "denoiser"), "t5": ("diffusion", None, "t5")}


def is_model_folder(path: str) -> bool:
    """Whether `path` is an exported model folder (a model_index.json) rather than a run workdir."""
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _part(part: str) -> tuple[str, str | None, str | None]:
    if part not in PARTS:
        raise ValueError(f"part={part!r}: choose one of: {', '.join(PARTS)}")
    return PARTS[part]


def _t5_folder(path: str) -> str:
    """The T5's sub-folder of model folder `path`: text_encoder_2 beside a CLIP (an MMDiT's), or text_encoder where it
    is the only text encoder (a Wan transformer's)."""
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    folders = [k for k, v in index.items() if isinstance(v, list) and v[-1:] == ["T5EncoderModel"]]
    if not folders:
        raise ValueError(f"{path!r} holds no T5 text encoder (model_index.json lists no T5EncoderModel)")
    return folders[0]


def _training_record(path: str, part: str) -> dict:
    run = _part(part)[0]
    file = os.path.join(path, "training.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} has a model_index.json but no training.json: not a folder "
                                f"jaxdiff.training.export wrote, so the run that made its {part} is unknown")
    with open(file) as f:
        records = json.load(f)
    if run not in records:
        raise ValueError(f"{path!r}: its training.json records the runs {sorted(records)}, none a {run!r} run "
                         f"(needed for its {part})")
    return records[run]


def record(path: str, part: str) -> dict:
    """{'step', 'seed', 'config'} of the run that made `part` of `path` (what training.json keeps)."""
    if is_model_folder(path):
        return _training_record(path, part)
    from jaxdiff.training.evaluate import read_run_config

    config = read_run_config(path)
    return {"step": latest_step(path), "seed": config.seed, "config": config.to_dict()}


def run_config(path: str, part: str) -> ml_collections.ConfigDict:
    """The config of the run that made `part` of `path`."""
    if is_model_folder(path):
        return ml_collections.ConfigDict(_training_record(path, part)["config"])
    from jaxdiff.training.evaluate import read_run_config

    return read_run_config(path)


def ema_params(path: str, part: str, step: int | None = None):
    """`part`'s trained (EMA) params from `path`: a run's checkpoint (latest step unless `step`) or
    the model folder's sub-folder, converted (the same tree either way; `step`, if given, must be the
    one its training.json records)."""
    _, folder, subtree = _part(part)
    if is_model_folder(path):
        folder = folder or _t5_folder(path)
        held = _training_record(path, part)["step"]
        if step not in (None, held):
            raise ValueError(f"{path!r} is a model folder holding step {held} of its {part}'s run, not step {step}")
        from jaxdiff import convert

        load = convert.from_transformers if part in ("text_encoder", "clip", "t5") else convert.from_diffusers
        return load(os.path.join(path, folder))[1]
    from jaxdiff.training.evaluate import read_run_config

    if "lora" in read_run_config(path):
        raise ValueError(f"{path!r} is a LoRA run: its checkpoints hold adapters, not a {part}; export it with "
                         f"`python -m jaxdiff.training.export --merge` and use that folder")
    params = load_params(path, "ema", step)
    if part == "transformer" and subtree not in params:   # an MMDiT run without a T5 trains the transformer alone
        return params
    return params[subtree] if subtree else params
