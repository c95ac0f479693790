"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper that makes a plain `model_fn(x, t)`.

Guidance scale and rescale are traced values: change them between calls without recompiling.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff.samplers.driver import check_model_output, check_number


def rescale_guidance(guided, cond, rescale):
    """Guidance rescale (Lin et al. 2024, eq. 15-16): match the std of the conditional output.

    std is taken per example over all non-batch axes; rescale = 0 leaves `guided` unchanged.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1.0 - rescale) * guided


def cfg(apply_fn: Callable, context, uncond_context, scale, rescale=0.0) -> Callable:
    """model_fn(x, t) = u + scale (c - u), u/c the outputs under the negative/unconditional and the
    conditional context, computed in one batched call of 2B.

    Args:
      apply_fn: (x [2B, ...], t [2B], context [2B, ...]) -> output.
      context: [B, ...] conditioning (e.g. CLIP hidden states of the prompt), or a tuple of such arrays
        (an MMDiT's text tokens and pooled embedding).
      uncond_context: the negative prompt's (or the empty prompt's) conditioning, of the same structure.
      scale: guidance scale w (1 = plain conditional; diffusers' guidance_scale).
      rescale: guidance rescale phi in [0, 1].
    """
    check_number("guidance scale", scale)
    check_number("guidance rescale", rescale, 0.0, 1.0)
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond_context, context)

    def model_fn(x, t):
        x2 = jnp.concatenate([x, x], axis=0)
        out = apply_fn(x2, jnp.concatenate([t, t], axis=0), both)
        check_model_output(out, x2, "apply_fn (on the unconditional and conditional halves)")
        uncond, cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
        guided = uncond + scale * (cond - uncond)
        return rescale_guidance(guided, cond, rescale)

    return model_fn
