"""Caption -> layout (LMD's layout stage, with a small transformer in place of the LLM): the objects of a shapes
caption, slot by slot, with colour, shape, size and centre bin (`jaxdiff.models.layout`).

  python -m train --config configs/layout.py --workdir runs/layout          # minutes on 2 CPU cores
  python -m train --config configs/layout.py:tiny --workdir /tmp/layout     # seconds

The data is the shapes train split's scenes (no images, nothing to prepare); the held-out evaluation at the end
scores layouts sampled for `eval.heldout_prompts` with `jaxdiff.data.layout.layout_report`.
"""
import ml_collections

from jaxdiff.training.config import base_config

VARIANTS = ("shapes", "tiny")


def get_config(variant: str = "shapes"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/layout.py; choose one of: {', '.join(VARIANTS)}")
    c = base_config()
    c.recipe = "layout"
    c.data = ml_collections.ConfigDict(dict(source="layouts", seed=0, max_length=16, max_objects=4))
    if variant == "tiny":
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
    return c
