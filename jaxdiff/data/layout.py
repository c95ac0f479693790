"""Layouts: where each object of a scene goes, as a model reads and writes it.

A layout is a list of `render.SceneObject`s (shape, colour, size, box centre) -- the scene records' `objects` --
in the order the caption mentions them. Two views of it:

- `layout_map(objects, height, width)`: float32 [H, W, LAYOUT_CHANNELS], the denoiser's conditioning (a
  layout-to-image model reads it, `downsampled` to its latent grid, as extra input channels, as depth-to-image and
  inpainting models read theirs): channel `COLOURS.index(colour)` and channel `len(COLOURS) + SHAPES.index(shape)`
  are 1 on the pixels whose centre lies in the object's bounding box, 0 elsewhere.
- `place_class(obj)` / `object_at(place, shape, colour)`: a box as one class of PLACE_CLASSES = 2 sizes x
  PLACE_BINS rows x PLACE_BINS columns of its centre (a caption-to-layout model predicts it with a softmax, so a
  position spread such as "to the left of" can be any distribution, not a regressed mean).
"""
from __future__ import annotations

import numpy as np

from jaxdiff.data import render

LAYOUT_CHANNELS = len(render.COLOURS) + len(render.SHAPES)
SIZE_NAMES = tuple(render.SIZES)   # ("small", "large"): the size index of a scene record
PLACE_BINS = 32   # centre bins per axis (1 px at 32 px)
PLACE_CLASSES = len(SIZE_NAMES) * PLACE_BINS * PLACE_BINS
OBJECT_FIELDS = ("shape", "colour", "size", "x", "y")   # an object given by name (`as_objects`)


def as_objects(objects) -> list[render.SceneObject]:
    """A scene record's `objects` (parallel arrays of 'shape', 'colour', 'size' label indices and 'x', 'y' centres,
    as `tfds.data_source('shapes')` gives them), or a list of SceneObjects or of dicts with those fields by name
    ({'shape': 'circle', 'colour': 'red', 'size': 'small', 'x': 0.3, 'y': 0.5}) -> a list of SceneObjects, each
    checked (`check_object`)."""
    if isinstance(objects, dict):
        fields = [np.asarray(objects[k]).reshape(-1) for k in OBJECT_FIELDS]
        return [render.SceneObject(render.SHAPES[int(s)], render.COLOURS[int(c)], SIZE_NAMES[int(z)], float(x),
                                   float(y)) for s, c, z, x, y in zip(*fields)]
    return [check_object(o if isinstance(o, render.SceneObject) else _from_fields(o)) for o in objects]


def _from_fields(obj) -> render.SceneObject:
    if not isinstance(obj, dict) or set(obj) != set(OBJECT_FIELDS):
        raise ValueError(f"layout object {obj!r}: need a SceneObject or a dict with exactly the fields "
                         f"{', '.join(OBJECT_FIELDS)}")
    return render.SceneObject(**obj)


def check_object(obj: render.SceneObject) -> render.SceneObject:
    """`obj` if its shape, colour and size are the renderer's and its centre a finite fraction in [0, 1]."""
    for field, allowed in (("shape", render.SHAPES), ("colour", render.COLOURS), ("size", SIZE_NAMES)):
        if getattr(obj, field) not in allowed:
            raise ValueError(f"layout object {field} {getattr(obj, field)!r}: choose one of: {', '.join(allowed)}")
    for field in ("x", "y"):
        v = getattr(obj, field)
        if not (isinstance(v, (int, float, np.floating)) and np.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"layout object {field}={v!r}: need the box centre as a fraction of the image in [0, 1]")
    return obj


def layout_map(objects, height: int, width: int | None = None) -> np.ndarray:
    """float32 [H, W, LAYOUT_CHANNELS] (W = H unless given): each object's box painted into its colour's and its
    shape's channel."""
    width = height if width is None else width
    out = np.zeros((height, width, LAYOUT_CHANNELS), np.float32)
    rows, cols = ((np.arange(n) + 0.5) / n for n in (height, width))
    for obj in as_objects(objects):
        x0, y0, x1, y1 = obj.bbox()
        box = (rows[:, None] >= y0) & (rows[:, None] <= y1) & (cols[None] >= x0) & (cols[None] <= x1)
        for channel in (render.COLOURS.index(obj.colour), len(render.COLOURS) + render.SHAPES.index(obj.shape)):
            out[..., channel] = np.maximum(out[..., channel], box)
    return out


def downsampled(maps, factor: int):
    """Layout maps [..., H, W, K] (NumPy or JAX) -> [..., H/factor, W/factor, K], each cell the mean of its
    factor x factor block: the share of the cell a box covers, on a latent grid."""
    *lead, height, width, k = maps.shape
    if height % factor or width % factor:
        raise ValueError(f"a {height}x{width} layout map does not tile into {factor}x{factor} blocks")
    blocks = maps.reshape(*lead, height // factor, factor, width // factor, factor, k)
    return blocks.mean(axis=(-4, -2))


def place_class(obj: render.SceneObject) -> int:
    """The class of `obj`'s size and centre: (size * PLACE_BINS + row) * PLACE_BINS + column."""
    row, col = (min(int(v * PLACE_BINS), PLACE_BINS - 1) for v in (obj.y, obj.x))
    return (SIZE_NAMES.index(obj.size) * PLACE_BINS + row) * PLACE_BINS + col


def object_at(place: int, shape: str, colour: str) -> render.SceneObject:
    """The object of class `place` (`place_class`): its bin's centre, moved just enough to lie inside the canvas."""
    if not 0 <= place < PLACE_CLASSES:
        raise ValueError(f"place class {place} is outside 0..{PLACE_CLASSES - 1}")
    size, rest = divmod(int(place), PLACE_BINS * PLACE_BINS)
    row, col = divmod(rest, PLACE_BINS)
    half = render.SIZES[SIZE_NAMES[size]] / 2
    x, y = ((b + 0.5) / PLACE_BINS for b in (col, row))
    return render.SceneObject(shape, colour, SIZE_NAMES[size], float(np.clip(x, half, 1 - half)),
                              float(np.clip(y, half, 1 - half)))


def layout_violations(caption: str, objects) -> list[str]:
    """The renderer's rules that `objects` (in mention order) break for `caption`, by name: 'count' (the number of
    objects the caption names), 'kind' (an object's colour or shape, as `eval.parse_prompt` reads them), 'size' and
    'place' (a single object's size and place words), 'relation' (`render.relation_holds`, first object on the
    second), 'inside' (`render.inside`), 'overlap' (`render.separated`, pairwise). Empty for a valid layout."""
    from jaxdiff.data.eval import parse_prompt   # scoring only: sampling, which reads this module, never needs it

    req, objects = parse_prompt(caption), as_objects(objects)
    if req.family == "motion":
        raise ValueError(f"caption {caption!r} is a motion caption; layouts score the families "
                         f"{', '.join(render.FAMILIES)}")
    specs = req.objects * req.count if req.count else req.objects
    broken = []
    if len(objects) != len(specs):
        broken.append("count")
    pairs = list(zip(specs, objects))
    if any((o.colour, o.shape) != (s.colour, s.shape) for s, o in pairs):
        broken.append("kind")
    if any(s.size is not None and o.size != s.size for s, o in pairs):
        broken.append("size")
    if any(s.place is not None and not render.place_holds(o, s.place) for s, o in pairs):
        broken.append("place")
    if req.relation and (len(objects) < 2 or not render.relation_holds(objects[0], objects[1], req.relation)):
        broken.append("relation")
    if not all(render.inside(o) for o in objects):
        broken.append("inside")
    if not all(render.separated(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
        broken.append("overlap")
    return broken


def layout_report(captions, layouts) -> dict:
    """Share of fully valid layouts (`layout_violations` empty) per caption family and 'overall' (the mean over
    the families present, as `eval.evaluate`), 'count' {family: n} and 'failures' {rule: layouts breaking it}.

    captions: [N] str; layouts: N lists of SceneObjects (or scene records' `objects`), in mention order."""
    if len(captions) != len(layouts):
        raise ValueError(f"{len(captions)} captions but {len(layouts)} layouts")
    if not captions:
        raise ValueError("nothing to score: no captions")
    from jaxdiff.data.eval import family_of_prompt
    valid: dict[str, list[bool]] = {}
    failures = {rule: 0 for rule in ("count", "kind", "size", "place", "relation", "inside", "overlap")}
    for caption, objects in zip(captions, layouts):
        broken = layout_violations(caption, objects)
        valid.setdefault(family_of_prompt(caption), []).append(not broken)
        for rule in broken:
            failures[rule] += 1
    families = [f for f in render.FAMILIES if f in valid]
    report = {f: float(np.mean(valid[f])) for f in families}
    report["overall"] = float(np.mean(list(report.values())))
    return {**report, "count": {f: len(valid[f]) for f in families}, "failures": failures}


def on_grid(objects) -> list[render.SceneObject]:
    """Each object moved to the centre of its place class (`object_at(place_class(obj), ...)`): the layout as a
    model that predicts place classes can write it."""
    return [object_at(place_class(obj), obj.shape, obj.colour) for obj in as_objects(objects)]
