"""CLIP (Radford et al. 2021): contrastive image-caption training of both towers.

config.model: text (CLIPTextConfig fields; vocabulary, length and special ids come from the
data), vision (CLIPVisionConfig fields; image size from the data), projection_dim.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.models import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, clip_loss
from jaxdiff.training.evaluate import clip_zero_shot
from jaxdiff.training.task import Task, init_boxed


def text_config_for(fields: dict, spec) -> CLIPTextConfig:
    """A text tower config from `fields`, with vocabulary, length and special ids from the data's tokenizer."""
    fields = {k: v for k, v in fields.items() if k != "checkpoint"}
    return CLIPTextConfig(**{**fields, "vocab_size": spec.vocab_size, "max_position_embeddings": spec.max_length,
                             "pad_token_id": spec.pad_token_id, "bos_token_id": spec.bos_token_id,
                             "eos_token_id": spec.eos_token_id})


def model_for(c, spec) -> CLIPModel:
    m = c.model
    text = text_config_for(m.text.to_dict(), spec)
    vision = CLIPVisionConfig(**{**m.vision.to_dict(), "image_size": spec.image_size})
    return CLIPModel(CLIPConfig(text=text, vision=vision, projection_dim=m.projection_dim), dtype=jnp.dtype(c.dtype))


def build(c, spec) -> Task:
    model = model_for(c, spec)

    def init(key):
        return init_boxed(model, key, jnp.zeros((1, spec.max_length), jnp.int32),
                          jnp.zeros((1, spec.image_size, spec.image_size, 3)))

    def loss(params, frozen, batch, key, step):
        out = model.apply({"params": params}, batch["tokens"], batch["image"])
        # Captions repeat within a batch (small vocabularies): a match is any image with the same caption.
        same = jnp.all(batch["tokens"][:, None] == batch["tokens"][None], axis=-1)
        hit = same[jnp.arange(same.shape[0]), jnp.argmax(out.logits_per_text, axis=-1)]
        return clip_loss(out.logits_per_text), {"retrieval_accuracy": jnp.mean(hit)}

    evaluate = None
    if spec.source == "shapes":
        evaluate = lambda params, frozen: clip_zero_shot(model, params, spec.tokenize, spec.image_size,
                                                         c.get("eval_examples", 1000))
    return Task(init=init, loss=loss, evaluate=evaluate)
