"""`moving_shapes`: captioned videos of shapes moving at constant velocity, a tfds builder.

    tfds.data_source("moving_shapes", data_dir=DIR)["train"][i]
      -> {'image': uint8 [T, R, R, 3], 'caption': bytes,
          'objects': {'shape', 'colour', 'size', 'direction': [int],
                      'x', 'y' (centre in frame 0), 'speed' (image sides / frame): [float32]}}

Captions: "a {colour} {shape} moving {left|right|up|down}", and two-object versions
joined by "and". Frame 0 doubles as the conditioning image for image-to-video.
Configs are named `{R}px-{T}f` (defaults 10k/500/500 examples, seed 0; presets
64px-16f, 32px-16f, 32px-8f) or `{R}px-{T}f-{train}-{validation}-{test}-seed{seed}`.
"""
import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from jaxdiff.data import render
from jaxdiff.data.shapes import ArrayRecordBuilder, ShapesConfig, object_features, object_record


@dataclasses.dataclass(eq=False)
class MovingShapesConfig(ShapesConfig):
    num_frames: int = 16
    train_size: int = 10_000
    validation_size: int = 500
    test_size: int = 500


_DEFAULTS = MovingShapesConfig(name="defaults")
_NAME = re.compile(r"^(\d+)px-(\d+)f(?:-(\d+)-(\d+)-(\d+)-seed(\d+))?$")


def moving_shapes_config(resolution: int = 64, num_frames: int = 16, train_size: int = 10_000,
                         validation_size: int = 500, test_size: int = 500,
                         seed: int = 0) -> MovingShapesConfig:
    """A config whose name encodes all its values (short `{R}px-{T}f` for the defaults)."""
    name = f"{resolution}px-{num_frames}f"
    d = _DEFAULTS
    if (train_size, validation_size, test_size, seed) != (
            d.train_size, d.validation_size, d.test_size, d.seed):
        name += f"-{train_size}-{validation_size}-{test_size}-seed{seed}"
    # Fail at config time, not half-way through generation, when objects cannot move.
    render.movable_sizes(num_frames)
    return MovingShapesConfig(name=name, resolution=resolution, num_frames=num_frames,
                              train_size=train_size, validation_size=validation_size,
                              test_size=test_size, seed=seed)


def frames_of(name: str) -> int | None:
    """The frames per clip of tfds dataset `name` if it is a `moving_shapes/{R}px-{T}f...` config, else None."""
    dataset, _, config = (name or "").partition("/")
    m = _NAME.match(config) if dataset == "moving_shapes" else None
    return int(m.group(2)) if m else None


class MovingShapes(ArrayRecordBuilder):
    """Captioned videos: one or two shapes moving left, right, up or down."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [moving_shapes_config(r, t) for r, t in ((64, 16), (32, 16), (32, 8))]
    DEFAULT_BUILDER_CONFIG_NAME = "64px-16f"

    @classmethod
    def parse_config_name(cls, name: str):
        m = _NAME.match(name)
        if not m:
            return None
        return moving_shapes_config(*[int(v) for v in m.groups() if v is not None])

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        shape = (cfg.num_frames, cfg.resolution, cfg.resolution, 3)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
                "caption": tfds.features.Text(),
                "objects": object_features(
                    direction=tfds.features.ClassLabel(names=list(render.DIRECTIONS)),
                    speed=np.float32),
            }),
            supervised_keys=("image", "caption"),
        )

    def _generate_examples(self, split_id: int, size: int):
        cfg = self.builder_config
        for i in range(size):
            scene = render.motion_at(cfg.seed, split_id, i, cfg.num_frames)
            yield i, {
                "image": render.render_video(scene.objects, cfg.num_frames, cfg.resolution),
                "caption": scene.caption,
                "objects": [dict(object_record(o), direction=o.direction, speed=o.speed)
                            for o in scene.objects],
            }
