"""The caption -> layout stage of a layout-to-image folder (LMD's first stage, Lian et al. 2023, with the trained
`jaxdiff.models.layout.LayoutTransformer` in place of an LLM): a folder's `layout/` sub-folder holds its config,
weights and tokenizer, and `draw` places each prompt's objects.

    layout = LayoutModel.from_pretrained("path/to/folder/layout")
    layout.draw(["a red circle to the left of a blue square"], seed=0)   # [[SceneObject, SceneObject]]

`jaxdiff.training.export --layout RUN` writes the sub-folder from a `configs/layout.py` run; `TextToImage`
loads it with the rest of the folder and draws the layouts its denoiser reads unless a call gives them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from jaxdiff.convert.common import load_state_dict, save_state_dict
from jaxdiff.models.checks import CheckpointError
from jaxdiff.models.layers import param_shapes
from jaxdiff.models.layout import LayoutConfig, LayoutTransformer, sample_layouts
from jaxdiff.tokenizers import WordTokenizer

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
CLASS_NAME = "LayoutTransformer"   # model_index.json: "layout": ["jaxdiff", CLASS_NAME]


@dataclasses.dataclass
class LayoutModel:
    """A LayoutTransformer, its params and the WordTokenizer of its captions."""

    module: LayoutTransformer
    params: Any
    tokenizer: WordTokenizer

    def draw(self, prompts: Sequence[str], seed: int = 0, temperature: float = 1.0) -> list[list]:
        """One layout per prompt: a list of `render.SceneObject`s (a trajectory model's `render.MovingObject`s) in
        mention order, places sampled (`seed`; `jaxdiff.models.layout.sample_layouts`)."""
        tokens = np.asarray(self.tokenizer(list(prompts)), np.int32)
        return sample_layouts(self.module, self.params, tokens, jax.random.key(seed), temperature)

    def save(self, folder: str) -> None:
        """Writes folder/config.json, folder/model.safetensors (the params by '/'-joined path, in their dtype) and the
        tokenizer."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump({"_class_name": CLASS_NAME, **dataclasses.asdict(self.module.config)}, f, indent=2,
                      sort_keys=True)
        flat = traverse_util.flatten_dict(jax.device_get(self.params), sep="/")
        save_state_dict({k: np.asarray(v) for k, v in flat.items()}, os.path.join(folder, WEIGHTS_FILE))
        self.tokenizer.save(folder)

    @classmethod
    def from_pretrained(cls, folder: str) -> "LayoutModel":
        """Reads what `save` wrote (params in float32); a missing file, another class, or weights that do not fit the
        config are errors naming them."""
        path = os.path.join(folder, CONFIG_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder!r} has no {CONFIG_FILE}: not a layout model folder")
        with open(path) as f:
            fields = json.load(f)
        if fields.pop("_class_name", None) != CLASS_NAME:
            raise CheckpointError(f"{path!r} is not a {CLASS_NAME} config")
        module = LayoutTransformer(LayoutConfig(**fields))
        tokenizer = WordTokenizer.load(folder)
        want = traverse_util.flatten_dict(param_shapes(module), sep="/")
        state = load_state_dict(os.path.join(folder, WEIGHTS_FILE))
        missing, unused = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        if missing or unused:
            raise CheckpointError(f"{folder!r}: weights missing {missing[:3]} / unused {unused[:3]} for its config")
        bad = [k for k in want if tuple(state[k].shape) != tuple(want[k].shape)]
        if bad:
            raise CheckpointError(f"{folder!r}: tensor {bad[0]!r} has shape {tuple(state[bad[0]].shape)}, its config "
                                  f"needs {tuple(want[bad[0]].shape)}")
        params = traverse_util.unflatten_dict({k: np.asarray(state[k], np.float32) for k in want}, sep="/")
        return cls(module, jax.device_put(params), tokenizer)
