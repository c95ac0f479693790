"""The procedural renderer: exact palette, sizes, separation, caption constraints, motion."""
import numpy as np
import pytest

from jaxdiff.data import render
from jaxdiff.data.eval import parse_prompt

N = 200  # scenes per check: 50 per family


@pytest.fixture(scope="module")
def scenes():
    return [render.scene_at(0, 2, i) for i in range(N)]


def test_same_seed_same_bytes_other_seed_differs():
    a = [render.render(render.scene_at(7, 0, i).objects) for i in range(20)]
    b = [render.render(render.scene_at(7, 0, i).objects) for i in range(20)]
    c = [render.render(render.scene_at(8, 0, i).objects) for i in range(20)]
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert sum(x.tobytes() != z.tobytes() for x, z in zip(a, c)) >= 19
    # Splits use different streams of the same seed.
    assert render.scene_at(7, 0, 3) != render.scene_at(7, 1, 3)


def test_exact_palette_and_background(scenes):
    allowed = {render.BACKGROUND, *render.PALETTE.values()}
    seen = set()
    for s in scenes:
        image = render.render(s.objects)
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        colours = {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}
        assert colours <= allowed
        # Each object's colour is present and nothing else but the background.
        assert colours == {render.BACKGROUND} | {render.PALETTE[o.colour] for o in s.objects}
        seen |= colours
    assert seen == allowed


@pytest.mark.parametrize("resolution", [64, 128])
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("shape", render.SHAPES)
def test_bounding_box_side_and_fill(shape, size, resolution):
    rng = np.random.default_rng(0)
    side = render.SIZES[size] * resolution
    expected_fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
    for x, y in rng.uniform(0.3, 0.7, size=(10, 2)):
        mask = render.shape_mask(render.SceneObject(shape, "red", size, x, y), resolution)
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        # Pixel-centre sampling: the box spans side +- 1 px; the triangle loses up to a
        # pixel more at its sharp apex (no pixel centre that close to the tip) and base row.
        tol = 2 if shape == "triangle" else 1
        assert abs(h - side) <= tol and abs(w - side) <= tol
        assert mask.sum() == pytest.approx(expected_fill * side * side, rel=0.15)
        # The box centre is the object's centre within a pixel.
        assert abs((cols.min() + cols.max() + 1) / 2 - x * resolution) <= 1
        assert abs((rows.min() + rows.max() + 1) / 2 - y * resolution) <= 1


def test_triangle_is_upright_with_centred_apex():
    mask = render.shape_mask(render.SceneObject("triangle", "red", "large", 0.5, 0.5), 64)
    rows, cols = np.nonzero(mask)
    top = cols[rows == rows.min()]
    bottom = cols[rows == rows.max()]
    assert len(top) <= 2 and abs(top.mean() + 0.5 - 32) <= 0.5  # apex, centred
    assert len(bottom) >= 21  # flat base about 22.4 px wide


def test_objects_inside_separated_and_captions_true(scenes):
    families = [s.family for s in scenes]
    assert families == [render.FAMILIES[i % 4] for i in range(N)]
    for s in scenes:
        objs = s.objects
        assert all(render.inside(o) for o in objs)
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert render.separated(a, b, render.MIN_GAP)
        req = parse_prompt(s.caption)
        assert req.family == s.family
        if s.family == "single":
            (spec,) = req.objects
            (o,) = objs
            assert (o.shape, o.colour) == (spec.shape, spec.colour)
            assert spec.size in (None, o.size)
            if spec.place == "on the left":
                assert o.x < 0.4
            elif spec.place == "on the right":
                assert o.x > 0.6
            elif spec.place == "at the top":
                assert o.y < 0.4
            elif spec.place == "at the bottom":
                assert o.y > 0.6
        elif s.family == "relation":
            a, b = objs
            axis, sign = render.RELATIONS[req.relation]
            d = np.array([a.x - b.x, a.y - b.y])
            assert sign * d[axis] >= 0.25 and abs(d[1 - axis]) < 0.25
            assert [(a.shape, a.colour), (b.shape, b.colour)] == [
                (o.shape, o.colour) for o in req.objects]
        elif s.family == "counting":
            assert len(objs) == req.count
            assert {(o.shape, o.colour) for o in objs} == {(req.objects[0].shape, req.objects[0].colour)}
        else:
            a, b = objs
            assert a.colour != b.colour
            assert [(a.shape, a.colour), (b.shape, b.colour)] == [
                (o.shape, o.colour) for o in req.objects]


def test_gap_of_two_pixels_between_rendered_objects(scenes):
    """Every pair of objects is >= 2 px apart in the image (Chebyshev gap of 1+ px
    of background between their pixels along some axis)."""
    for s in scenes:
        masks = [render.shape_mask(o, 64) for o in s.objects]
        for i, a in enumerate(masks):
            for b in masks[i + 1:]:
                ra, ca = np.nonzero(a)
                rb, cb = np.nonzero(b)
                gap = max(rb.min() - ra.max(), ra.min() - rb.max(), cb.min() - ca.max(), ca.min() - cb.max())
                assert gap >= 2


def test_caption_vocabulary_covers_every_caption():
    vocab = render.caption_vocabulary()
    assert vocab == sorted(set(vocab))
    words = {w for i in range(400) for w in render.scene_at(1, 0, i).caption.split()}
    words |= {w for i in range(100) for w in render.motion_at(1, 0, i, 16).caption.split()}
    assert words <= set(vocab)
    assert {"above", "circles", "four", "moving", "cyan", "bottom"} <= set(vocab)


@pytest.mark.parametrize("num_frames", [16, 8])
def test_motion_constant_velocity_inside_and_apart(num_frames):
    for i in range(60):
        scene = render.motion_at(0, 0, i, num_frames)
        req = parse_prompt(scene.caption)
        assert [(o.shape, o.colour, o.direction) for o in scene.objects] == [
            (s.shape, s.colour, s.direction) for s in req.objects]
        video = render.render_video(scene.objects, num_frames, 64)
        assert video.shape == (num_frames, 64, 64, 3)
        for o in scene.objects:
            assert 1.5 / 64 <= o.speed <= 3 / 64
            frames = [o.at(t) for t in range(num_frames)]
            assert all(render.inside(f) for f in frames)
            # The rendered object moves >= 1.5 px per frame in its direction.
            cols = []
            for f in (frames[0], frames[-1]):
                r, c = np.nonzero(render.shape_mask(f, 64))
                cols.append(np.array([c.mean(), r.mean()]))
            vx, vy = render.VELOCITIES[o.direction]
            moved = (cols[1] - cols[0]) @ np.array([vx, vy]) / (num_frames - 1)
            assert moved >= 1.4  # 1.5 px/frame, within a pixel of rasterisation over the clip
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert all(render.separated(a.at(t), b.at(t)) for t in range(num_frames))


def test_too_many_frames_is_a_clear_error():
    with pytest.raises(ValueError, match="num_frames=40 leaves no room"):
        render.sample_motion(np.random.default_rng(0), 40)
