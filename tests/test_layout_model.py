"""Caption -> layout: place classes, layout maps and targets in closed form, the transformer's causal slots and
padding mask, layout validity by the renderer's rules, and the recipe through the trainer; the same for the caption
-> trajectory model of moving_shapes captions (direction and speed classes, per-frame maps)."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import layout as layout_config
from jaxdiff.data import render
from jaxdiff.data.layout import (
    LAYOUT_CHANNELS,
    PLACE_CLASSES,
    SPEED_BINS,
    frame_violations,
    layout_map,
    layout_report,
    layout_violations,
    moving_at,
    object_at,
    on_grid,
    place_class,
    speed_class,
    trajectory_map,
)
from jaxdiff.models.layout import (
    LayoutConfig,
    LayoutTransformer,
    RelativePlaceBias,
    layout_targets,
    sample_layouts,
)
from jaxdiff.training import recipes, train
from jaxdiff.training.data import data_spec, make_batches, shapes_tokenizer

TOKENIZER = shapes_tokenizer({})


@pytest.fixture(scope="module")
def scenes():
    return [render.scene_at(0, 2, i) for i in range(200)]   # 50 per family


@pytest.fixture(scope="module")
def motion_scenes():
    return [render.motion_at(0, 2, i, 8) for i in range(100)]


@pytest.fixture(scope="module")
def tiny_motion_model():
    model = LayoutTransformer(LayoutConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=16, num_heads=2,
                                           intermediate_size=32, max_objects=3, num_frames=8))
    params = nn.meta.unbox(model.init(jax.random.key(0), *model.example_inputs()[0])["params"])
    return model, params


@pytest.fixture(scope="module")
def tiny_model():
    model = LayoutTransformer(LayoutConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=16, num_heads=2,
                                           intermediate_size=32))
    tokens = np.asarray(TOKENIZER(["a red circle"]), np.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens, np.zeros((1, 4, 3), np.int32))["params"])
    return model, params


def test_place_class_closed_form_and_round_trip(scenes):
    obj = render.SceneObject("circle", "red", "large", 0.5, 0.25)
    assert place_class(obj) == (1 * 32 + 8) * 32 + 16
    assert object_at(place_class(obj), "circle", "red") == render.SceneObject("circle", "red", "large", 16.5 / 32,
                                                                               8.5 / 32)
    # A small object in the corner bin stays in it; a large one's bin centre moves inside the canvas.
    assert object_at(0, "square", "blue") == render.SceneObject("square", "blue", "small", 0.1, 0.1)
    assert object_at(PLACE_CLASSES - 1, "square", "blue").x == pytest.approx(1 - 0.175)
    for obj in (o for s in scenes for o in s.objects):
        back = object_at(place_class(obj), obj.shape, obj.colour)
        assert place_class(back) == place_class(obj) and back.size == obj.size
        assert abs(back.x - obj.x) <= 1 / 64 and abs(back.y - obj.y) <= 1 / 64
    with pytest.raises(ValueError, match="place class 2048 is outside 0..2047"):
        object_at(PLACE_CLASSES, "circle", "red")


def test_layout_map_closed_form():
    """A small blue square centred in a 10x10 map covers pixels 4..5 (centres 0.45, 0.55 lie in [0.4, 0.6])."""
    out = layout_map([render.SceneObject("square", "blue", "small", 0.5, 0.5)], 10)
    want = np.zeros((10, 10, LAYOUT_CHANNELS), np.float32)
    want[4:6, 4:6, render.COLOURS.index("blue")] = 1
    want[4:6, 4:6, len(render.COLOURS) + render.SHAPES.index("square")] = 1
    np.testing.assert_array_equal(out, want)


def test_layout_targets_closed_form():
    a = render.SceneObject("triangle", "cyan", "small", 0.1, 0.9)
    b = render.SceneObject("circle", "red", "large", 0.5, 0.25)
    t = layout_targets([[a, b], [b]], max_objects=3)
    pa, pb = (28 * 32 + 3), (1 * 32 + 8) * 32 + 16
    np.testing.assert_array_equal(t["present"], [[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(t["colour"], [[5, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(t["shape"], [[2, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(t["place"], [[pa, pb, 0], [pb, 0, 0]])
    np.testing.assert_array_equal(t["previous"], [[[0, 0, 0], [5, 2, pa], [0, 0, pb]],
                                                  [[0, 0, 0], [0, 0, pb], [0, 0, 0]]])


def test_decoder_slots_are_causal(tiny_model):
    """Changing the inputs of slots k + 1.. leaves the logits of slots <= k as they were, and changes slot k + 1's."""
    model, params = tiny_model
    tokens = np.asarray(TOKENIZER(["three green circles", "a red circle above a blue square"]), np.int32)
    rng = np.random.default_rng(0)

    def random_previous():
        return np.stack([rng.integers(0, n, (2, 4)) for n in (6, 3, PLACE_CLASSES)], -1).astype(np.int32)

    previous = random_previous()
    base = model.apply({"params": params}, tokens, previous)
    for k in range(3):
        changed = previous.copy()
        changed[:, k + 1:] = random_previous()[:, k + 1:]
        out = model.apply({"params": params}, tokens, changed)
        np.testing.assert_allclose(np.exp(out["place"]).sum(-1), 1.0, rtol=1e-5)   # normalised log-probabilities
        for name in base:
            np.testing.assert_array_equal(out[name][:, :k + 1], base[name][:, :k + 1])
            assert not np.allclose(out[name][:, k + 1], base[name][:, k + 1])


def test_relative_place_bias_reads_each_earlier_object_offset():
    """At slot s, candidate (z, r, c): over the objects in slots 1..s, the maps rows[m, z, z_j, r - r_j + 31] *
    columns[m, z, z_j, c - c_j + 31] mixed by the slot's weights; here by slicing the profiles instead of gathering."""
    b, s, d = 2, 4, 8
    bias = RelativePlaceBias(LayoutConfig(vocab_size=10, hidden_size=d, num_heads=2, intermediate_size=d))
    x = jax.random.normal(jax.random.key(0), (b, s, d))
    places = np.asarray(jax.random.randint(jax.random.key(1), (b, s), 0, PLACE_CLASSES))
    params = nn.meta.unbox(bias.init(jax.random.key(2), x, places, 2)["params"])
    for i, name in enumerate(("rows", "columns")):
        params[name] = jax.random.normal(jax.random.key(3 + i), params[name].shape)
    got = bias.apply({"params": params}, x, places, 2)
    rows, columns = np.asarray(params["rows"]), np.asarray(params["columns"])
    weights = np.asarray(x @ params["weights"]["kernel"] + params["weights"]["bias"])
    want = np.zeros((b, s, 2, 32, 32), np.float32)
    for i in range(b):
        for t in range(1, s):
            zt, rest = divmod(int(places[i, t]), 32 * 32)
            rt, ct = divmod(rest, 32)
            window = rows[:, :, zt, 31 - rt:63 - rt, None] * columns[:, :, zt, None, 31 - ct:63 - ct]   # [M, Z, R, C]
            for k in range(t, s):
                want[i, k] += np.tensordot(weights[i, k], window, axes=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_the_logits(tiny_model):
    """The same caption padded to 16 or to 7 tokens gives the same logits; a changed word changes them."""
    model, params = tiny_model
    previous = np.zeros((1, 4, 3), np.int32)
    long = np.asarray(TOKENIZER(["a small red circle"]), np.int32)
    assert long.shape == (1, 16) and (long[0, 6:] == TOKENIZER.pad_token_id).all()
    a = model.apply({"params": params}, long, previous)
    b = model.apply({"params": params}, long[:, :7], previous)
    c = model.apply({"params": params}, np.asarray(TOKENIZER(["a large red circle"]), np.int32), previous)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
        assert not np.allclose(a[name], c[name])


def test_layout_report_scores_the_renderer_rules(scenes):
    captions = [s.caption for s in scenes]
    report = layout_report(captions, [s.objects for s in scenes])
    assert {f: report[f] for f in (*render.FAMILIES, "overall")} == dict.fromkeys((*render.FAMILIES, "overall"), 1.0)
    assert report["count"] == dict.fromkeys(render.FAMILIES, 50) and not any(report["failures"].values())

    # Mirrored along the relation's axis, every relation is reversed and nothing else breaks.
    relations = [s for s in scenes if s.family == "relation"]
    mirrored = []
    for s in relations:
        axis = render.RELATIONS[next(r for r in render.RELATIONS if r in s.caption)][0]
        field = "xy"[axis]
        mirrored.append([dataclasses.replace(o, **{field: 1 - getattr(o, field)}) for o in s.objects])
    report = layout_report([s.caption for s in relations], mirrored)
    assert report["relation"] == 0.0 and report["failures"] == {**dict.fromkeys(report["failures"], 0),
                                                                "relation": len(relations)}

    red, blue = (render.SceneObject("circle", c, "small", x, 0.5) for c, x in (("red", 0.2), ("blue", 0.3)))
    assert layout_violations("two red circles", [red]) == ["count"]
    assert layout_violations("a large red circle on the right", [red]) == ["size", "place"]
    assert layout_violations("a red circle and a blue circle", [blue, red]) == ["kind", "overlap"]


def test_training_examples_are_valid_on_the_grid_and_resume():
    """Each example's targets, read back as objects, are a layout of its caption that keeps every rule on the place
    grid; batch i is the same after a restore to index i."""
    batches, _ = make_batches(layout_config.get_config("tiny").data, 64, seed=3)
    first = [next(batches) for _ in range(2)]
    batches.set_state({"index": 1})
    for name, value in next(batches).items():
        np.testing.assert_array_equal(value, first[1][name])
    b = first[0]
    for i, tokens in enumerate(b["tokens"]):
        objects = [object_at(b["place"][i, k], render.SHAPES[b["shape"][i, k]], render.COLOURS[b["colour"][i, k]])
                   for k in np.flatnonzero(b["present"][i])]
        assert layout_violations(TOKENIZER.decode(tokens), objects) == []
    assert b["present"][:, 0].all() and b["present"][:, 3].any()   # some four-object counting scenes


def test_tiny_recipe_trains_and_its_loss_falls(tmp_path):
    c = layout_config.get_config("tiny")
    c.steps, c.checkpoint_every = 40, 0
    result = train(c, str(tmp_path))
    task = recipes.build(c, data_spec(c.data))
    batches, _ = make_batches(c.data, 256, seed=99)   # held-out batch of the same distribution
    batch = next(batches)
    before, parts_before = task.loss(nn.meta.unbox(task.init(jax.random.key(c.seed))), None, batch, None, 0)
    after, parts_after = task.loss(result.state.params, None, batch, None, 0)
    assert float(after) < float(before) - 5.0
    for part in ("loss_present", "loss_colour", "loss_shape"):
        assert float(parts_after[part]) < 0.7 * float(parts_before[part])


# ---------------------------------------------------------------- trajectories (moving_shapes)

def test_speed_classes_and_trajectories_closed_form(motion_scenes):
    lo, hi = render.MIN_SPEED, render.MAX_SPEED
    width = (hi - lo) / SPEED_BINS
    assert [speed_class(v) for v in (lo, lo + width * 1.5, hi, hi + 1)] == [0, 1, SPEED_BINS - 1, SPEED_BINS - 1]
    # A large circle in the right-most bin moving right for 8 frames at the slowest class's centre: its start moves
    # left until the last frame's box ends at the image's edge.
    obj = moving_at((1 * 32 + 16) * 32 + 31, 0, "right", "circle", "red", 8)
    assert obj.speed == pytest.approx(lo + width / 2) and obj.y == pytest.approx(16.5 / 32)
    assert obj.at(7).x + 0.175 == pytest.approx(1.0)
    # The fastest class is capped at the most a large object can travel in 16 frames.
    assert moving_at(1 * 32 * 32, SPEED_BINS - 1, "down", "square", "red", 16).speed == render.max_travel(16, "large")
    for scene in motion_scenes:
        for o, back in zip(scene.objects, on_grid(scene.objects, 8)):
            assert (back.direction, back.size) == (o.direction, o.size) and speed_class(back.speed) == speed_class(
                o.speed)
            assert all(render.inside(back.at(t)) for t in range(8))
    o = scene.objects[0]
    np.testing.assert_array_equal(trajectory_map([o], 8, 16)[5], layout_map([o.at(5)], 16))


def test_trajectory_violations(motion_scenes):
    report = layout_report([s.caption for s in motion_scenes], [s.objects for s in motion_scenes], 8)
    assert report["motion"] == 1.0 and report["count"] == {"motion": 100}
    one = next(s for s in motion_scenes if len(s.objects) == 1)
    o = one.objects[0]
    back = {"left": "right", "right": "left", "up": "down", "down": "up"}[o.direction]
    assert layout_violations(one.caption, [dataclasses.replace(o, direction=back)], 8)[0] == "direction"
    fast = render.MovingObject("circle", "red", "small", 0.5, 0.5, "left", 0.2)
    assert layout_violations("a red circle moving left", [fast], 8) == ["inside"]
    a = render.MovingObject("circle", "red", "small", 0.2, 0.5, "right", 0.08)
    b = render.MovingObject("square", "blue", "small", 0.8, 0.5, "left", 0.08)
    assert layout_violations("a red circle moving right and a blue square moving left", [a, b], 8) == ["overlap"]
    assert layout_violations("a red circle moving right and a blue square moving left", [a, b], 2) == []
    with pytest.raises(ValueError, match="motion caption: its trajectories need num_frames"):
        layout_violations(one.caption, one.objects)
    with pytest.raises(ValueError, match="trajectory direction 'sideways': choose one of: left, right, up, down"):
        layout_violations(one.caption, [dataclasses.replace(o, direction="sideways")], 8)
    with pytest.raises(ValueError, match=r"trajectory .*need a MovingObject or a dict with exactly the fields"):
        trajectory_map([{"shape": "circle"}], 8, 16)


def test_motion_targets_and_the_slot_own_motion_reaches_only_its_place(tiny_motion_model, motion_scenes):
    """layout_targets with motion: slot k's (direction, speed) in `current`, slot k - 1's after its place in
    `previous`. Changing slot k's `current` changes slot k's place logits only: direction, speed and the rest are
    read before it, and later slots see it only through `previous`."""
    two = next(s for s in motion_scenes if len(s.objects) == 2)
    t = layout_targets([two.objects], 3, motion=True)
    a, b = two.objects
    motion = lambda o: [render.DIRECTIONS.index(o.direction), speed_class(o.speed)]
    np.testing.assert_array_equal(t["current"][0], [motion(a), motion(b), [0, 0]])
    assert list(t["previous"][0, 1]) == [render.COLOURS.index(a.colour), render.SHAPES.index(a.shape),
                                         place_class(a.at(0)), *motion(a)]
    model, params = tiny_motion_model
    tokens = np.asarray(TOKENIZER([two.caption]), np.int32)
    base = model.apply({"params": params}, tokens, t["previous"], t["current"])
    assert set(base) == {"present", "colour", "shape", "place", "direction", "speed"}
    changed = t["current"].copy()
    changed[0, 1] = [(changed[0, 1, 0] + 1) % 4, (changed[0, 1, 1] + 3) % SPEED_BINS]
    out = model.apply({"params": params}, tokens, t["previous"], changed)
    for name in base:
        same = [0, 2] if name == "place" else [0, 1, 2]
        np.testing.assert_array_equal(out[name][:, same], base[name][:, same])
    assert not np.allclose(out["place"][:, 1], base["place"][:, 1])
    with pytest.raises(ValueError, match="a trajectory model .* needs `current`"):
        model.apply({"params": params}, tokens, t["previous"])
    with pytest.raises(ValueError, match="previous has 3 fields per slot; this model reads 5"):
        model.apply({"params": params}, tokens, t["previous"][..., :3], t["current"])


def test_sampled_trajectories_are_moving_objects_and_paths_that_meet_are_drawn_again(tiny_motion_model,
                                                                                       motion_scenes):
    """A layout whose paths meet in some frame is replaced by the batch's next draw (key fold_in(key, slots + a)),
    the others kept as drawn."""
    model, params = tiny_motion_model
    captions = [s.caption for s in motion_scenes if len(s.objects) == 2][:16]
    tokens, key = np.asarray(TOKENIZER(captions), np.int32), jax.random.key(0)
    first = sample_layouts(model, params, tokens, key, redraws=0)
    second = sample_layouts(model, params, tokens, jax.random.fold_in(key, 3), redraws=0)
    got = sample_layouts(model, params, tokens, key, redraws=1)
    met = lambda objects: frame_violations([[o.at(t) for o in objects] for t in range(8)])
    assert any(met(objects) for objects in first) and not all(met(objects) for objects in first)
    for i, objects in enumerate(got):
        assert objects == (second[i] if met(first[i]) else first[i])
        for o in objects:
            assert isinstance(o, render.MovingObject) and o.direction in render.DIRECTIONS
            assert render.MIN_SPEED <= o.speed <= render.MAX_SPEED
            assert all(render.inside(o.at(t)) for t in range(8))
    with pytest.raises(ValueError, match="redraws=-1: need a non-negative int"):
        sample_layouts(model, params, tokens, key, redraws=-1)


def test_tiny_motion_recipe_trains(tmp_path):
    c = layout_config.get_config("tiny_motion")
    c.steps, c.checkpoint_every = 40, 0
    result = train(c, str(tmp_path))
    task = recipes.build(c, data_spec(c.data))
    batch = next(make_batches(c.data, 256, seed=99)[0])
    assert batch["current"].shape == (256, 4, 2)
    before, parts_before = task.loss(nn.meta.unbox(task.init(jax.random.key(c.seed))), None, batch, None, 0)
    after, parts_after = task.loss(result.state.params, None, batch, None, 0)
    assert float(after) < float(before) - 3.0
    assert float(parts_after["loss_present"]) < 0.5 * float(parts_before["loss_present"])
    for part in ("loss_colour", "loss_shape", "loss_direction", "loss_speed"):   # 40 steps: each on its way down
        assert float(parts_after[part]) < 0.9 * float(parts_before[part])
