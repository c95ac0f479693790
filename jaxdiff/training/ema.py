"""Exponential moving average of parameters (Polyak averaging), the weights diffusion models ship."""
from __future__ import annotations

import jax


def ema_update(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf.

    After n updates with fixed params p: ema_n = p + decay^n (ema_0 - p).
    """
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)
