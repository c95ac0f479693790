"""`shapes`: captioned images of coloured shapes, a tfds builder (no download, no TensorFlow).

    tfds.builder("shapes", data_dir=DIR).download_and_prepare()
    tfds.data_source("shapes", data_dir=DIR)["train"][i]
      -> {'image': uint8 [R, R, 3], 'caption': bytes, 'family': int,
          'objects': {'shape', 'colour', 'size': [int], 'x', 'y': [float32]}}

Configs are named `{R}px` (defaults: 50k/1k/1k examples, seed 0; presets 32px, 64px,
128px) or spell out every value: `{R}px-{train}-{validation}-{test}-seed{seed}`, e.g.
`shapes/64px-40-8-160-seed0`. Any such name works, so custom sizes round-trip
through a plain string. Example i of a split is `render.scene_at(seed, split_id, i)`,
so the same seed gives byte-identical records and every resolution the same captions.
"""
import dataclasses
import inspect
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxdiff.data import render

SPLITS = ("train", "validation", "test")  # split id = position, mixed into each example's seed
_OBJECT_LABELS = {"shape": render.SHAPES, "colour": render.COLOURS, "size": tuple(render.SIZES)}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Resolution, split sizes and seed of a procedurally generated dataset."""

    resolution: int = 64
    train_size: int = 50_000
    validation_size: int = 1_000
    test_size: int = 1_000
    seed: int = 0

    def split_size(self, split: str) -> int:
        return getattr(self, f"{split}_size")


_SHAPES_DEFAULTS = ShapesConfig(name="defaults")
_SHAPES_NAME = re.compile(r"^(\d+)px(?:-(\d+)-(\d+)-(\d+)-seed(\d+))?$")


def shapes_config(resolution: int = 64, train_size: int = 50_000, validation_size: int = 1_000,
                  test_size: int = 1_000, seed: int = 0) -> ShapesConfig:
    """A config whose name encodes all its values (short `{R}px` for the defaults)."""
    d = _SHAPES_DEFAULTS
    if (train_size, validation_size, test_size, seed) == (
            d.train_size, d.validation_size, d.test_size, d.seed):
        name = f"{resolution}px"
    else:
        name = f"{resolution}px-{train_size}-{validation_size}-{test_size}-seed{seed}"
    return ShapesConfig(name=name, resolution=resolution, train_size=train_size,
                        validation_size=validation_size, test_size=test_size, seed=seed)


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes array_record by default: random access for grain, readable without TensorFlow."""

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10's own code_path imports `importlib_resources`, which it declares
        # only for Python < 3.9, so builders in packages fail without it; our code is
        # always a plain file.
        return epath.Path(inspect.getfile(cls))

    @classmethod
    def parse_config_name(cls, name: str):
        raise NotImplementedError

    @classmethod
    def get_builder_config(cls, name: str, version=None):
        """Presets first, then any name in the config naming scheme."""
        return super().get_builder_config(name, version) or cls.parse_config_name(name)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: every example is generated
        cfg = self.builder_config
        return {s: self._generate_examples(i, cfg.split_size(s))
                for i, s in enumerate(SPLITS) if cfg.split_size(s) > 0}


def object_features(**extra) -> tfds.features.Sequence:
    """The structured object list: label fields, centre (fractions of W, H), extras."""
    fields = {k: tfds.features.ClassLabel(names=list(v)) for k, v in _OBJECT_LABELS.items()}
    fields.update(x=np.float32, y=np.float32, **extra)
    return tfds.features.Sequence(fields)


def object_record(obj) -> dict:
    return {"shape": obj.shape, "colour": obj.colour, "size": obj.size, "x": obj.x, "y": obj.y}


class Shapes(ArrayRecordBuilder):
    """Captioned images of filled shapes in four caption families (see jaxdiff.data.render)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [shapes_config(r) for r in (64, 32, 128)]
    DEFAULT_BUILDER_CONFIG_NAME = "64px"

    @classmethod
    def parse_config_name(cls, name: str):
        m = _SHAPES_NAME.match(name)
        if not m:
            return None
        values = [int(v) for v in m.groups() if v is not None]
        return shapes_config(*values)

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                # zlib: flat-colour images shrink ~20x; tfds decodes it without TensorFlow.
                "image": tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8, encoding="zlib"),
                "caption": tfds.features.Text(),
                "family": tfds.features.ClassLabel(names=list(render.FAMILIES)),
                "objects": object_features(),
            }),
            supervised_keys=("image", "caption"),
        )

    def _generate_examples(self, split_id: int, size: int):
        cfg = self.builder_config
        for i in range(size):
            scene = render.scene_at(cfg.seed, split_id, i)
            yield i, {
                "image": render.render(scene.objects, cfg.resolution),
                "caption": scene.caption,
                "family": scene.family,
                "objects": [object_record(o) for o in scene.objects],
            }
