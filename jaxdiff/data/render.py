"""Procedural scenes of coloured shapes: palette, rasterisation, scene sampling, captions.

Pure NumPy. Every random choice comes from an explicit `np.random.Generator`, so a
scene is a function of its generator's seed. Scenes live in *fractional* coordinates
(0..1 of the image side), which makes the same seed give the same scene and caption at
every resolution; only `render` looks at pixels.

Objects are filled, flat-coloured (no anti-aliasing, so every pixel is an exact palette
colour), fully inside the canvas and separated by at least `MIN_GAP`. Their size is the
side of their (square) bounding box; their position is the centre of that box.
"""
import dataclasses
import functools

import numpy as np

BACKGROUND = (235, 235, 235)
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "cyan": (30, 190, 200),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.20, "large": 0.35}  # bounding-box side / image side
FAMILIES = ("single", "relation", "counting", "attribution")
NUMBERS = {"two": 2, "three": 3, "four": 4}
DIRECTIONS = ("left", "right", "up", "down")

MIN_GAP = 2 / 64  # 2 px at 64x64 between bounding boxes, scaled with the resolution
PLACE_BOUND = 0.4  # "on the left" means centre x < 0.4 W; "on the right" x > 0.6 W
# "above" etc.: centres differ by >= 0.25 along the relation's axis and by <= 0.2 along
# the other, a margin that keeps the relation unambiguous after rasterisation.
RELATION_OFFSET, RELATION_SPREAD = 0.25, 0.2
# Moving objects: speed in image sides per frame (1.5 to 3 px per frame at 64x64).
MIN_SPEED, MAX_SPEED = 1.5 / 64, 3.0 / 64

# place phrase -> (axis, side): axis 0 is x, 1 is y; side -1 is the low end.
PLACES = {
    "on the left": (0, -1),
    "on the right": (0, 1),
    "at the top": (1, -1),
    "at the bottom": (1, 1),
}
# relation phrase -> (axis, sign of subject minus object along the axis)
RELATIONS = {
    "above": (1, -1),
    "below": (1, 1),
    "to the left of": (0, -1),
    "to the right of": (0, 1),
}
# direction -> unit velocity (x, y); y grows downwards as in image rows
VELOCITIES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

_MAX_TRIES = 1000


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One filled shape; `x`, `y` is its bounding-box centre in fractions of W, H."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def side(self) -> float:
        return SIZES[self.size]

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in fractions of the image side."""
        h = self.side / 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)


@dataclasses.dataclass(frozen=True)
class MovingObject:
    """A shape moving at constant velocity; (`x`, `y`) is its centre in frame 0."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    direction: str
    speed: float  # image sides per frame

    def at(self, t: int) -> SceneObject:
        vx, vy = VELOCITIES[self.direction]
        return SceneObject(self.shape, self.colour, self.size,
                           self.x + vx * self.speed * t, self.y + vy * self.speed * t)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A caption, its family and the objects that make it true."""

    family: str
    caption: str
    objects: tuple


def plural(shape: str) -> str:
    return shape + "s"


# ---------------------------------------------------------------- rasterisation

@functools.lru_cache(maxsize=8)
def _pixel_centres(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in fractions: u [1, R] (columns), v [R, 1] (rows)."""
    c = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution
    return c[None, :], c[:, None]


def shape_mask(obj: SceneObject, resolution: int) -> np.ndarray:
    """bool [R, R]: the pixels whose centre lies inside `obj`."""
    u, v = _pixel_centres(resolution)
    h = obj.side / 2
    du, dv = u - obj.x, v - obj.y
    if obj.shape == "square":
        return (np.abs(du) <= h) & (np.abs(dv) <= h)
    if obj.shape == "circle":
        return du * du + dv * dv <= h * h
    if obj.shape == "triangle":
        # Upright isosceles triangle: apex at (x, y - h), base from x - h to x + h at y + h;
        # its half-width grows linearly from 0 at the apex to h at the base.
        depth = dv + h
        return (depth >= 0) & (dv <= h) & (np.abs(du) <= depth / 2)
    raise ValueError(f"unknown shape {obj.shape!r}; choose one of: {', '.join(SHAPES)}")


def render(objects, resolution: int = 64) -> np.ndarray:
    """Draws `objects` (SceneObjects) on the background: uint8 [R, R, 3]."""
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[...] = BACKGROUND
    for obj in objects:
        image[shape_mask(obj, resolution)] = PALETTE[obj.colour]
    return image


def render_video(objects, num_frames: int, resolution: int = 64) -> np.ndarray:
    """Draws MovingObjects over `num_frames` frames: uint8 [T, R, R, 3]."""
    return np.stack([render([o.at(t) for o in objects], resolution) for t in range(num_frames)])


# ---------------------------------------------------------------- scene sampling

def separated(a: SceneObject, b: SceneObject, gap: float = MIN_GAP) -> bool:
    """True when the bounding boxes are at least `gap` apart along some axis."""
    ax0, ay0, ax1, ay1 = a.bbox()
    bx0, by0, bx1, by1 = b.bbox()
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def inside(obj: SceneObject) -> bool:
    x0, y0, x1, y1 = obj.bbox()
    return x0 >= 0 and y0 >= 0 and x1 <= 1 and y1 <= 1


def place_holds(obj: SceneObject, place: str) -> bool:
    axis, side = PLACES[place]
    c = (obj.x, obj.y)[axis]
    return c < PLACE_BOUND if side < 0 else c > 1 - PLACE_BOUND


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """`a` {relation} `b`: >= RELATION_OFFSET apart along the relation's axis, within
    RELATION_SPREAD along the other."""
    axis, sign = RELATIONS[relation]
    d = (a.x - b.x, a.y - b.y)
    return sign * d[axis] >= RELATION_OFFSET and abs(d[1 - axis]) <= RELATION_SPREAD


def _choice(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _random_object(rng, shape, colour, size) -> SceneObject:
    h = SIZES[size] / 2
    x, y = rng.uniform(h, 1 - h, size=2)
    return SceneObject(shape, colour, size, float(x), float(y))


def _place_apart(rng, specs, accept=lambda objs: True, tries: int = _MAX_TRIES):
    """Positions (shape, colour, size) specs at random, pairwise separated, until `accept`."""
    for _ in range(tries):
        objs = []
        for spec in specs:
            for _ in range(50):
                o = _random_object(rng, *spec)
                if all(separated(o, p) for p in objs):
                    objs.append(o)
                    break
            else:
                break
        if len(objs) == len(specs) and accept(objs):
            return tuple(objs)
    raise RuntimeError(f"could not place {specs} in {tries} tries")


def _distinct_kinds(rng, n: int, distinct_colours: bool) -> list[tuple[str, str]]:
    """n (shape, colour) pairs, all different (and of different colours if asked)."""
    while True:
        kinds = [(_choice(rng, SHAPES), _choice(rng, COLOURS)) for _ in range(n)]
        keys = [k[1] for k in kinds] if distinct_colours else kinds
        if len(set(keys)) == n:
            return kinds


def _size(rng) -> str:
    return _choice(rng, tuple(SIZES))


def sample_single(rng: np.random.Generator) -> Scene:
    """'a [small|large] {colour} {shape} [on the left|...]': one object."""
    shape, colour, size = _choice(rng, SHAPES), _choice(rng, COLOURS), _size(rng)
    say_size = rng.random() < 0.5
    place = _choice(rng, tuple(PLACES)) if rng.random() < 0.5 else None
    accept = (lambda objs: place_holds(objs[0], place)) if place else (lambda objs: True)
    objs = _place_apart(rng, [(shape, colour, size)], accept)
    words = ["a"] + ([size] if say_size else []) + [colour, shape] + ([place] if place else [])
    return Scene("single", " ".join(words), objs)


def sample_relation(rng: np.random.Generator) -> Scene:
    """'a {colour} {shape} {relation} a {colour} {shape}': two different objects."""
    (s1, c1), (s2, c2) = _distinct_kinds(rng, 2, distinct_colours=False)
    relation = _choice(rng, tuple(RELATIONS))
    objs = _place_apart(rng, [(s1, c1, _size(rng)), (s2, c2, _size(rng))],
                        lambda o: relation_holds(o[0], o[1], relation))
    return Scene("relation", f"a {c1} {s1} {relation} a {c2} {s2}", objs)


def sample_counting(rng: np.random.Generator) -> Scene:
    """'{two|three|four} {colour} {shape}s': identical colour and shape, any sizes."""
    word = _choice(rng, tuple(NUMBERS))
    shape, colour = _choice(rng, SHAPES), _choice(rng, COLOURS)
    for _ in range(_MAX_TRIES):
        # Redraw the sizes when a layout does not fit (four large objects rarely do).
        specs = [(shape, colour, _size(rng)) for _ in range(NUMBERS[word])]
        try:
            objs = _place_apart(rng, specs, tries=20)
            break
        except RuntimeError:
            continue
    else:
        raise RuntimeError(f"could not place {word} {shape}s in {_MAX_TRIES} size draws")
    return Scene("counting", f"{word} {colour} {plural(shape)}", objs)


def sample_attribution(rng: np.random.Generator) -> Scene:
    """'a {colour} {shape} and a {colour} {shape}': two objects of different colours."""
    (s1, c1), (s2, c2) = _distinct_kinds(rng, 2, distinct_colours=True)
    objs = _place_apart(rng, [(s1, c1, _size(rng)), (s2, c2, _size(rng))])
    return Scene("attribution", f"a {c1} {s1} and a {c2} {s2}", objs)


SAMPLERS = {
    "single": sample_single,
    "relation": sample_relation,
    "counting": sample_counting,
    "attribution": sample_attribution,
}


def sample_scene(rng: np.random.Generator, family: str) -> Scene:
    if family not in SAMPLERS:
        raise ValueError(f"unknown caption family {family!r}; choose one of: {', '.join(FAMILIES)}")
    return SAMPLERS[family](rng)


def example_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """The generator of one example: independent of generation order, so parallel-safe."""
    return np.random.default_rng([seed, split, index])


def family_of(index: int) -> str:
    """Families are interleaved, so any prefix of a split is balanced across them."""
    return FAMILIES[index % len(FAMILIES)]


def scene_at(seed: int, split: int, index: int) -> Scene:
    """Example `index` of a shapes split: the same scene at every resolution."""
    return sample_scene(example_rng(seed, split, index), family_of(index))


# ---------------------------------------------------------------- moving shapes

def max_travel(num_frames: int, size: str) -> float:
    """How far (in image sides) an object of `size` can go while staying inside."""
    return (1 - SIZES[size]) / max(num_frames - 1, 1)


def movable_sizes(num_frames: int) -> tuple[str, ...]:
    """The sizes with room to move >= MIN_SPEED per frame for `num_frames` frames."""
    sizes = tuple(s for s in SIZES if max_travel(num_frames, s) >= MIN_SPEED)
    if not sizes:
        raise ValueError(f"num_frames={num_frames} leaves no room to move at "
                         f"{MIN_SPEED * 64:.1f} px/frame (at 64 px); use at most "
                         f"{int((1 - SIZES['small']) / MIN_SPEED) + 1} frames")
    return sizes


def _moving_object(rng, shape, colour, num_frames) -> MovingObject:
    # Long clips leave large objects no room to move; those clips use small ones only.
    size = _choice(rng, movable_sizes(num_frames))
    direction = _choice(rng, DIRECTIONS)
    speed = float(rng.uniform(MIN_SPEED, min(MAX_SPEED, max_travel(num_frames, size))))
    travel = speed * (num_frames - 1)
    h = SIZES[size] / 2
    vx, vy = VELOCITIES[direction]
    # Along the motion axis the start leaves room for the whole trip; across it, anywhere.
    lo = [h - min(v, 0) * travel for v in (vx, vy)]
    hi = [1 - h - max(v, 0) * travel for v in (vx, vy)]
    x, y = (float(rng.uniform(a, b)) for a, b in zip(lo, hi))
    return MovingObject(shape, colour, size, x, y, direction, speed)


def sample_motion(rng: np.random.Generator, num_frames: int = 16) -> Scene:
    """'a {colour} {shape} moving {direction}' [' and a ... moving ...']: 1 or 2 objects,
    of different (shape, colour), never closer than MIN_GAP in any frame."""
    n = 1 + int(rng.random() < 0.5)
    kinds = _distinct_kinds(rng, n, distinct_colours=False)
    for _ in range(_MAX_TRIES):
        objs = [_moving_object(rng, s, c, num_frames) for s, c in kinds]
        if n == 1 or all(separated(objs[0].at(t), objs[1].at(t)) for t in range(num_frames)):
            break
    else:
        raise RuntimeError(f"could not place {kinds} apart over {num_frames} frames")
    caption = " and ".join(f"a {o.colour} {o.shape} moving {o.direction}" for o in objs)
    return Scene("motion", caption, tuple(objs))


def motion_at(seed: int, split: int, index: int, num_frames: int) -> Scene:
    """Example `index` of a moving_shapes split."""
    return sample_motion(example_rng(seed, split, index), num_frames)


# ---------------------------------------------------------------- vocabulary

def caption_vocabulary() -> list[str]:
    """Every word the caption grammars (shapes and moving_shapes) can produce, sorted."""
    phrases = ["a", "and", "moving", *SIZES, *COLOURS, *SHAPES, *map(plural, SHAPES),
               *NUMBERS, *PLACES, *RELATIONS, *DIRECTIONS]
    return sorted({w for p in phrases for w in p.split()})
