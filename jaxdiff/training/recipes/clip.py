"""CLIP (Radford et al. 2021): contrastive image-caption training of both towers.

config.model: text (CLIPTextConfig fields; vocabulary, length and special ids come from the
data), vision (CLIPVisionConfig fields; image size from the data), projection_dim.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, clip_loss
from jaxdiff.training.checkpoint import load_params
from jaxdiff.training.evaluate import clip_zero_shot
from jaxdiff.training.task import Task, init_boxed, rebox

# word -> the word a hard negative puts in its place (covers "on the left", "to the left of", "at the top",
# "above", and the counts)
OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below",
             "below": "above", "two": "three", "three": "four", "four": "two"}


def text_config_for(fields: dict, spec) -> CLIPTextConfig:
    """A text tower config from `fields`, with vocabulary, length and special ids from the data's tokenizer."""
    fields = {k: v for k, v in fields.items() if k != "checkpoint"}   # a run setting
    return CLIPTextConfig(**{**fields, "vocab_size": spec.vocab_size, "max_position_embeddings": spec.max_length,
                             "pad_token_id": spec.pad_token_id, "bos_token_id": spec.bos_token_id,
                             "eos_token_id": spec.eos_token_id})


def model_for(c, spec) -> CLIPModel:
    m = c.model
    text = text_config_for(m.text.to_dict(), spec)
    vision = CLIPVisionConfig(**{**m.vision.to_dict(), "image_size": spec.image_size})
    return CLIPModel(CLIPConfig(text=text, vision=vision, projection_dim=m.projection_dim), dtype=jnp.dtype(c.dtype))


def opposite_ids(spec) -> np.ndarray:
    """int32 [vocab]: each token id mapped to that of its `OPPOSITES` word (others to themselves)."""
    if spec.source != "shapes":
        raise ValueError(f"config.model.hard_negatives swaps words of the shapes caption grammar; "
                         f"config.data.source={spec.source!r} has other captions: use 'shapes' or hard_negatives=False")
    table = np.arange(spec.vocab_size, dtype=np.int32)
    word_id = lambda w: int(spec.tokenize([w])[0][1])
    for word, other in OPPOSITES.items():
        table[word_id(word)] = word_id(other)
    return table


def hard_negative_logits(model, params, tokens, image_embeds, opposites):
    """[B, B]: image i against caption j with its spatial / count words swapped; -inf where the swap
    changes nothing or gives image i's own caption."""
    negatives = jnp.asarray(opposites)[tokens]
    text = model.apply({"params": params}, negatives, method=model.encode_text)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    logits = image_embeds @ text.T * jnp.exp(params["logit_scale"].astype(jnp.float32))
    changed = jnp.any(negatives != tokens, axis=-1)                                  # [B] per caption j
    own = jnp.all(tokens[:, None] == negatives[None], axis=-1)                      # [i, j]
    return jnp.where(changed[None] & ~own, logits, -jnp.inf)


def build(c, spec) -> Task:
    model = model_for(c, spec)
    m = c.model
    opposites = opposite_ids(spec) if m.get("hard_negatives", False) else None

    def fresh(key):
        return init_boxed(model, key, jnp.zeros((1, spec.max_length), jnp.int32),
                          jnp.zeros((1, spec.image_size, spec.image_size, 3)))

    start = load_params(m.init_from, "ema") if m.get("init_from") else None   # host arrays (init is traced)
    if start is not None:
        want = jax.eval_shape(lambda k: nn.meta.unbox(fresh(k)), jax.random.key(0))
        same = jax.tree.structure(start) == jax.tree.structure(want) and all(
            a.shape == b.shape for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(want)))
        if not same:
            raise ValueError(f"config.model.init_from={m.init_from!r}: that run's CLIP differs from config.model's "
                             f"towers; fine-tuning keeps the architecture")

    def init(key):
        return fresh(key) if start is None else rebox(start, jax.eval_shape(fresh, key))

    def loss(params, frozen, batch, key, step):
        out = model.apply({"params": params}, batch["tokens"], batch["image"])
        # Captions repeat within a batch (small vocabularies): a match is any image with the same caption.
        same = jnp.all(batch["tokens"][:, None] == batch["tokens"][None], axis=-1)
        hit = same[jnp.arange(same.shape[0]), jnp.argmax(out.logits_per_text, axis=-1)]
        negatives = None if opposites is None else \
            hard_negative_logits(model, params, batch["tokens"], out.image_embeds, opposites)
        return clip_loss(out.logits_per_text, negatives), {"retrieval_accuracy": jnp.mean(hit)}

    evaluate = None
    if spec.source == "shapes":
        evaluate = lambda params, frozen: clip_zero_shot(model, params, spec.tokenize, spec.image_size,
                                                         c.get("eval_examples", 1000))
    return Task(init=init, loss=loss, evaluate=evaluate)
