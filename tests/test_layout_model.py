"""Caption -> layout: place classes, layout maps and targets in closed form, the transformer's causal slots and
padding mask, layout validity by the renderer's rules, and the recipe through the trainer."""
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
    layout_map,
    layout_report,
    layout_violations,
    object_at,
    place_class,
)
from jaxdiff.models.layout import (
    LayoutConfig,
    LayoutTransformer,
    RelativePlaceBias,
    layout_targets,
)
from jaxdiff.training import recipes, train
from jaxdiff.training.data import data_spec, make_batches, shapes_tokenizer

TOKENIZER = shapes_tokenizer({})


@pytest.fixture(scope="module")
def scenes():
    return [render.scene_at(0, 2, i) for i in range(200)]   # 50 per family


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
