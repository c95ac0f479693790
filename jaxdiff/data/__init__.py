"""Built-in datasets, the grain data pipeline and the ShapesEval prompt-adherence evaluator.

Importing this package registers the tfds builders `shapes` and `moving_shapes`.

    python -m jaxdiff.data.prepare shapes --data_dir DIR      # generate (no download)
    DataConfig(name="shapes", data_dir=DIR) -> make_iterator -> global_batches
    python -m jaxdiff.pipelines.shapes_eval --images FOLDER   # prompt adherence (jaxdiff.data.eval)
"""
from jaxdiff.data import render
from jaxdiff.data.eval import evaluate, evaluate_model, heldout_prompts, parse_prompt, score, score_video
from jaxdiff.data.moving_shapes import MovingShapes, MovingShapesConfig, moving_shapes_config
from jaxdiff.data.pipeline import DataConfig, global_batch, global_batches, make_dataset, make_iterator
from jaxdiff.data.render import caption_vocabulary
from jaxdiff.data.shapes import Shapes, ShapesConfig, shapes_config
