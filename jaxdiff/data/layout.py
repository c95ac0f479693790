"""Layouts: where each object of a scene goes, as a model reads and writes it.

A layout is a list of `render.SceneObject`s (shape, colour, size, box centre) -- the scene records' `objects` --
in the order the caption mentions them. Two views of it:

- `layout_map(objects, height, width)`: float32 [H, W, LAYOUT_CHANNELS], the denoiser's conditioning (a
  layout-to-image model reads it, `downsampled` to its latent grid, as extra input channels, as depth-to-image and
  inpainting models read theirs): channel `COLOURS.index(colour)` and channel `len(COLOURS) + SHAPES.index(shape)`
  are 1 on the pixels whose centre lies in the object's bounding box, 0 elsewhere.
- `trajectory_map(objects, num_frames, height, width)`: float32 [T, H, W, LAYOUT_CHANNELS], a video's layout (its
  objects are `render.MovingObject`s, moving_shapes' records: a frame-0 box, a direction and a speed), frame t the
  `layout_map` of every object where it is at frame t: what a layout-to-video model reads, frame by frame.
- `place_class(obj)` / `object_at(place, shape, colour)`: a box as one class of PLACE_CLASSES = 2 sizes x
  PLACE_BINS rows x PLACE_BINS columns of its centre (a caption-to-layout model predicts it with a softmax, so a
  position spread such as "to the left of" can be any distribution, not a regressed mean); a trajectory adds its
  direction and `speed_class` (SPEED_BINS bins of the moving_shapes speeds), read back by `moving_at`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxdiff.data import render

LAYOUT_CHANNELS = len(render.COLOURS) + len(render.SHAPES)
SIZE_NAMES = tuple(render.SIZES)   # ("small", "large"): the size index of a scene record
PLACE_BINS = 32   # centre bins per axis (1 px at 32 px)
PLACE_CLASSES = len(SIZE_NAMES) * PLACE_BINS * PLACE_BINS
SPEED_BINS = 8    # speed classes over [render.MIN_SPEED, render.MAX_SPEED] (0.19 px per frame each at 32 px)
OBJECT_FIELDS = ("shape", "colour", "size", "x", "y")   # an object given by name (`as_objects`)
MOTION_FIELDS = ("direction", "speed")   # and a moving one's (`as_trajectories`)


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


def as_trajectories(objects) -> list[render.MovingObject]:
    """A moving_shapes record's `objects` (parallel arrays, as `as_objects` reads them, plus 'direction' label
    indices and 'speed'), or a list of MovingObjects or of dicts with the fields OBJECT_FIELDS + MOTION_FIELDS by
    name ({..., 'direction': 'left', 'speed': 0.05}: image sides per frame) -> a list of MovingObjects, each checked
    (its frame-0 box as `check_object`, its direction one of `render.DIRECTIONS`, its speed in [0, 1])."""
    if isinstance(objects, dict):
        motion = [np.asarray(objects[k]).reshape(-1) for k in MOTION_FIELDS]
        return [render.MovingObject(*dataclasses.astuple(o), render.DIRECTIONS[int(d)], float(v))
                for o, d, v in zip(as_objects(objects), *motion)]
    return [_check_motion(o if isinstance(o, render.MovingObject) else _moving_from_fields(o)) for o in objects]


def _moving_from_fields(obj) -> render.MovingObject:
    fields = OBJECT_FIELDS + MOTION_FIELDS
    if not isinstance(obj, dict) or set(obj) != set(fields):
        raise ValueError(f"trajectory {obj!r}: need a MovingObject or a dict with exactly the fields "
                         f"{', '.join(fields)}")
    return render.MovingObject(**obj)


def _check_motion(obj: render.MovingObject) -> render.MovingObject:
    if obj.direction not in render.DIRECTIONS:
        raise ValueError(f"trajectory direction {obj.direction!r}: choose one of: {', '.join(render.DIRECTIONS)}")
    check_object(obj.at(0))
    v = obj.speed
    if not (isinstance(v, (int, float, np.floating)) and np.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"trajectory speed={v!r}: need image sides per frame in [0, 1]")
    return obj


def layout_map(objects, height: int, width: int | None = None) -> np.ndarray:
    """float32 [H, W, LAYOUT_CHANNELS] (W = H unless given): each object's box painted into its colour's and its
    shape's channel."""
    return _painted(as_objects(objects), height, height if width is None else width)


def trajectory_map(objects, num_frames: int, height: int, width: int | None = None) -> np.ndarray:
    """float32 [T, H, W, LAYOUT_CHANNELS] (W = H unless given): frame t is the layout map of the moving objects
    (`as_trajectories`) where they are at frame t (`render.MovingObject.at`; a box that leaves the image is cut)."""
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r}: need a positive int")
    moving, width = as_trajectories(objects), height if width is None else width
    return np.stack([_painted([o.at(t) for o in moving], height, width) for t in range(num_frames)])


def _painted(objects: list[render.SceneObject], height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width, LAYOUT_CHANNELS), np.float32)
    rows, cols = ((np.arange(n) + 0.5) / n for n in (height, width))
    for obj in objects:
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


def speed_class(speed: float) -> int:
    """The bin of `speed` (image sides per frame) among SPEED_BINS equal bins over [MIN_SPEED, MAX_SPEED]."""
    share = (speed - render.MIN_SPEED) / (render.MAX_SPEED - render.MIN_SPEED)
    return int(np.clip(int(share * SPEED_BINS), 0, SPEED_BINS - 1))


def moving_at(place: int, speed: int, direction: str, shape: str, colour: str,
              num_frames: int) -> render.MovingObject:
    """The trajectory of place class `place` (its frame-0 box, `object_at`) moving `direction` at the centre of speed
    class `speed`, its start moved along the motion axis just enough for all `num_frames` frames to lie inside (the
    speed lowered to the most the image allows if even that is too fast)."""
    if not 0 <= speed < SPEED_BINS:
        raise ValueError(f"speed class {speed} is outside 0..{SPEED_BINS - 1}")
    start = object_at(place, shape, colour)
    lo, hi = render.MIN_SPEED, render.MAX_SPEED
    value = min(lo + (speed + 0.5) * (hi - lo) / SPEED_BINS, render.max_travel(num_frames, start.size))
    travel, half = value * (num_frames - 1), start.side / 2
    vx, vy = render.VELOCITIES[direction]
    x, y = (float(np.clip(v, half - min(d, 0) * travel + 1e-9, 1 - half - max(d, 0) * travel - 1e-9))
            for v, d in ((start.x, vx), (start.y, vy)))
    return render.MovingObject(shape, colour, start.size, x, y, direction, float(value))


def layout_violations(caption: str, objects, num_frames: int | None = None) -> list[str]:
    """The renderer's rules that `objects` (in mention order) break for `caption`, by name: 'count' (the number of
    objects the caption names), 'kind' (an object's colour or shape, as `eval.parse_prompt` reads them), 'size' and
    'place' (a single object's size and place words), 'relation' (`render.relation_holds`, first object on the
    second), 'direction' (a motion caption's, each object's), 'inside' (`render.inside`), 'overlap'
    (`render.separated`, pairwise); for a motion caption `objects` are trajectories (`as_trajectories`) and 'inside'
    and 'overlap' hold in each of `num_frames` frames. Empty for a valid layout."""
    from jaxdiff.data.eval import parse_prompt   # scoring only: sampling, which reads this module, never needs it

    req = parse_prompt(caption)
    if req.family == "motion":
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"caption {caption!r} is a motion caption: its trajectories need num_frames, a "
                             f"positive int (got {num_frames!r})")
        objects = as_trajectories(objects)
        frames = [[o.at(t) for o in objects] for t in range(num_frames)]
    else:
        objects = as_objects(objects)
        frames = [objects]
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
    if any(s.direction is not None and o.direction != s.direction for s, o in pairs):
        broken.append("direction")
    return broken + frame_violations(frames)


def frame_violations(frames) -> list[str]:
    """The caption-free rules that frames (lists of SceneObjects) break: 'inside' (an object not wholly inside the
    image) and 'overlap' (two objects closer than MIN_GAP), each in some frame. Empty when both hold."""
    broken = []
    if not all(render.inside(o) for frame in frames for o in frame):
        broken.append("inside")
    if not all(render.separated(a, b) for frame in frames for i, a in enumerate(frame) for b in frame[i + 1:]):
        broken.append("overlap")
    return broken


def layout_report(captions, layouts, num_frames: int | None = None) -> dict:
    """Share of fully valid layouts (`layout_violations` empty) per caption family and 'overall' (the mean over
    the families present, as `eval.evaluate`), 'count' {family: n} and 'failures' {rule: layouts breaking it}.

    captions: [N] str; layouts: N lists of SceneObjects (or scene records' `objects`), in mention order, or of
    MovingObjects for motion captions, whose clips have `num_frames` frames."""
    if len(captions) != len(layouts):
        raise ValueError(f"{len(captions)} captions but {len(layouts)} layouts")
    if not captions:
        raise ValueError("nothing to score: no captions")
    from jaxdiff.data.eval import family_of_prompt
    valid: dict[str, list[bool]] = {}
    failures = {rule: 0 for rule in ("count", "kind", "size", "place", "relation", "direction", "inside", "overlap")}
    for caption, objects in zip(captions, layouts):
        broken = layout_violations(caption, objects, num_frames)
        valid.setdefault(family_of_prompt(caption), []).append(not broken)
        for rule in broken:
            failures[rule] += 1
    families = [f for f in (*render.FAMILIES, "motion") if f in valid]
    report = {f: float(np.mean(valid[f])) for f in families}
    report["overall"] = float(np.mean(list(report.values())))
    return {**report, "count": {f: len(valid[f]) for f in families}, "failures": failures}


def on_grid(objects, num_frames: int | None = None) -> list:
    """Each object moved to the centre of its place class (`object_at(place_class(obj), ...)`), or with `num_frames`
    each trajectory to its place and speed classes' (`moving_at`): the layout as a model that predicts the classes
    can write it."""
    if num_frames is None:
        return [object_at(place_class(obj), obj.shape, obj.colour) for obj in as_objects(objects)]
    return [moving_at(place_class(o.at(0)), speed_class(o.speed), o.direction, o.shape, o.colour, num_frames)
            for o in as_trajectories(objects)]
