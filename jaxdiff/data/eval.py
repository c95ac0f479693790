"""ShapesEval: prompt adherence of generated images and videos, measured, in the spirit of
GenEval (Ghosh et al., 2023), with a deterministic analyser instead of a detector.

The analyser segments an image by the palette (nearest palette colour within
`COLOUR_DISTANCE`, else unassigned), splits each colour into connected components,
drops specks smaller than `MIN_AREA`, and reads every component as an object: shape by
the best-overlapping template stretched over its bounding box (which generalises the
fill ratio: square 1, circle pi/4, triangle 1/2), size by the box side, position by
the box centre. A prompt is parsed into requirements and scored
per caption family:

- single:      an object of that colour and shape (and size, and half of the image,
               when the prompt says so);
- relation:    two such objects whose centres are ordered along the relation's axis,
               with that axis dominant;
- counting:    exactly N objects of that colour and shape;
- attribution: two distinct objects with the two colour-shape bindings;
- motion:      (videos) each object present once in >= 90% of frames, keeping its size,
               moving in the prompted direction.

The thresholds sit between the renderer's values, so slightly imperfect generated
images still read right. The held-out prompt set is the first `per_family` examples of
each family of the default `shapes` test split (seed 0, split id 2; see
`heldout_prompts`), the same at every resolution.

The held-out video prompts are the first `per_family` captions of the `moving_shapes` test
split of clips of the generated length (`heldout_video_prompts`; the frame count changes them).

This module is the analysis only (data never depends on the pipelines); the command line, and
generating with a model folder, live in `jaxdiff.pipelines.shapes_eval`:

    python -m jaxdiff.pipelines.shapes_eval --write_prompts prompts.txt   # the held-out prompts
    python -m sample --prompts-file prompts.txt --out DIR ...             # any generator
    python -m jaxdiff.pipelines.shapes_eval --images DIR                  # per-family table
    python -m jaxdiff.pipelines.shapes_eval --model FOLDER                # generate (TextToImage) and score
    python -m jaxdiff.pipelines.shapes_eval --model FOLDER --videos       # TextToVideo, motion family; --frames T
"""
import dataclasses
import os
import re

import numpy as np
from scipy import ndimage

from jaxdiff.data import render

COLOUR_DISTANCE = 64.0  # RGB distance to the nearest palette colour; further is unassigned
MIN_AREA = 0.005  # of the image area: a quarter of a small triangle; smaller components are specks
LARGE_SIDE = (render.SIZES["small"] + render.SIZES["large"]) / 2
MIN_RELATION_OFFSET = 0.1  # image sides between centres for a relation to count
TRACK_PRESENCE = 0.9  # fraction of frames an object must be found in, exactly once
MIN_SPEED = render.MIN_SPEED / 2  # image sides per frame to count as moving

_PALETTE = np.array([render.BACKGROUND, *render.PALETTE.values()], np.float32)  # [1 + K, 3]
_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class Detection:
    """An object read off an image; `x`, `y`, `side` in fractions of the image side."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    side: float
    fill: float


def palette_labels(image: np.ndarray, max_distance: float = COLOUR_DISTANCE) -> np.ndarray:
    """image uint8 [H, W, 3] -> int [H, W]: index into render.COLOURS, -1 for background
    or a colour further than `max_distance` from every palette entry."""
    d = np.linalg.norm(image[..., None, :].astype(np.float32) - _PALETTE, axis=-1)  # [H, W, 1+K]
    nearest = np.argmin(d, axis=-1)
    ok = np.take_along_axis(d, nearest[..., None], axis=-1)[..., 0] <= max_distance
    return np.where(ok, nearest - 1, -1)


def shape_templates(height: int, width: int) -> dict[str, np.ndarray]:
    """bool [h, w] masks of each shape filling an h x w bounding box (pixel centres)."""
    v = (np.arange(height)[:, None] + 0.5) / height
    u = (np.arange(width)[None, :] + 0.5) / width
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), bool),
        "triangle": np.abs(u - 0.5) <= v / 2,
    }


def shape_of(mask: np.ndarray) -> str:
    """The shape whose template, stretched over the component's bounding box, overlaps
    it best (IoU). Against the square this is the fill ratio (1, pi/4, 1/2); the circle
    and triangle templates also see where the missing pixels are, which keeps small,
    blurred or eroded shapes apart where a fill threshold does not."""
    def iou(t):
        return np.logical_and(mask, t).sum() / np.logical_or(mask, t).sum()
    templates = shape_templates(*mask.shape)
    return max(render.SHAPES, key=lambda name: iou(templates[name]))


def analyse(image: np.ndarray) -> list[Detection]:
    """All objects in an image: uint8 [H, W, 3] -> detections, in palette then raster order."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    labels = palette_labels(image)
    found = []
    for k, colour in enumerate(render.COLOURS):
        components, n = ndimage.label(labels == k, structure=_EIGHT_CONNECTED)
        if n == 0:
            continue
        areas = np.bincount(components.ravel(), minlength=n + 1)[1:]
        for i, box in enumerate(ndimage.find_objects(components)):
            if areas[i] < MIN_AREA * h * w:
                continue
            rows, cols = box
            bh, bw = rows.stop - rows.start, cols.stop - cols.start
            fill = areas[i] / (bh * bw)
            side = max(bw / w, bh / h)
            found.append(Detection(
                shape=shape_of(components[box] == i + 1), colour=colour,
                size="large" if side >= LARGE_SIDE else "small",
                x=(cols.start + cols.stop) / 2 / w, y=(rows.start + rows.stop) / 2 / h,
                side=side, fill=float(fill)))
    return found


# ---------------------------------------------------------------- prompts

@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """What a prompt asks of one object; None means 'not asked'."""

    shape: str
    colour: str
    size: str | None = None
    place: str | None = None
    direction: str | None = None

    def matches(self, d: Detection) -> bool:
        return (d.shape == self.shape and d.colour == self.colour
                and (self.size is None or d.size == self.size)
                and (self.place is None or in_half(d, self.place)))


@dataclasses.dataclass(frozen=True)
class Requirement:
    """A parsed prompt: its family, the objects it names, and the family's parameter."""

    family: str
    objects: tuple
    count: int | None = None
    relation: str | None = None


def _alt(words) -> str:
    return "(" + "|".join(re.escape(w) for w in words) + ")"


_C, _S = _alt(render.COLOURS), _alt(render.SHAPES)
_GRAMMAR = {
    "single": re.compile(rf"a (?:{_alt(render.SIZES)} )?{_C} {_S}(?: {_alt(render.PLACES)})?"),
    "relation": re.compile(rf"a {_C} {_S} {_alt(render.RELATIONS)} a {_C} {_S}"),
    "counting": re.compile(rf"{_alt(render.NUMBERS)} {_C} {_S}s"),
    "attribution": re.compile(rf"a {_C} {_S} and a {_C} {_S}"),
    "motion": re.compile(rf"a {_C} {_S} moving {_alt(render.DIRECTIONS)}"
                         rf"(?: and a {_C} {_S} moving {_alt(render.DIRECTIONS)})?"),
}


def parse_prompt(prompt: str) -> Requirement:
    """Parses a caption of the shapes / moving_shapes grammar into requirements."""
    text = " ".join(prompt.lower().split())
    for family, pattern in _GRAMMAR.items():
        m = pattern.fullmatch(text)
        if m:
            return _REQUIREMENTS[family](m.groups())
    raise ValueError(
        f"prompt {prompt!r} is not in the ShapesEval grammar; families: {', '.join(_GRAMMAR)} "
        "(e.g. 'a small red circle on the left', 'a red circle above a blue square', "
        "'three green triangles', 'a red circle and a blue square', 'a red circle moving left')")


_REQUIREMENTS = {
    "single": lambda g: Requirement("single", (ObjectSpec(g[2], g[1], size=g[0], place=g[3]),)),
    "relation": lambda g: Requirement("relation", (ObjectSpec(g[1], g[0]), ObjectSpec(g[4], g[3])),
                                      relation=g[2]),
    "counting": lambda g: Requirement("counting", (ObjectSpec(g[2], g[1]),),
                                      count=render.NUMBERS[g[0]]),
    "attribution": lambda g: Requirement("attribution",
                                         (ObjectSpec(g[1], g[0]), ObjectSpec(g[3], g[2]))),
    "motion": lambda g: Requirement("motion", tuple(
        ObjectSpec(s, c, direction=d) for c, s, d in (g[0:3], g[3:6]) if c is not None)),
}


def family_of_prompt(prompt: str) -> str:
    return parse_prompt(prompt).family


# ---------------------------------------------------------------- scoring images

def in_half(d: Detection, place: str) -> bool:
    """Lenient place test: the centre is in the named half (the renderer uses < 0.4)."""
    axis, side = render.PLACES[place]
    c = (d.x, d.y)[axis]
    return c < 0.5 if side < 0 else c > 0.5


def relation_seen(a: Detection, b: Detection, relation: str) -> bool:
    """`a` {relation} `b`: ordered along the relation's axis, and that axis dominant."""
    axis, sign = render.RELATIONS[relation]
    d = (a.x - b.x, a.y - b.y)
    along = sign * d[axis]
    return along >= MIN_RELATION_OFFSET and abs(d[1 - axis]) < along


def satisfied(req: Requirement, found: list[Detection]) -> bool:
    """Whether detections in one image satisfy an image requirement."""
    matches = [[d for d in found if spec.matches(d)] for spec in req.objects]
    if req.family == "single":
        return bool(matches[0])
    if req.family == "counting":
        return len(matches[0]) == req.count
    if req.family == "relation":
        return any(relation_seen(a, b, req.relation)
                   for a in matches[0] for b in matches[1] if a is not b)
    if req.family == "attribution":
        return any(a is not b for a in matches[0] for b in matches[1])
    raise ValueError(f"{req.family!r} prompts score videos; use score_video")


def score(prompt: str, image: np.ndarray) -> bool:
    """Whether image uint8 [H, W, 3] shows `prompt`."""
    return satisfied(parse_prompt(prompt), analyse(image))


# ---------------------------------------------------------------- scoring videos

def track(spec: ObjectSpec, frames: list[list[Detection]]) -> list[Detection | None]:
    """Per frame, the one detection of the spec's colour and shape (None if 0 or > 1)."""
    out = []
    for found in frames:
        m = [d for d in found if d.shape == spec.shape and d.colour == spec.colour]
        out.append(m[0] if len(m) == 1 else None)
    return out


def moves(spec: ObjectSpec, path: list[Detection | None]) -> bool:
    """Identity (found once in most frames, one size throughout) and direction (the
    least-squares velocity points the prompted way, along a dominant axis)."""
    t = np.array([i for i, d in enumerate(path) if d is not None], np.float64)
    if len(t) < max(2, TRACK_PRESENCE * len(path)):
        return False
    kept = [d for d in path if d is not None]
    if len({d.size for d in kept}) != 1:
        return False
    xy = np.array([(d.x, d.y) for d in kept])
    velocity = np.polyfit(t, xy, 1)[0]  # [2]: image sides per frame
    vx, vy = render.VELOCITIES[spec.direction]
    axis = 0 if vx else 1
    along = (vx or vy) * velocity[axis]
    return along >= MIN_SPEED and abs(velocity[1 - axis]) < along / 2


def score_video(prompt: str, video: np.ndarray) -> bool:
    """Whether video uint8 [T, H, W, 3] shows `prompt` (a 'moving' caption)."""
    req = parse_prompt(prompt)
    if req.family != "motion":
        raise ValueError(f"prompt {prompt!r} is a {req.family} prompt; score images with score")
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"expected a video [T, H, W, 3], got shape {video.shape}")
    frames = [analyse(f) for f in video]
    return all(moves(spec, track(spec, frames)) for spec in req.objects)


def constant_objects(video: np.ndarray) -> bool:
    """Whether the objects of video uint8 [T, H, W, 3] keep their colours and shapes: one non-empty
    set of (colour, shape) detections, with multiplicity, in >= TRACK_PRESENCE of the frames,
    whatever the prompt asked for."""
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"expected a video [T, H, W, 3], got shape {video.shape}")
    kinds = [tuple(sorted((d.colour, d.shape) for d in analyse(f))) for f in video]
    most = max(set(kinds), key=kinds.count)
    return bool(most) and kinds.count(most) >= TRACK_PRESENCE * len(kinds)


# ---------------------------------------------------------------- evaluation

def evaluate(prompts, images) -> dict:
    """Accuracy per family and 'overall' (mean over the families present, as GenEval).

    prompts: [N] str; images: N uint8 arrays [H, W, 3] (or videos [T, H, W, 3] for
    motion prompts). Returns {family: accuracy, ..., 'overall': float, 'count': {family: n}},
    and with videos 'constant': the fraction of them whose objects keep colour and shape
    (`constant_objects`; not a family, not in 'overall').
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    if not prompts:
        raise ValueError("nothing to evaluate: no prompts")
    hits: dict[str, list[bool]] = {}
    constant = []
    for prompt, image in zip(prompts, images):
        family = family_of_prompt(prompt)
        ok = score_video(prompt, image) if family == "motion" else score(prompt, image)
        hits.setdefault(family, []).append(ok)
        if family == "motion":
            constant.append(constant_objects(image))
    order = [f for f in (*render.FAMILIES, "motion") if f in hits]
    result = {f: float(np.mean(hits[f])) for f in order}
    result["overall"] = float(np.mean(list(result.values())))
    result["count"] = {f: len(hits[f]) for f in order}
    if constant:
        result["constant"] = float(np.mean(constant))
    return result


def heldout_prompts(per_family: int = 100, seed: int = 0) -> list[str]:
    """The fixed held-out prompt set: captions of the `shapes` test split (split id 2),
    first `per_family` examples of each family, interleaved single, relation, counting,
    attribution. Matches the default test split (1000 examples) up to per_family=250."""
    return [render.scene_at(seed, 2, i).caption for i in range(per_family * len(render.FAMILIES))]


def heldout_video_prompts(n: int = 100, num_frames: int = 16, seed: int = 0) -> list[str]:
    """The first `n` captions of the `moving_shapes` test split (split id 2) of `num_frames`-frame
    clips: the frame count bounds the objects' speeds and sizes, so the captions depend on it
    (`moving_shapes/{R}px-{T}f` has these captions for T = num_frames, at every resolution R)."""
    return [render.motion_at(seed, 2, i, num_frames).caption for i in range(n)]


def evaluate_model(generate, per_family: int = 100, batch_size: int = 16, seed: int = 0,
                   num_frames: int | None = None) -> dict:
    """Scores a text-to-image (or text-to-video) generator on the held-out prompts.

    generate: list[str] -> uint8 [B, H, W, 3] (or float in [0, 1], converted); with `num_frames`,
    videos [B, T, H, W, 3] of the held-out moving-shapes prompts of T = num_frames frames
    (`per_family` of them: motion is one family).
    """
    prompts = heldout_prompts(per_family, seed) if num_frames is None else \
        heldout_video_prompts(per_family, num_frames, seed)
    images = []
    for start in range(0, len(prompts), batch_size):
        images.extend(to_uint8(x) for x in generate(prompts[start:start + batch_size]))
    return evaluate(prompts, images)


def to_uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- folders and tables

_MEDIA = (".png", ".jpg", ".jpeg", ".gif", ".npy")


def load_media(path: str) -> np.ndarray:
    """An image (PNG/JPEG) as uint8 [H, W, 3], or a video (GIF frames, .npy) as [T, H, W, 3]."""
    if path.endswith(".npy"):
        return np.load(path)
    if path.lower().endswith(".gif"):
        import imageio.v3 as iio
        return np.asarray(iio.imread(path, index=None))[..., :3]
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def folder_prompts(folder: str) -> list[tuple[str, str]]:
    """(file, prompt) pairs of a folder. A prompt comes from, in order: a `prompts.txt`
    (one line per file, files in sorted order), a sidecar `NAME.txt`, or the PNG text
    field 'prompt' (as `python -m sample` writes it)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no folder {folder!r}")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(_MEDIA))
    if not files:
        raise ValueError(f"folder {folder!r} has no images or videos ({', '.join(_MEDIA)})")
    listing = os.path.join(folder, "prompts.txt")
    if os.path.exists(listing):
        with open(listing) as f:
            lines = [line.strip() for line in f if line.strip()]
        if len(lines) != len(files):
            raise ValueError(f"{listing} has {len(lines)} prompts for {len(files)} files")
        return list(zip(files, lines))
    return [(f, _prompt_of(folder, f)) for f in files]


def _prompt_of(folder: str, name: str) -> str:
    sidecar = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
    if os.path.exists(sidecar):
        with open(sidecar) as f:
            return f.read().strip()
    if name.lower().endswith(".png"):
        from PIL import Image
        with Image.open(os.path.join(folder, name)) as im:
            if "prompt" in im.text:
                return im.text["prompt"]
    raise ValueError(f"no prompt for {name!r} in {folder!r}: add prompts.txt, "
                     f"{os.path.splitext(name)[0]}.txt or a PNG 'prompt' text field")


def format_table(result: dict) -> str:
    rows = ["| family | n | accuracy |", "|---|---:|---:|"]
    for family, n in result["count"].items():
        rows.append(f"| {family} | {n} | {result[family]:.3f} |")
    rows.append(f"| **overall** | {sum(result['count'].values())} | {result['overall']:.3f} |")
    if "constant" in result:
        rows.append(f"| constant colour and shape (videos) | {result['count']['motion']} | {result['constant']:.3f} |")
    return "\n".join(rows)
