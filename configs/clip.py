"""CLIP: contrastive training of a text and an image tower on captioned images.

  python -m train --config configs/clip.py --workdir runs/clip_shapes    # the shapes CLIP
  python -m train --config configs/clip.py:tiny --workdir /tmp/clip      # seconds, synthetic squares

`--config.model.hard_negatives=True` adds NegCLIP's hard negatives (each caption with its spatial and
count words swapped) to the image->text logits; `--config.model.init_from=RUN` fine-tunes a CLIP run.
"""
import ml_collections

from configs import common
from jaxdiff.training.config import base_config


def get_config(variant: str = "shapes"):
    c = base_config()
    c.recipe = "clip"
    if variant == "tiny":
        common.tiny_run(c)
        c.model = ml_collections.ConfigDict(dict(
            text=common.tiny_text_encoder(), projection_dim=16, hard_negatives=False, init_from="",
            vision=dict(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1,
                        num_attention_heads=2, patch_size=8)))
        return c
    if variant != "shapes":
        raise ValueError(f"unknown variant {variant!r} of configs/clip.py; choose one of: shapes, tiny")
    c.data = common.shapes_data()
    c.steps, c.batch_size = 5000, 128
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 5e-4, 200, 0.1
    c.checkpoint_every, c.log_every = 500, 50
    c.model = ml_collections.ConfigDict(dict(
        text=dict(hidden_size=128, intermediate_size=512, projection_dim=128, num_hidden_layers=2,
                  num_attention_heads=4),
        vision=dict(hidden_size=128, intermediate_size=512, projection_dim=128, num_hidden_layers=3,
                    num_attention_heads=4, patch_size=4),
        projection_dim=128, hard_negatives=False, init_from=""))
    return c
