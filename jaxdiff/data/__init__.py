"""Built-in datasets, the grain data pipeline and the ShapesEval prompt-adherence evaluator.

Importing this package registers the tfds builders `shapes` and `moving_shapes`.
"""
from jaxdiff.data import render
from jaxdiff.data.moving_shapes import MovingShapes, MovingShapesConfig, moving_shapes_config
from jaxdiff.data.render import caption_vocabulary
from jaxdiff.data.shapes import Shapes, ShapesConfig, shapes_config
