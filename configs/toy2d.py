"""The 2-D toy through the real trainer: an MLP denoiser on a 2-D point cloud (`jaxdiff.toy2d`).

  python -m train --config configs/toy2d.py --workdir /tmp/toy2d     # ~1 min; samples/ holds histograms
"""
import ml_collections

from jaxdiff.training.config import base_config


def get_config(variant: str = "gaussians8"):
    c = base_config()
    c.recipe = "toy2d"
    c.data = ml_collections.ConfigDict(dict(source="toy2d", dataset=variant))
    c.steps, c.batch_size, c.ema_decay = 3000, 512, 0.99
    c.optim = ml_collections.ConfigDict(dict(lr=2e-3, warmup_steps=200, min_lr_ratio=0.05, b1=0.9, b2=0.999, eps=1e-8,
                                             weight_decay=0.0, clip_norm=1.0))
    c.checkpoint_every, c.log_every, c.sample_every = 1000, 100, 1000
    c.model = ml_collections.ConfigDict(dict(hidden=128, schedule="linear", num_train_timesteps=1000,
                                             prediction_type="epsilon", weighting="simple", sample_steps=100))
    return c
