"""Caption -> layout (LMD's layout stage, with a small transformer in place of the LLM): the objects of a shapes
caption, slot by slot, with colour, shape, size and centre bin (`jaxdiff.models.layout`).

  python -m train --config configs/layout.py --workdir runs/layout          # minutes on 2 CPU cores
  python -m train --config configs/layout.py:motion --workdir runs/layout_motion   # caption -> trajectories
  python -m train --config configs/layout.py:tiny --workdir /tmp/layout     # seconds

The data is the shapes train split's scenes (no images, nothing to prepare); the held-out evaluation at the end
scores layouts sampled for `eval.heldout_prompts` with `jaxdiff.data.layout.layout_report`.
"""
import ml_collections

from jaxdiff.training.config import base_config

VARIANTS = ("shapes", "motion", "tiny", "tiny_motion")
MOTION_FRAMES = 8   # `motion`: caption -> trajectories of moving_shapes/32px-8f clips (configs/wan.py:layout's data)


def get_config(variant: str = "shapes"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/layout.py; choose one of: {', '.join(VARIANTS)}")
    c = base_config()
    c.recipe = "layout"
    frames = MOTION_FRAMES if variant.endswith("motion") else 0
    c.data = ml_collections.ConfigDict(dict(source="layouts", seed=0, max_length=16, max_objects=4, num_frames=frames))
    if variant.startswith("tiny"):
        c.model = ml_collections.ConfigDict(dict(hidden_size=16, num_heads=2, encoder_layers=1, decoder_layers=1,
                                                 intermediate_size=32))
        c.steps, c.batch_size, c.log_every, c.checkpoint_every, c.eval_examples = 20, 16, 5, 10, 8
        c.optim.lr, c.optim.warmup_steps = 3e-3, 5
        return c
    c.model = ml_collections.ConfigDict(dict(hidden_size=128, num_heads=4, encoder_layers=2, decoder_layers=2,
                                             intermediate_size=512))
    c.steps, c.batch_size, c.eval_examples = 3000, 128, 400
    c.optim.lr, c.optim.warmup_steps, c.ema_decay = 2e-3, 200, 0.995
    c.checkpoint_every, c.log_every = 1000, 50
    if variant == "motion":   # one or two objects, nothing stacked: fewer steps (the held-out eval: 100 captions)
        c.steps, c.checkpoint_every, c.eval_examples = 2000, 500, 100
    return c
