"""Cross-attention grounding: which pixels each caption word describes (data), the grounding loss (closed
forms), and the attention weights the U-Net's cross-attention sows (a second path through its params)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses
from jaxdiff.data import grounding, render
from jaxdiff.data.pipeline import DataConfig, make_dataset
from jaxdiff.data.shapes import object_record, scene_objects
from jaxdiff.models.layers import Attention
from jaxdiff.tokenizers import WordTokenizer
from tfds_fixtures import prepare_tfds

SHAPES = "shapes/32px-16-2-2-seed0"


@pytest.mark.parametrize("caption, n, expected", [
    ("a large red triangle on the left", 1, [(), (0,), (0,), (0,), (), (), (0,)]),
    ("a red circle above a blue square", 2, [(), (0,), (0,), (0,), (), (1,), (1,)]),
    ("a red circle to the left of a blue square", 2, [(), (0,), (0,), (), (), (0,), (), (), (1,), (1,)]),
    ("three green circles", 3, [(0, 1, 2)] * 3),
    ("a red circle and a blue square", 2, [(), (0,), (0,), (), (), (1,), (1,)]),
])
def test_each_word_describes_its_phrase_objects(caption, n, expected):
    assert grounding.word_objects(caption, n) == expected


def test_word_objects_refuses_a_caption_that_does_not_fit_its_objects():
    with pytest.raises(ValueError, match="2 phrases starting with 'a'.*for 3 objects"):
        grounding.word_objects("a red circle and a blue square", 3)


def test_token_masks_are_the_shapes_of_each_tokens_objects():
    """Token i + 1 is word i: its mask is the union of render.shape_mask of its objects; BOS, function words and
    padding are empty. The tokenizer agrees on the positions."""
    scene = render.scene_at(0, 0, 1)        # family 1: a relation, two objects
    assert scene.family == "relation"
    masks = grounding.token_masks(scene.objects, scene.caption, 16, 16)
    first, second = (render.shape_mask(o, 16).astype(np.float32) for o in scene.objects)
    ids = WordTokenizer.from_captions()([scene.caption])[0]
    words = scene.caption.split()
    assert masks.shape == (16, 16, 16) and first.sum() > 0 and second.sum() > 0
    for i, owners in enumerate(grounding.word_objects(scene.caption, 2)):
        want = {(): np.zeros_like(first), (0,): first, (1,): second}[owners]
        np.testing.assert_array_equal(masks[i + 1], want, err_msg=words[i])
        assert ids[i + 1] >= 4     # a word, not a special token
    assert not masks[0].any() and not masks[len(words) + 1:].any()
    # counting: every content word covers all objects
    counting = render.scene_at(0, 0, 2)
    assert counting.family == "counting"
    union = np.max([render.shape_mask(o, 8) for o in counting.objects], axis=0)
    np.testing.assert_array_equal(grounding.token_masks(counting.objects, counting.caption, 8, 16)[1], union)


def test_scene_objects_read_a_record_back():
    scene = render.scene_at(0, 0, 3)
    fields = [object_record(o) for o in scene.objects]
    record = {k: [f[k] for f in fields] for k in fields[0]}
    names = {"shape": render.SHAPES, "colour": render.COLOURS, "size": tuple(render.SIZES)}
    record = {k: [names[k].index(v) for v in vs] if k in names else vs for k, vs in record.items()}
    assert scene_objects(record) == list(scene.objects)


def test_pipeline_adds_token_masks_of_each_record(tmp_path_factory):
    data_dir = prepare_tfds(tmp_path_factory, SHAPES)
    cfg = DataConfig(name=SHAPES, data_dir=data_dir, batch_size=4, shuffle=False)
    batch = next(iter(make_dataset(cfg, WordTokenizer.from_captions(), extras=grounding.TokenMasks(16, 16))))
    assert batch["token_masks"].shape == (4, 16, 16, 16) and batch["token_masks"].dtype == np.float32
    scenes = [render.scene_at(0, 0, i) for i in range(16)]     # captions repeat; images tell the scenes apart
    by_image = {render.render(s.objects, 32).tobytes(): s for s in scenes}
    for image, masks in zip(batch["image"], batch["token_masks"]):
        scene = by_image[np.round((image + 1) * 127.5).astype(np.uint8).tobytes()]
        np.testing.assert_array_equal(masks, grounding.token_masks(scene.objects, scene.caption, 16, 16))


# ---------------------------------------------------------------- the loss

def _masks():
    """Two examples, 3 tokens, R = 4: token 1 of example 0 owns the left half, token 2 of example 1 the top-left
    quarter; everything else is ungrounded."""
    m = np.zeros((2, 3, 4, 4), np.float32)
    m[0, 1, :, :2] = 1
    m[1, 2, :2, :2] = 1
    return jnp.asarray(m)


def test_grounding_loss_closed_forms():
    masks = _masks()
    # Uniform attention over tokens: each token's share inside its region is the region's area.
    uniform = jnp.full((2, 2, 16, 3), 1 / 3)
    want = ((1 - 0.5) ** 2 + (1 - 0.25) ** 2) / 2
    np.testing.assert_allclose(losses.grounding_loss([uniform], masks), want, rtol=1e-6)
    # The same at a 2x2 map (masks area-averaged), and averaged over maps.
    np.testing.assert_allclose(losses.grounding_loss([uniform, jnp.full((2, 1, 4, 3), 1 / 3)], masks), want,
                               rtol=1e-6)
    # Attention of each grounded token only inside its region: 0, whatever the other tokens do.
    inside = np.full((2, 1, 16, 3), 0.5, np.float32)
    inside[0, 0, :, 1] = np.tile([1, 1, 0, 0], 4)        # left half (row-major 4x4)
    inside[1, 0, :, 2] = np.r_[[1, 1, 0, 0], [1, 1, 0, 0], np.zeros(8)]
    np.testing.assert_allclose(losses.grounding_loss([jnp.asarray(inside)], masks), 0.0, atol=1e-7)
    # Dropping example 1 leaves example 0's token alone.
    np.testing.assert_allclose(losses.grounding_loss([uniform], masks, counted=jnp.array([True, False])), 0.25,
                               rtol=1e-6)
    np.testing.assert_allclose(losses.grounding_loss([uniform], masks, counted=jnp.array([False, False])), 0.0)


def test_grounding_loss_errors():
    with pytest.raises(ValueError, match="no cross-attention weights"):
        losses.grounding_loss([], _masks())
    with pytest.raises(ValueError, match=r"do not fit masks \(2, 3, 4, 4\)"):
        losses.grounding_loss([jnp.ones((2, 1, 9, 3))], _masks())


def test_cross_attention_sows_its_softmax_weights():
    """The sown weights are softmax(q k^T / sqrt(d)) of the module's own projections (computed here by hand), the
    output is unchanged by sowing, and self-attention sows nothing."""
    attn = Attention(heads=2, head_dim=4, out_features=8)
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    ctx = jax.random.normal(jax.random.key(1), (3, 7, 8))
    params = nn.meta.unbox(attn.init(jax.random.key(2), x, ctx)["params"])
    out, state = attn.apply({"params": params}, x, ctx, mutable=["intermediates"])
    (weights,) = state["intermediates"]["cross_attention"]
    q = (x @ params["to_q"]["kernel"]).reshape(3, 5, 2, 4)
    k = (ctx @ params["to_k"]["kernel"]).reshape(3, 7, 2, 4)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    want = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(weights, want / want.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, attn.apply({"params": params}, x, ctx), rtol=1e-6)
    _, state = attn.apply({"params": params}, x, mutable=["intermediates"])
    assert not state.get("intermediates")
