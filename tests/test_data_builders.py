"""The tfds builders: registration, records, config names, byte-identical regeneration."""
import glob
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxdiff.data.pipeline  # noqa: F401  registers the builders
from jaxdiff.data import render
from jaxdiff.data.prepare import config_name, main as prepare_main

SHAPES = "shapes/64px-12-4-8-seed0"
VIDEOS = "moving_shapes/32px-8f-6-2-2-seed0"


def prepare(name, data_dir):
    tfds.builder(name, data_dir=str(data_dir)).download_and_prepare()


def record_files(data_dir, name):
    files = sorted(glob.glob(os.path.join(str(data_dir), name, "*", "*", "*.array_record-*")))
    return {os.path.basename(f): open(f, "rb").read() for f in files}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    prepare(SHAPES, d)
    prepare(VIDEOS, d)
    return d


def test_registered_with_tfds():
    assert {"shapes", "moving_shapes"} <= set(tfds.list_builders(with_community_datasets=False))
    assert tfds.builder_cls("shapes").builder_configs["64px"].train_size == 50_000
    # Any config name in the naming scheme resolves, so custom sizes round-trip.
    b = tfds.builder("shapes/48px-3-2-1-seed5", data_dir="/nonexistent")
    assert (b.builder_config.resolution, b.builder_config.train_size, b.builder_config.seed) == (48, 3, 5)
    with pytest.raises(ValueError, match="BuilderConfig 64pixels not found"):
        tfds.builder("shapes/64pixels")


def test_shapes_records(data_dir):
    ds = tfds.data_source(SHAPES, data_dir=str(data_dir), download=False)
    assert {s: len(v) for s, v in ds.items()} == {"train": 12, "validation": 4, "test": 8}
    captions = set()
    for r in ds["test"]:
        assert r["image"].dtype == np.uint8 and r["image"].shape == (64, 64, 3)
        caption = r["caption"].decode()
        captions.add(caption)
        # The structured record renders back to the stored image, byte for byte.
        objs = [render.SceneObject(render.SHAPES[s], render.COLOURS[c], list(render.SIZES)[z], x, y)
                for s, c, z, x, y in zip(*(r["objects"][k] for k in ("shape", "colour", "size", "x", "y")))]
        np.testing.assert_array_equal(render.render(objs, 64), r["image"])
        assert render.FAMILIES[r["family"]] == jaxdiff.data.parse_prompt(caption).family
    # The split holds exactly the scenes of (seed 0, split id 2), in tfds' shuffled order.
    assert captions == {render.scene_at(0, 2, i).caption for i in range(8)}


def test_moving_shapes_records(data_dir):
    ds = tfds.data_source(VIDEOS, data_dir=str(data_dir), split="train", download=False)
    assert len(ds) == 6
    for r in ds:
        video = r["image"]
        assert video.dtype == np.uint8 and video.shape == (8, 32, 32, 3)
        assert not np.array_equal(video[0], video[-1])  # things move
        n = len(r["objects"]["direction"])
        assert r["caption"].decode().count(" moving ") == n and n in (1, 2)
        assert all(s >= 1.5 / 64 for s in r["objects"]["speed"])


def test_same_seed_byte_identical_other_seed_differs(data_dir, tmp_path):
    prepare(SHAPES, tmp_path / "again")
    prepare(SHAPES.replace("seed0", "seed1"), tmp_path / "other")
    first, again = record_files(data_dir, "shapes"), record_files(tmp_path / "again", "shapes")
    assert len(first) == 3 and first == again
    other = record_files(tmp_path / "other", "shapes")
    a = tfds.data_source(SHAPES, data_dir=str(data_dir), split="train")
    b = tfds.data_source(SHAPES.replace("seed0", "seed1"), data_dir=str(tmp_path / "other"), split="train")
    assert {r["caption"] for r in a} != {r["caption"] for r in b}
    assert list(first.values()) != list(other.values())


def test_prepare_command(tmp_path, capsys):
    assert prepare_main(["moving_shapes", "--data_dir", str(tmp_path), "--resolution", "32",
                         "--num_frames", "8", "--train_size", "2", "--validation_size", "1",
                         "--test_size", "1"]) == 0
    assert "moving_shapes/32px-8f-2-1-1-seed0" in capsys.readouterr().out
    assert len(tfds.data_source("moving_shapes/32px-8f-2-1-1-seed0", data_dir=str(tmp_path),
                                split="train")) == 2
    assert config_name("shapes") == "shapes/64px"
    assert config_name("moving_shapes", 32, 8) == "moving_shapes/32px-8f"
    with pytest.raises(SystemExit):
        prepare_main(["shapes", "--data_dir", str(tmp_path), "--num_frames", "8"])
    assert "num_frames applies to moving_shapes" in capsys.readouterr().err
