"""Training batches: any iterator of numpy batch dicts that can report and restore its position.

The loop needs `next(it) -> {name: np.ndarray [B_local, ...]}` (this process's rows) plus
`get_state() -> json-able dict` / `set_state(dict)` to checkpoint the position; grain's
dataset iterators have exactly that interface. The built-in sources here are deterministic
in (seed, batch index), so a resumed or re-sharded run sees the same examples.

Images are float32 in [-1, 1], [B, H, W, 3]; captions are int32 token ids [B, L].
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxdiff import parallel
from jaxdiff.training.config import choice

SOURCES = ("squares", "toy2d", "shapes", "layouts")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a recipe needs to know about its data to build its model."""
    source: str = ""                # config.data.source
    image_size: int = 0
    max_length: int = 0             # caption length L
    vocab_size: int = 0
    pad_token_id: int = 0
    bos_token_id: int = 0
    eos_token_id: int = 0
    unk_token_id: int = -1          # -1: no unknown-word id
    empty_tokens: tuple = ()        # the empty caption's ids (caption dropout, CFG's unconditional)
    tokenize: Callable | None = None  # list of str -> int32 [N, L], for sample prompts
    preview_prompts: tuple = ()
    layout_channels: int = 0        # channels of batch["layout"] (config.data.layout), 0 without


class IndexedBatches:
    """Global batch i = make(np.random.default_rng([seed, i]), batch_size); this process gets its rows."""

    def __init__(self, make: Callable[[np.random.Generator, int], dict], batch_size: int, seed: int):
        self.make, self.batch_size, self.seed, self.index = make, batch_size, seed, 0
        self.rows = parallel.process_rows(batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.make(np.random.default_rng([self.seed, self.index]), self.batch_size)
        self.index += 1
        return {k: v[self.rows] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


# ---------------------------------------------------------------- 'squares': a tiny synthetic text-to-image set

SQUARE_COLOURS = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], np.float32)
# WordTokenizer's ids (EOS is not 2: CLIP configs with eos_token_id == 2 pool by a legacy rule).
_PAD, _BOS, _EOS, _FIRST_WORD = 0, 2, 3, 4


def squares(rng: np.random.Generator, n: int, image_size: int = 16, max_length: int = 4) -> dict:
    """A square of one of 4 colours, in the left or right half, on a grey background.
    Caption: [BOS, colour word, side word, EOS]."""
    colour = rng.integers(0, len(SQUARE_COLOURS), n)
    right = rng.integers(0, 2, n)
    side = image_size // 2
    image = np.zeros((n, image_size, image_size, 3), np.float32)
    top = rng.integers(0, image_size - side + 1, n)
    for i in range(n):
        x0 = right[i] * (image_size - side)
        image[i, top[i]:top[i] + side, x0:x0 + side] = SQUARE_COLOURS[colour[i]]
    tokens = np.full((n, max_length), _PAD, np.int32)
    tokens[:, 0], tokens[:, 1], tokens[:, 2], tokens[:, 3] = _BOS, _FIRST_WORD + colour, _FIRST_WORD + 4 + right, _EOS
    return {"image": image, "tokens": tokens}


def squares_spec(image_size: int) -> DataSpec:
    empty = (_BOS, _EOS, _PAD, _PAD)
    return DataSpec(source="squares", image_size=image_size, max_length=4, vocab_size=_FIRST_WORD + 6, pad_token_id=_PAD,
                    bos_token_id=_BOS, eos_token_id=_EOS, empty_tokens=empty,
                    preview_prompts=tuple(f"{c} {s}" for c in range(4) for s in range(2)),
                    tokenize=lambda prompts: np.stack([[_BOS, _FIRST_WORD + int(p.split()[0]),
                                                        _FIRST_WORD + 4 + int(p.split()[1]), _EOS]
                                                       for p in prompts]).astype(np.int32))


# ---------------------------------------------------------------- entry point

def make_batches(data, batch_size: int, seed: int):
    """(iterator of this process's batches, DataSpec) for `config.data`."""
    spec = data_spec(data)
    if spec.source == "squares":
        return IndexedBatches(lambda rng, n: squares(rng, n, spec.image_size), batch_size, seed), spec
    if spec.source == "toy2d":
        from jaxdiff.toy2d import make_dataset

        name = data.get("dataset", "gaussians8")
        make = lambda rng, n: {"x": make_dataset(name, n, seed=int(rng.integers(2**31)))}
        return IndexedBatches(make, batch_size, seed), spec
    if spec.source == "layouts":
        from jaxdiff.training.recipes.layout import layout_batches

        return layout_batches(data, batch_size, seed), spec
    return shapes_batches(data, batch_size, seed), spec


def data_spec(data) -> DataSpec:
    """The DataSpec of `config.data` without opening the data (for building a trained model)."""
    source = choice(data.get("source", ""), SOURCES, "data.source")
    if data.get("layout", False) and source != "shapes":
        raise ValueError(f"config.data.layout reads the scene records' objects: data.source={source!r} has none; use "
                         f"'shapes'")
    if source == "squares":
        return squares_spec(data.get("image_size", 16))
    if source == "toy2d":
        return DataSpec(source="toy2d")
    from jaxdiff.data.layout import LAYOUT_CHANNELS

    tokenizer = shapes_tokenizer(data)
    empty = tokenizer([""])[0]
    return DataSpec(source=source, image_size=data.get("image_size", 0), max_length=tokenizer.max_length,
                    vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    unk_token_id=tokenizer.unk_token_id, empty_tokens=tuple(int(i) for i in empty),
                    tokenize=lambda prompts: np.asarray(tokenizer(list(prompts)), np.int32),
                    preview_prompts=tuple(data.get("preview_prompts", ())),
                    layout_channels=LAYOUT_CHANNELS if data.get("layout", False) else 0)


def shapes_tokenizer(data):
    """The WordTokenizer over the caption grammar's vocabulary that captioned data is tokenised with."""
    from jaxdiff.data import caption_vocabulary
    from jaxdiff.tokenizers import WordTokenizer

    return WordTokenizer(caption_vocabulary(), max_length=data.get("max_length", 16))


class CaptionedBatches:
    """A grain iterator of jaxdiff.data batches without the host-only caption strings."""

    def __init__(self, iterator):
        self.iterator = iterator

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {k: v for k, v in next(self.iterator).items() if k != "caption"}

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


def shapes_batches(data, batch_size: int, seed: int) -> CaptionedBatches:
    """A `jaxdiff.data` tfds dataset (the built-in `shapes` by default; prepare it first with
    `python -m jaxdiff.data.prepare shapes --data_dir DIR`) through its grain pipeline, captions
    tokenised by `shapes_tokenizer`."""
    from jaxdiff.data import DataConfig, make_dataset

    cfg = DataConfig(name=data.get("name", "shapes"), data_dir=data.get("data_dir") or None,
                     resolution=data.image_size, batch_size=batch_size, seed=seed,
                     worker_count=data.get("worker_count", 0), layout=bool(data.get("layout", False)))
    return CaptionedBatches(iter(make_dataset(cfg, shapes_tokenizer(data))))
