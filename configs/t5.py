"""A T5 encoder pretrained on the shapes captions by masked-word prediction (jaxdiff.training.recipes.t5), to be
read frozen by a diffusion run (`configs/mmdit.py:t5_frozen`), as SD3, Flux and Wan read a pretrained T5.

  python -m train --config configs/t5.py --workdir runs/t5_shapes     # minutes
  python -m train --config configs/t5.py:tiny --workdir /tmp/t5       # seconds, synthetic captions
"""
import ml_collections

from configs import common
from jaxdiff.training.config import base_config

VARIANTS = ("shapes", "tiny")
# the encoder of configs/mmdit.py:t5 (4 layers, 128 wide, gated GELU)
SHAPES_T5 = dict(d_model=128, d_kv=32, num_heads=4, d_ff=512, num_layers=4, feed_forward_proj="gated-gelu")


def get_config(variant: str = "shapes"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/t5.py; choose one of: {', '.join(VARIANTS)}")
    c = base_config()
    c.recipe = "t5"
    if variant == "tiny":
        common.tiny_run(c)
        c.model = ml_collections.ConfigDict(dict(
            t5=dict(d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2, feed_forward_proj="gated-gelu"),
            mask_rate=0.15))
        return c
    c.data = common.shapes_data()
    c.steps, c.batch_size = 3000, 256
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-3, 200, 0.01
    c.checkpoint_every, c.log_every, c.ema_decay = 500, 50, 0.99
    c.model = ml_collections.ConfigDict(dict(t5=SHAPES_T5, mask_rate=0.15))
    return c
