"""Which pixels each caption word describes: the targets of a cross-attention grounding loss
(TokenCompose, Wang et al. 2024), read off a shapes scene's objects.

In every caption grammar of `jaxdiff.data.render` an object's words form one phrase, in object order,
and a phrase starts at "a": "a red circle above a blue square" is the subject's phrase ("a red circle
above") then the object's. A caption without "a" ("three green circles") describes all its objects at
once. Function words describe no object. A word's mask is the union of its objects' pixels; the mask of
a token is that of its word (token i + 1 is word i, as `jaxdiff.tokenizers.WordTokenizer` numbers them
after BOS), and BOS, EOS and padding have empty masks.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxdiff.data import render
from jaxdiff.data.shapes import scene_objects
from jaxdiff.tokenizers import WORD_PATTERN

FUNCTION_WORDS = frozenset({"a", "the", "on", "at", "to", "of", "and"})


def word_objects(caption: str, num_objects: int) -> list[tuple[int, ...]]:
    """For each word of `caption`, the indices of the objects it describes (() for function words)."""
    words = WORD_PATTERN.findall(caption.lower())
    if "a" not in words:
        return [() if w in FUNCTION_WORDS else tuple(range(num_objects)) for w in words]
    phrases = words.count("a")
    if phrases != num_objects or words[0] != "a":
        raise ValueError(f"caption {caption!r} has {phrases} phrases starting with 'a' (first word {words[0]!r}) for "
                         f"{num_objects} objects; grounding needs one phrase per object, the first at the start")
    out, k = [], -1
    for w in words:
        k += w == "a"
        out.append(() if w in FUNCTION_WORDS else (k,))
    return out


def token_masks(objects, caption: str, resolution: int, max_length: int) -> np.ndarray:
    """float32 [max_length, R, R]: 1 on the pixels of the objects each token's word describes."""
    masks = np.zeros((max_length, resolution, resolution), np.float32)
    shapes = [render.shape_mask(o, resolution) for o in objects]
    for i, owners in enumerate(word_objects(caption, len(objects))[:max_length - 2]):
        for k in owners:
            masks[i + 1] = np.maximum(masks[i + 1], shapes[k])
    return masks


@dataclasses.dataclass(frozen=True)
class TokenMasks:
    """A `shapes` record -> {'token_masks': float32 [max_length, R, R]} (a data pipeline extra; picklable)."""

    resolution: int
    max_length: int

    def __call__(self, record: dict) -> dict:
        caption = record["caption"]
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        return {"token_masks": token_masks(scene_objects(record["objects"]), caption, self.resolution,
                                           self.max_length)}
