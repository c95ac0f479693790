"""A T5 encoder pretrained on captions by masked-word prediction (BERT's objective, Devlin et al. 2019, on T5's
encoder; T5 itself uses span corruption with a decoder): a share `mask_rate` of each caption's words is replaced
by the unknown-word token (padding where the data has none) and predicted from the encoder's final states through the tied input embedding
(scaled by d_model^-0.5, as T5's LM head). To name a masked word the states must say where it stands, so the
encoder keeps word order, which an encoder trained jointly with a diffusion model can lose (docs/shapes-mmdit.md).
SD3, Flux and Wan read a frozen pretrained T5; `config.model.t5.checkpoint` of a diffusion run names such a run.

config.model: t5 (T5Config fields; vocabulary and special ids come from the data), mask_rate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.models.t5 import T5EncoderModel
from jaxdiff.training.task import Task, init_boxed


def masked_inputs(tokens, key, rate: float, spec):
    """(tokens with a `rate` share of the caption words, never BOS / EOS / padding, replaced by the unknown-word
    id (the padding id if the data has none), bool [B, L] where they were). At least one word per caption is
    masked."""
    words = (tokens != spec.pad_token_id) & (tokens != spec.bos_token_id) & (tokens != spec.eos_token_id)
    u = jax.random.uniform(key, tokens.shape)
    u = jnp.where(words, u, 2.0)                                  # never chosen
    first = u == u.min(axis=-1, keepdims=True)                    # each caption's smallest draw: always masked
    where = words & ((u < rate) | first)
    mask_id = spec.unk_token_id if spec.unk_token_id >= 0 else spec.pad_token_id
    return jnp.where(where, mask_id, tokens), where


def word_logits(model, params, tokens):
    """[B, L, vocab]: the final states against the tied embedding table, scaled by d_model^-0.5 (T5's LM head)."""
    states = model.apply({"params": params}, tokens)
    table = params["shared"]["embedding"]
    return (states * model.config.d_model ** -0.5) @ table.T.astype(states.dtype)


def build(c, spec) -> Task:
    from jaxdiff.training.recipes.diffusion.latents import t5_config_for

    if spec.tokenize is None:
        raise ValueError(f"the t5 recipe reads captions: config.data.source={spec.source!r} has none; use 'shapes'")
    rate = float(c.model.mask_rate)
    if not 0.0 < rate < 1.0:
        raise ValueError(f"config.model.mask_rate={c.model.mask_rate!r}: must lie in (0, 1)")
    model = T5EncoderModel(t5_config_for(c.model.t5.to_dict(), spec), dtype=jnp.dtype(c.dtype))

    def init(key):
        return init_boxed(model, key, jnp.zeros((1, spec.max_length), jnp.int32))

    def loss(params, frozen, batch, key, step):
        tokens = batch["tokens"]
        inputs, where = masked_inputs(tokens, key, rate, spec)
        logp = jax.nn.log_softmax(word_logits(model, params, inputs).astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
        n = jnp.maximum(where.sum(), 1)
        hit = (logp.argmax(-1) == tokens) & where
        return jnp.sum(nll * where) / n, {"masked_accuracy": hit.sum() / n}

    return Task(init=init, loss=loss)
