"""The grain pipeline: built-in and catalog tfds datasets, folders, batches, errors, sharding."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import jaxdiff.data.pipeline  # noqa: F401  registers the builders
from jaxdiff.data import render
from jaxdiff.data.pipeline import DataConfig, global_batch, make_dataset, make_iterator, resize_crop
from tfds_fixtures import prepare_tfds

SHAPES = "shapes/64px-24-4-4-seed0"
VIDEOS = "moving_shapes/32px-8f-8-2-2-seed0"
DIGIT_NAMES = ["zero", "one", "two"]


class TinyDigits(tfds.core.GeneratorBasedBuilder):
    """A stand-in for a locally prepared catalog dataset (e.g. mnist): grey, non-square
    images under a different key, a ClassLabel, no captions, and a rank-1 field."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "img": tfds.features.Tensor(shape=(20, 30, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=DIGIT_NAMES),
            "vec": tfds.features.Tensor(shape=(5,), dtype=np.uint8),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12)}

    def _generate_examples(self, n):
        for i in range(n):
            # A vertical bar whose column encodes the index: crops are checkable.
            img = np.zeros((20, 30, 1), np.uint8)
            img[:, i] = 255
            yield i, {"img": img, "label": i % 3, "vec": np.full(5, i, np.uint8)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = prepare_tfds(tmp_path_factory, SHAPES, VIDEOS)
    TinyDigits(data_dir=d, file_format="array_record").download_and_prepare()
    return d


def test_shapes_batches_normalised_and_exact(data_dir):
    cfg = DataConfig(name=SHAPES, data_dir=data_dir, batch_size=8, num_epochs=1, shuffle=False)
    batches = list(make_iterator(cfg))
    assert len(batches) == 3  # 24 examples, drop_remainder
    source = tfds.data_source(SHAPES, data_dir=data_dir, split="train")
    for k, batch in enumerate(batches):
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 64, 64, 3)
        assert batch["caption"].shape == (8,)
        for j in range(8):
            raw = source[8 * k + j]
            # uint8 -> [-1, 1]: the background 235 maps to 235 / 127.5 - 1.
            np.testing.assert_allclose(batch["image"][j], raw["image"] / 127.5 - 1, atol=1e-6)
            assert batch["caption"][j] == raw["caption"].decode()
    images = np.concatenate([b["image"] for b in batches])
    assert images.min() >= -1 and images.max() <= 1
    assert np.isclose(images.max(), 235 / 127.5 - 1)  # the background is the brightest colour


def test_shuffle_is_seeded_and_epochs_reshuffle(data_dir):
    def captions(seed, epochs=1):
        cfg = DataConfig(name=SHAPES, data_dir=data_dir, batch_size=4, seed=seed, num_epochs=epochs)
        return [c for b in make_iterator(cfg) for c in b["caption"]]

    a, b, c = captions(0), captions(0), captions(1)
    assert a == b and a != c and sorted(a) == sorted(c)
    two = captions(0, epochs=2)
    assert len(two) == 48 and sorted(two[:24]) == sorted(two[24:]) and two[:24] != two[24:]


def test_tokenizer_and_videos(data_dir):
    vocab = render.caption_vocabulary()

    def tokenizer(captions):
        ids = [[1 + vocab.index(w) for w in c.split()][:12] for c in captions]
        return np.array([t + [0] * (12 - len(t)) for t in ids])

    cfg = DataConfig(name=VIDEOS, data_dir=data_dir, batch_size=4, resolution=16, crop="center")
    batch = next(make_iterator(cfg, tokenizer=tokenizer))
    assert batch["image"].shape == (4, 8, 16, 16, 3)
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (4, 12)
    first = batch["caption"][0].split()
    assert [vocab[t - 1] for t in batch["tokens"][0][:len(first)]] == first[:12]
    with pytest.raises(ValueError, match=r"tokenizer returned shape \(4,\)"):
        next(make_iterator(cfg, tokenizer=lambda caps: np.zeros(len(caps))))


def test_catalog_dataset_with_label_captions_and_crops(data_dir):
    cfg = DataConfig(name="tiny_digits", data_dir=data_dir, image_key="img", caption_key=None,
                     caption_template="a digit {label}", resolution=10, crop="center",
                     batch_size=12, num_epochs=1, shuffle=False)
    batch = next(make_iterator(cfg))
    assert batch["image"].shape == (12, 10, 10, 3)  # grey -> RGB, 20x30 -> 10x15 -> crop 10
    source = tfds.data_source("tiny_digits", data_dir=data_dir, split="train")
    assert list(batch["caption"]) == [f"a digit {DIGIT_NAMES[source[j]['label']]}" for j in range(12)]
    for j in range(12):
        raw = source[j]["img"]
        expected = resize_crop(np.repeat(raw, 3, -1), 10, "center", None) / 127.5 - 1
        np.testing.assert_allclose(batch["image"][j], expected, atol=1e-6)
    # 30 -> 15 wide, then the centre crop keeps resized columns 2..11 (original ~4..24):
    # bars in original columns 0 and 1 vanish, bars well inside survive (at about half
    # brightness after the 2x downscale).
    bright = batch["image"].max(axis=(1, 2, 3))
    col = np.array([source[j]["img"][0, :, 0].argmax() for j in range(12)])
    assert np.all(bright[col < 2] < -0.99) and np.all(bright[col >= 6] > -0.5)
    # 'none' squashes the whole frame: every bar survives.
    squash = next(make_iterator(DataConfig(**{**cfg.__dict__, "crop": "none"})))
    assert squash["image"].shape == (12, 10, 10, 3) and np.all(squash["image"].max(axis=(1, 2, 3)) > -0.5)
    # 'random' crops differ between examples but are seeded.
    rand = DataConfig(**{**cfg.__dict__, "crop": "random"})
    np.testing.assert_array_equal(next(make_iterator(rand))["image"], next(make_iterator(rand))["image"])


def test_unconditional_data_get_empty_captions(data_dir):
    cfg = DataConfig(name="tiny_digits", data_dir=data_dir, image_key="img", caption_key=None,
                     batch_size=4, num_epochs=1)
    assert list(next(make_iterator(cfg))["caption"]) == [""] * 4


def test_image_folder(tmp_path):
    for label in ("cats", "dogs"):
        (tmp_path / "train" / label).mkdir(parents=True)
    for i in range(6):
        label = ("cats", "dogs")[i % 2]
        Image.fromarray(np.full((12, 16, 3), 40 * i, np.uint8)).save(tmp_path / "train" / label / f"{i}.png")
    (tmp_path / "train" / "cats" / "0.txt").write_text("a black cat")
    cfg = DataConfig(name="folder", data_dir=str(tmp_path), resolution=8, batch_size=6,
                     shuffle=False, num_epochs=1)
    batch = next(make_iterator(cfg))
    assert batch["image"].shape == (6, 8, 8, 3)
    assert batch["caption"][0] == "a black cat" and set(batch["caption"][1:]) == {""}
    assert np.allclose(batch["image"][1], 80 / 127.5 - 1)  # cats/2.png, flat grey
    labelled = DataConfig(**{**cfg.__dict__, "caption_template": "a photo of {label}"})
    assert list(next(make_iterator(labelled))["caption"]) == ["a photo of cats"] * 3 + ["a photo of dogs"] * 3
    # A flat folder with a captions.txt, one line per image in sorted order.
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / f"{i}.png")
    (flat / "captions.txt").write_text("zero\none\ntwo\n")
    cfg = DataConfig(name="folder", data_dir=str(flat), batch_size=3, shuffle=False, num_epochs=1)
    assert list(next(make_iterator(cfg))["caption"]) == ["zero", "one", "two"]


def test_layout_maps_cover_the_rendered_shapes(data_dir):
    """layout=True adds each record's layout map: every pixel the renderer painted lies in a box of its colour's
    channel and the box channels hold nothing else than boxes (each channel's lit area is the union of its
    objects' boxes, whose pixel count follows from the box side: the rendered mask of a square is its box)."""
    from jaxdiff.data.layout import LAYOUT_CHANNELS, as_objects

    cfg = DataConfig(name=SHAPES, data_dir=data_dir, batch_size=8, num_epochs=1, shuffle=False, layout=True)
    batch = next(make_iterator(cfg))
    source = tfds.data_source(SHAPES, data_dir=data_dir, split="train")
    assert batch["layout"].shape == (8, 64, 64, LAYOUT_CHANNELS) and batch["layout"].dtype == np.float32
    for j in range(8):
        raw, maps = source[j], batch["layout"][j]
        objects = as_objects(raw["objects"])
        for colour_index, colour in enumerate(render.COLOURS):
            painted = (raw["image"] == render.PALETTE[colour]).all(-1)
            assert not (painted & (maps[..., colour_index] == 0)).any()
            boxes = np.zeros((64, 64), bool)
            for o in objects:
                if o.colour == colour:
                    boxes |= render.shape_mask(render.SceneObject("square", colour, o.size, o.x, o.y), 64)
            np.testing.assert_array_equal(maps[..., colour_index], boxes)
        shapes = maps[..., len(render.COLOURS):]
        np.testing.assert_array_equal(shapes.max(-1), maps[..., :len(render.COLOURS)].max(-1))


def test_video_layout_maps_follow_each_frame(data_dir):
    """layout=True on moving_shapes: frame t's map is the boxes of the objects where they are at frame t, and every
    pixel the renderer painted in frame t lies in its colour's box of that frame (and not in the next frame's)."""
    from jaxdiff.data.layout import LAYOUT_CHANNELS, as_trajectories

    cfg = DataConfig(name=VIDEOS, data_dir=data_dir, batch_size=4, num_epochs=1, shuffle=False, layout=True)
    batch = next(make_iterator(cfg))
    source = tfds.data_source(VIDEOS, data_dir=data_dir, split="train")
    assert batch["layout"].shape == (4, 8, 32, 32, LAYOUT_CHANNELS)
    moved = 0
    for j in range(4):
        raw, maps = source[j], batch["layout"][j]
        objects = as_trajectories(raw["objects"])
        for t in range(8):
            for o in objects:
                c = render.COLOURS.index(o.colour)
                painted = (raw["image"][t] == render.PALETTE[o.colour]).all(-1)
                assert painted.any() and not (painted & (maps[t, ..., c] == 0)).any()
                box = render.shape_mask(render.SceneObject("square", o.colour, o.size, *(
                    getattr(o.at(t), f) for f in "xy")), 32)
                assert (maps[t, ..., c][box] == 1).all()
                if t < 7:
                    moved += int((painted & (maps[t + 1, ..., c] == 0)).any())
    assert moved > 0   # the boxes move with the objects


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(data_dir="/no/such/dir"), FileNotFoundError,
     r"data_dir '/no/such/dir' does not exist; prepare it with `python -m jaxdiff.data.prepare shapes"),
    (dict(name="shapes/32px"), FileNotFoundError,
     r"'shapes/32px' is not prepared in .*python -m jaxdiff.data.prepare shapes/32px --data_dir"),
    (dict(name="no_such_dataset"), ValueError, r"unknown dataset 'no_such_dataset'"),
    (dict(image_key="picture"), ValueError,
     r"image_key 'picture' is not a field of 'shapes/64px-24-4-4-seed0'; its fields: caption, family, image, objects"),
    (dict(caption_key="text"), ValueError, r"caption_key 'text' is not a field"),
    (dict(name="tiny_digits", image_key="vec", caption_key=None), ValueError,
     r"field 'vec' has shape \(5,\) \(rank 1\); expected an image \[H, W\], \[H, W, C\] or a video"),
    (dict(split="train[:0]"), ValueError, r"split 'train\[:0\]' of 'shapes/64px-24-4-4-seed0' is empty"),
    (dict(split="valid"), ValueError, r"split 'valid' of .* does not exist; choose one of: "),
    (dict(crop="middle"), ValueError, r"unknown crop 'middle'; choose one of: center, random, none"),
    (dict(batch_size=64), ValueError, r"has 24 examples, fewer than one local batch \(64\)"),
    (dict(name="folder", data_dir="/no/such/folder"), FileNotFoundError, r"image folder '/no/such/folder' does not exist"),
    (dict(name="tiny_digits", image_key="img", caption_key=None, layout=True), ValueError,
     r"layout=True reads each record's 'objects', which 'tiny_digits' has not; its fields: img, label, vec"),
])
def test_errors_name_the_problem(data_dir, kwargs, error, message):
    cfg = DataConfig(**{"name": SHAPES, "data_dir": data_dir, "batch_size": 4, **kwargs})
    with pytest.raises(error, match=message):
        make_dataset(cfg)


def test_process_shards_are_disjoint_and_cover(data_dir):
    cfg = DataConfig(name=SHAPES, data_dir=data_dir, batch_size=4, num_epochs=1)
    shards = [[c for b in make_dataset(cfg, shard_index=i, shard_count=2) for c in b["caption"]]
              for i in range(2)]
    assert all(len(s) == 12 for s in shards)  # 2 examples per process per global batch of 4
    source = tfds.data_source(SHAPES, data_dir=data_dir, split="train")
    assert sorted(shards[0] + shards[1]) == sorted(r["caption"].decode() for r in source)


def test_worker_processes_give_the_same_batches(data_dir):
    cfg = DataConfig(name=SHAPES, data_dir=data_dir, batch_size=4, num_epochs=1)
    with_workers = make_iterator(DataConfig(**{**cfg.__dict__, "worker_count": 1}))
    try:
        for a, b in zip(make_iterator(cfg), with_workers):
            np.testing.assert_array_equal(a["image"], b["image"])
            assert list(a["caption"]) == list(b["caption"])
    finally:
        with_workers.close()


def test_global_batch_single_device():
    batch = {"image": np.ones((4, 8, 8, 3), np.float32), "caption": np.array(["a"] * 4)}
    out = global_batch(batch)
    assert out["image"].shape == (4, 8, 8, 3) and float(out["image"].sum()) == 4 * 8 * 8 * 3
    assert isinstance(out["caption"], np.ndarray)


def test_global_batch_on_eight_simulated_devices(data_dir):
    """The batch axis splits over a 'data' mesh axis of 8 CPU devices, values intact."""
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxdiff.data.pipeline import DataConfig, make_iterator, global_batches
        mesh = jax.make_mesh((8,), ("data",))
        cfg = DataConfig(name={SHAPES!r}, data_dir={data_dir!r}, batch_size=8, shuffle=False, num_epochs=1)
        local = next(make_iterator(cfg))
        batch = next(global_batches(iter([local]), NamedSharding(mesh, P("data"))))
        x = batch["image"]
        assert x.shape == (8, 64, 64, 3), x.shape
        assert len(x.addressable_shards) == 8
        assert {{s.data.shape for s in x.addressable_shards}} == {{(1, 64, 64, 3)}}
        np.testing.assert_array_equal(np.asarray(x), local["image"])
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
