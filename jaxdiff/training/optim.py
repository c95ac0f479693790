"""The optimizer: AdamW (Loshchilov & Hutter 2019) with linear warmup then cosine decay,
global-norm gradient clipping, and weight decay on matrices only."""
from __future__ import annotations

import jax
import optax


def lr_schedule(optim, total_steps: int) -> optax.Schedule:
    """lr(s) = peak * s / warmup for s < warmup, then
    end + (peak - end) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2, end = peak * min_lr_ratio."""
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1),
                                              optim.lr * optim.min_lr_ratio)


def decay_mask(params):
    """Decay kernels and embeddings (ndim >= 2), not biases, norm scales or scalars."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(lr_schedule). Gradient accumulation is done by the
    train step itself (see `steps.accumulate_grads`), so the optimizer always sees full batches."""
    return optax.chain(
        optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
        optax.adamw(lr_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay, mask=decay_mask))
