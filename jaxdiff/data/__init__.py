"""Built-in datasets, the grain data pipeline and the ShapesEval prompt-adherence evaluator.

Importing `jaxdiff.data.pipeline` (or `.prepare`, `.shapes`, `.moving_shapes`) registers the tfds builders `shapes`
and `moving_shapes`.

    python -m jaxdiff.data.prepare shapes --data_dir DIR      # generate (no download)
    DataConfig(name="shapes", data_dir=DIR) -> make_iterator -> global_batches
    python -m jaxdiff.pipelines.shapes_eval --images FOLDER   # prompt adherence (jaxdiff.data.eval)
"""
import importlib

from jaxdiff.data import render
from jaxdiff.data.render import caption_vocabulary

# The evaluator, the grain pipeline and the tfds builders load on first use: sampling reads the renderer's vocabulary
# (a layout model's objects) and never needs them, and importing them costs ~0.5 s of a fresh process's first image.
_LAZY = {**dict.fromkeys(("evaluate", "evaluate_model", "heldout_prompts", "parse_prompt", "score", "score_video"),
                         "jaxdiff.data.eval"),
         **dict.fromkeys(("DataConfig", "global_batch", "global_batches", "make_dataset", "make_iterator"),
                         "jaxdiff.data.pipeline"),
         **dict.fromkeys(("MovingShapes", "MovingShapesConfig", "moving_shapes_config"), "jaxdiff.data.moving_shapes"),
         **dict.fromkeys(("Shapes", "ShapesConfig", "shapes_config"), "jaxdiff.data.shapes")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxdiff.data' has no attribute {name!r}")
