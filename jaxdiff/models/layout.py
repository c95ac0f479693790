"""A caption -> layout transformer: the layout stage of LLM-grounded diffusion (LMD, Lian et al. 2023), with a
small encoder-decoder trained on the shapes captions in place of the LLM.

The encoder reads the caption's token ids (bidirectional, padding masked out of attention). The decoder has one
slot per object, `max_objects` of them, in the caption's mention order; slot k reads the content of slot k - 1
(its colour, shape and place class; a learnt start vector for slot 0), attends causally to the slots before it and
to the caption, and predicts whether it holds an object (`present`), its colour, shape and place class
(`jaxdiff.data.layout.place_class`: size and centre bin; `PlaceHead` gives a distribution over all of them, so a
place can have any distribution, not a regressed mean).

    logits = model.apply({'params': p}, tokens, previous)           # teacher forcing: `layout_targets`
    layouts = sample_layouts(model, p, tokens, key)                  # slot by slot

With `num_frames` set it is a caption -> trajectory model for moving_shapes clips of that many frames: each slot
also predicts its object's direction and speed class (`jaxdiff.data.layout.speed_class`), and its place class is
that of its frame-0 box given them (`current`: the slot's own direction and speed, teacher-forced in training and
sampled first at sampling, since where a trip can start depends on where it goes).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import trace_cache
from jaxdiff.data import render
from jaxdiff.data.layout import (
    PLACE_BINS,
    PLACE_CLASSES,
    SPEED_BINS,
    as_objects,
    as_trajectories,
    frame_violations,
    moving_at,
    object_at,
    place_class,
    speed_class,
)
from jaxdiff.models.layers import (
    Attention,
    FeedForward,
    constrain_tokens,
    dense,
    layer_norm,
)

Dtype = Any
TRAJECTORY_REDRAWS = 8   # `sample_layouts`: draws of a trajectory layout whose paths meet, at most
SLOT_FIELDS = ("colour", "shape", "place")   # the content of a slot, in the order of `previous`'s last axis
MOTION_FIELDS = ("direction", "speed")        # and a trajectory model's after them, in the order of `current`'s


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Sizes of the caption encoder and the slot decoder; `vocab_size` and `pad_token_id` are the tokenizer's."""

    vocab_size: int
    max_length: int = 16
    hidden_size: int = 128
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    intermediate_size: int = 512
    max_objects: int = 4
    relative_maps: int = 8      # maps of the place head's relative bias (`PlaceHead`)
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-5
    num_frames: int = 0         # > 0: a caption -> trajectory model for clips of this many frames

    @property
    def slot_fields(self) -> tuple[str, ...]:
        """The content of a slot: SLOT_FIELDS, and MOTION_FIELDS for a trajectory model."""
        return SLOT_FIELDS + (MOTION_FIELDS if self.num_frames else ())

    def __post_init__(self):
        for field in ("vocab_size", "max_length", "hidden_size", "num_heads", "encoder_layers", "decoder_layers",
                      "intermediate_size", "max_objects", "relative_maps"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LayoutConfig.{field}={value!r}: need a positive int")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"LayoutConfig.hidden_size={self.hidden_size} does not split into "
                             f"num_heads={self.num_heads} heads; choose a divisor of it")
        if self.intermediate_size % self.hidden_size:
            raise ValueError(f"LayoutConfig.intermediate_size={self.intermediate_size}: need a multiple of "
                             f"hidden_size={self.hidden_size}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"LayoutConfig.pad_token_id={self.pad_token_id!r}: need an id in 0..{self.vocab_size - 1}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"LayoutConfig.layer_norm_eps={self.layer_norm_eps!r}: need a positive float")
        if not isinstance(self.num_frames, int) or isinstance(self.num_frames, bool) or self.num_frames < 0:
            raise ValueError(f"LayoutConfig.num_frames={self.num_frames!r}: need 0 (still layouts) or a positive int")


class LayoutLayer(nn.Module):
    """Pre-LN transformer layer: x + self-attention(LN x), [x + cross-attention(LN x, context)], x + MLP(LN x).

    x: [B, L, D]; mask: boolean broadcastable to [B, H, L, L] (True = attend); context: [B, S, D] with
    context_mask [B, 1, 1, S], or None (an encoder layer) -> [B, L, D].
    """

    config: LayoutConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, context=None, context_mask=None):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: layer_norm(c.layer_norm_eps, name=name, **kw)
        attention = lambda name: Attention(c.num_heads, c.hidden_size // c.num_heads, c.hidden_size, qkv_bias=True,
                                           name=name, **kw)
        x = x + attention("attn1")(norm("norm1")(x), mask=mask)
        if context is not None:
            x = x + attention("attn2")(norm("norm2")(x), context, mask=context_mask)
        h = FeedForward(c.hidden_size, c.intermediate_size // c.hidden_size, "gelu_tanh", name="ff", **kw)(
            norm("norm3")(x))
        return constrain_tokens(x + h)


def _embed(num: int, features: int, axes, name: str, **kw) -> nn.Embed:
    return nn.Embed(num, features, name=name, **kw,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))


class RelativePlaceBias(nn.Module):
    """T5's relative position bias on the grid of box centres, for the place head: at slot s, candidate (z, r, c),

        sum over objects j before s of  sum_m w_m(x_s) rows[m, z, z_j, r - r_j] * columns[m, z, z_j, c - c_j]

    `relative_maps` maps of the offset from object j (and both sizes), each the product of a row profile and a
    column profile (rank one, as a box is: 15% faster to train than a full [2R - 1, 2C - 1] table per map), mixed by
    weights w read off the slot state.

    x: [B, S, D] slot states; places: [B, S] int, the place classes of the slots' inputs (slot t's: object t - 1's);
    sizes: Z. Returns float32 [B, S, Z, R, C].
    """

    config: LayoutConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, places, sizes: int):
        maps, span = self.config.relative_maps, 2 * PLACE_BINS - 1
        profile = lambda name, init: self.param(name, nn.with_logical_partitioning(init, (None,) * 4),
                                                (maps, sizes, sizes, span), self.param_dtype)
        row_profile = profile("rows", nn.initializers.zeros_init())      # zero: the bias starts at zero
        column_profile = profile("columns", nn.initializers.ones_init())
        size, row, column = places // PLACE_BINS ** 2, places // PLACE_BINS % PLACE_BINS, places % PLACE_BINS
        offsets = lambda v: jnp.arange(PLACE_BINS) - v[..., None] + PLACE_BINS - 1                   # [B, T, bins]
        rows = row_profile[:, :, size[..., None], offsets(row)]                                     # [M, Z, B, T, R]
        columns = column_profile[:, :, size[..., None], offsets(column)]                            # [M, Z, B, T, C]
        weights = dense(maps, ("embed", None), name="weights", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        slots = jnp.arange(places.shape[1])
        earlier = (slots[None, :] <= slots[:, None]) & (slots[None, :] >= 1)     # [S, T]: slot t holds an object < s
        return jnp.einsum("bsm,st,mzbtr,mzbtc->bszrc", weights.astype(jnp.float32), earlier.astype(jnp.float32),
                          rows.astype(jnp.float32), columns.astype(jnp.float32))


class PlaceHead(nn.Module):
    """A slot's place class distribution over PLACE_CLASSES (size z, row r, column c of the box centre):

        log softmax( log p(z) + log p(r | z) + log p(c | z, r) + relative bias[z, r, c] )

    The first three terms are the chain rule over the class's parts, each a small softmax read off an MLP of the slot
    state and the parts before; the last (`RelativePlaceBias`) scores each candidate by its offsets from the objects
    before the slot. Both measured on the held-out prompts at temperature 1, batch 128:
    - a flat softmax over PLACE_CLASSES learns a class's weights only from the ~1 in 2048 examples that hit it: it
      stayed at the uniform place loss for 1000 steps (P(large | 'a large red circle') 0.57);
    - the chain rule alone learnt the caption's words but not "apart from box j", a constraint on both axes at once:
      at 2000 steps 15-20% of its layouts had overlapping boxes (counting 0.57 valid; 0.80 even at temperature 0.25);
      with the relative bias, under 2% (counting 0.96-1.0).

    x: [B, S, D] slot states; places: [B, S] int, the place classes of the slots' inputs (slot t's: object t - 1's);
    size_table [Z, D] and row_table [R, D]: the parts' embeddings. Returns float32 log-probabilities [B, S, Z*R*C].
    """

    config: LayoutConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, places, size_table, row_table):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        project = lambda name: dense(self.config.hidden_size, ("embed", "mlp"), name=name, **kw)
        out = lambda name: dense(PLACE_BINS, ("mlp", "vocab"), name=name, **kw)
        size = dense(len(size_table), ("embed", "vocab"), name="size", **kw)(x)
        row = out("row")(nn.gelu(project("row_in")(x)[:, :, None] + size_table))                    # [B, S, Z, R]
        cells = size_table[:, None] + row_table                                                     # [Z, R, D]
        column = out("column")(nn.gelu(project("column_in")(x)[:, :, None, None] + cells))         # [B, S, Z, R, C]
        log_p = lambda logits: jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        joint = log_p(size)[..., :, None, None] + log_p(row)[..., None] + log_p(column)
        joint = joint + RelativePlaceBias(self.config, name="relative_bias", **kw)(x, places, len(size_table))
        return jax.nn.log_softmax(joint.reshape(*x.shape[:2], PLACE_CLASSES), axis=-1)


class LayoutTransformer(nn.Module):
    """Caption tokens -> per-slot logits of an object layout (see the module docstring)."""

    config: LayoutConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def example_inputs(self) -> tuple[tuple, dict]:
        """The smallest (args, kwargs) this model accepts (one caption, every slot), for tracing its init."""
        c = self.config
        slots = lambda n: jnp.zeros((1, c.max_objects, n), jnp.int32)
        current = (slots(len(MOTION_FIELDS)),) if c.num_frames else ()
        return (jnp.zeros((1, c.max_length), jnp.int32), slots(len(c.slot_fields)), *current), {}

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = c.hidden_size
        self.token_embedding = _embed(c.vocab_size, d, ("vocab", "embed"), "token_embedding", **kw)
        self.position_embedding = _embed(c.max_length, d, (None, "embed"), "position_embedding", **kw)
        self.encoder = [LayoutLayer(c, name=f"encoder_{i}", **kw) for i in range(c.encoder_layers)]
        self.encoder_norm = layer_norm(c.layer_norm_eps, name="encoder_norm", **kw)
        self.slot_embedding = _embed(c.max_objects, d, (None, "embed"), "slot_embedding", **kw)
        self.start = self.param("start", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                                (d,), self.param_dtype)
        self.colour_embedding = _embed(len(render.COLOURS), d, (None, "embed"), "colour_embedding", **kw)
        self.shape_embedding = _embed(len(render.SHAPES), d, (None, "embed"), "shape_embedding", **kw)
        # A place class embeds as size + row + column, so neighbouring bins share what they have in common.
        self.size_embedding = _embed(PLACE_CLASSES // PLACE_BINS ** 2, d, (None, "embed"), "size_embedding", **kw)
        self.row_embedding = _embed(PLACE_BINS, d, (None, "embed"), "row_embedding", **kw)
        self.column_embedding = _embed(PLACE_BINS, d, (None, "embed"), "column_embedding", **kw)
        self.decoder = [LayoutLayer(c, name=f"decoder_{i}", **kw) for i in range(c.decoder_layers)]
        self.decoder_norm = layer_norm(c.layer_norm_eps, name="decoder_norm", **kw)
        heads = [("present", 1), ("colour", len(render.COLOURS)), ("shape", len(render.SHAPES))]
        if c.num_frames:
            self.direction_embedding = _embed(len(render.DIRECTIONS), d, (None, "embed"), "direction_embedding", **kw)
            self.speed_embedding = _embed(SPEED_BINS, d, (None, "embed"), "speed_embedding", **kw)
            heads += [("direction", len(render.DIRECTIONS)), ("speed", SPEED_BINS)]
        self.heads = {name: dense(n, ("embed", "vocab"), name=f"{name}_head", **kw) for name, n in heads}
        self.place_head = PlaceHead(c, **kw)

    def encode(self, tokens):
        """tokens [B, L] int -> (states [B, L, D], key mask [B, 1, 1, L]: True at real tokens)."""
        length = tokens.shape[-1]
        if length > self.config.max_length:
            raise ValueError(f"caption length {length} exceeds LayoutConfig.max_length={self.config.max_length}")
        mask = (tokens != self.config.pad_token_id)[:, None, None, :]
        x = constrain_tokens(self.token_embedding(tokens) + self.position_embedding(jnp.arange(length)))
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def motion(self, fields):
        """[B, S, 2] int (direction, speed class) -> [B, S, D]."""
        return self.direction_embedding(fields[..., 0]) + self.speed_embedding(fields[..., 1])

    def slot_inputs(self, previous):
        """previous [B, S, F] int (slot k - 1's `config.slot_fields`; row 0 ignored) -> [B, S, D]."""
        colour, shape, place = (previous[..., i] for i in range(len(SLOT_FIELDS)))
        size, row, column = place // PLACE_BINS ** 2, place // PLACE_BINS % PLACE_BINS, place % PLACE_BINS
        content = (self.colour_embedding(colour) + self.shape_embedding(shape) + self.size_embedding(size)
                   + self.row_embedding(row) + self.column_embedding(column))
        if self.config.num_frames:
            content = content + self.motion(previous[..., len(SLOT_FIELDS):])
        first = jnp.arange(previous.shape[1])[None, :, None] == 0
        content = jnp.where(first, self.start.astype(content.dtype), content)
        return content + self.slot_embedding(jnp.arange(previous.shape[1]))

    def __call__(self, tokens, previous, current=None):
        """tokens [B, L] int32; previous [B, S, F] int32 (F = len(config.slot_fields)), S <= max_objects; a
        trajectory model's current [B, S, 2] int32: each slot's own direction and speed class, which its place is
        conditioned on. Returns float32 logits {'present': [B, S], 'colour': [B, S, len(COLOURS)], 'shape': [B, S,
        len(SHAPES)], 'place': [B, S, PLACE_CLASSES]}, and a trajectory model's 'direction' [B, S, len(DIRECTIONS)]
        and 'speed' [B, S, SPEED_BINS] (which do not depend on `current`)."""
        c = self.config
        slots = previous.shape[1]
        if slots > c.max_objects:
            raise ValueError(f"{slots} slots exceed LayoutConfig.max_objects={c.max_objects}")
        if previous.shape[-1] != len(c.slot_fields):
            raise ValueError(f"previous has {previous.shape[-1]} fields per slot; this model reads "
                             f"{len(c.slot_fields)}: {', '.join(c.slot_fields)}")
        if (current is None) != (not c.num_frames):
            raise ValueError("a trajectory model (num_frames > 0) needs `current`, each slot's direction and speed "
                             "class; a still-layout model takes none")
        context, context_mask = self.encode(tokens)
        x = constrain_tokens(self.slot_inputs(previous))
        causal = jnp.tril(jnp.ones((slots, slots), bool))[None, None]
        for layer in self.decoder:
            x = layer(x, causal, context, context_mask)
        x = self.decoder_norm(x)
        logits = {name: head(x).astype(jnp.float32) for name, head in self.heads.items()}
        if c.num_frames:
            x = x + self.motion(current)
        place = self.place_head(x, previous[..., SLOT_FIELDS.index("place")],
                                self.size_embedding(jnp.arange(PLACE_CLASSES // PLACE_BINS ** 2)),
                                self.row_embedding(jnp.arange(PLACE_BINS)))
        return {**logits, "present": logits["present"][..., 0], "place": place}


def layout_targets(objects_list, max_objects: int, motion: bool = False) -> dict:
    """Teacher-forcing targets of N layouts (lists of SceneObjects, or scene records' `objects`, in mention order;
    with `motion`, trajectories as `as_trajectories` reads them): 'present' [N, S] (1 where slot k holds an object),
    'colour', 'shape', 'place' [N, S] (with motion also 'direction', 'speed'; 0 in empty slots), 'previous' [N, S,
    F] (slot k - 1's fields; 0 in row 0 and after an empty slot) and with motion 'current' [N, S, 2] (slot k's
    direction and speed); int32."""
    n, fields = len(objects_list), SLOT_FIELDS + (MOTION_FIELDS if motion else ())
    out = {name: np.zeros((n, max_objects), np.int32) for name in ("present", *fields)}
    for i, objects in enumerate(objects_list):
        objects = as_trajectories(objects) if motion else as_objects(objects)
        if len(objects) > max_objects:
            raise ValueError(f"layout {i} has {len(objects)} objects; max_objects={max_objects}")
        for k, obj in enumerate(objects):
            values = [1, render.COLOURS.index(obj.colour), render.SHAPES.index(obj.shape), place_class(obj.at(0)
                                                                                                 if motion else obj)]
            if motion:
                values += [render.DIRECTIONS.index(obj.direction), speed_class(obj.speed)]
            for name, value in zip(("present", *fields), values):
                out[name][i, k] = value
    previous = np.stack([out[name] for name in fields], axis=-1)
    out["previous"] = np.concatenate([np.zeros_like(previous[:, :1]), previous[:, :-1]], axis=1)
    if motion:
        out["current"] = previous[..., len(SLOT_FIELDS):]
    return out


@functools.lru_cache(maxsize=None)
def _slot_program(model: LayoutTransformer) -> trace_cache.StoredProgram:
    """`_slot_step` of `model`, jitted, and kept on disk by the model's fields (`jaxdiff.trace_cache`; not where a
    field has no stable fingerprint)."""
    identity = trace_cache.identity(__name__, "_slot_step", model)
    return trace_cache.StoredProgram(jax.jit(functools.partial(_slot_step, model)), identity)


def _slot_step(model, params, tokens, previous, slot, key, temperature):
    """Slot `slot`'s prediction given `previous`: {present probability, colour, shape, place} [B] each, and a
    trajectory model's direction (argmax) and speed class (sampled at `temperature`), which its place is drawn
    given."""
    apply = lambda current=None: jax.tree.map(lambda x: x[:, slot], model.apply(
        {"params": params}, tokens, previous, **({} if current is None else {"current": current})))
    key_place, key_speed = jax.random.split(key)
    if model.config.num_frames:
        logits = apply(jnp.zeros((*previous.shape[:2], len(MOTION_FIELDS)), jnp.int32))
        motion = {"direction": jnp.argmax(logits["direction"], -1),
                  "speed": jax.random.categorical(key_speed, logits["speed"] / temperature)}
        current = jnp.zeros((*previous.shape[:2], len(MOTION_FIELDS)), jnp.int32).at[:, slot].set(
            jnp.stack([motion["direction"], motion["speed"]], -1))
        logits = apply(current)
    else:
        logits, motion = apply(), {}
    return {"present": jax.nn.sigmoid(logits["present"]), "colour": jnp.argmax(logits["colour"], -1),
            "shape": jnp.argmax(logits["shape"], -1),
            "place": jax.random.categorical(key_place, logits["place"] / temperature), **motion}


def sample_layouts(model: LayoutTransformer, params, tokens, key, temperature: float = 1.0,
                   redraws: int = TRAJECTORY_REDRAWS):
    """Layouts of captions `tokens` [B, L], slot by slot: a slot whose present probability is below 0.5 ends its
    layout; colour and shape (and a trajectory's direction) are the argmax, the place class (and a trajectory's
    speed class, drawn first) is sampled from its softmax at `temperature` (slot k's from fold_in(key, k)). Returns
    B lists of SceneObjects (`jaxdiff.data.layout.object_at`), or of a trajectory model's MovingObjects
    (`moving_at`), in mention order.

    A trajectory model's layouts whose paths meet or leave the image in some frame (`frame_violations`) are drawn
    again, up to `redraws` times (attempt a from fold_in(key, max_objects + a)): its place head sees where the objects
    before a slot start, not where they go (measured on 400 held-out captions, temperature 1: 13% of the two-object
    layouts met in some frame; docs/video.md)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: need a positive float")
    if not isinstance(redraws, int) or redraws < 0:
        raise ValueError(f"redraws={redraws!r}: need a non-negative int")
    c = model.config
    tokens = jnp.asarray(tokens, jnp.int32)
    layouts = _draw(model, params, tokens, key, temperature)
    for attempt in range(redraws if c.num_frames else 0):
        frames = lambda objects: [[o.at(t) for o in objects] for t in range(c.num_frames)]
        bad = [i for i, objects in enumerate(layouts) if frame_violations(frames(objects))]
        if not bad:
            break
        again = _draw(model, params, tokens, jax.random.fold_in(key, c.max_objects + attempt), temperature)
        for i in bad:   # the whole batch is drawn again (one compiled shape), the broken rows replaced
            layouts[i] = again[i]
    return layouts


def _draw(model: LayoutTransformer, params, tokens, key, temperature: float) -> list[list]:
    c = model.config
    batch, slots = tokens.shape[0], c.max_objects
    previous = np.zeros((batch, slots, len(c.slot_fields)), np.int32)
    layouts, open_ = [[] for _ in range(batch)], np.ones(batch, bool)
    for k in range(slots):
        out = {name: np.asarray(v) for name, v in _slot_program(model)(params, tokens, jnp.asarray(previous), k,
                                                                        jax.random.fold_in(key, k), temperature).items()}
        open_ &= out["present"] >= 0.5
        for i in np.flatnonzero(open_):
            shape, colour = render.SHAPES[out["shape"][i]], render.COLOURS[out["colour"][i]]
            layouts[i].append(moving_at(int(out["place"][i]), int(out["speed"][i]),
                                        render.DIRECTIONS[out["direction"][i]], shape, colour, c.num_frames)
                              if c.num_frames else object_at(int(out["place"][i]), shape, colour))
        if k + 1 < slots:
            previous[:, k + 1] = np.stack([out[name] for name in c.slot_fields], axis=-1)
    return layouts
