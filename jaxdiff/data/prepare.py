"""Prepares a dataset in array_record format for the grain pipeline.

    python -m jaxdiff.data.prepare shapes --data_dir DIR                 # 64px, 50k/1k/1k
    python -m jaxdiff.data.prepare shapes --data_dir DIR --resolution 32 --train_size 5000
    python -m jaxdiff.data.prepare moving_shapes --data_dir DIR --num_frames 8
    python -m jaxdiff.data.prepare mnist --data_dir DIR                  # any tfds catalog name

The built-in datasets are generated here, deterministically, with no download. A
catalog dataset is downloaded and prepared by tfds itself; tfds' image features need
TensorFlow to encode at prepare time (reading needs none).
"""
import argparse
import sys

import tensorflow_datasets as tfds

from jaxdiff import cli
from jaxdiff.data.moving_shapes import moving_shapes_config
from jaxdiff.data.shapes import shapes_config

_SIZES = ("train_size", "validation_size", "test_size", "seed")


def config_name(name: str, resolution: int | None = None, num_frames: int | None = None,
                **sizes) -> str:
    """The full `name/config` of a built-in dataset with these values (others default)."""
    given = {k: v for k, v in sizes.items() if v is not None}
    if name == "shapes":
        if num_frames is not None:
            raise ValueError("num_frames applies to moving_shapes, not shapes")
        return "shapes/" + shapes_config(64 if resolution is None else resolution, **given).name
    if name == "moving_shapes":
        return "moving_shapes/" + moving_shapes_config(64 if resolution is None else resolution,
                                                       16 if num_frames is None else num_frames, **given).name
    raise ValueError(f"{name!r} is not a built-in dataset; choose shapes or moving_shapes")


def prepare(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Generates (or downloads) `name` into `data_dir` as array_record; a no-op if done."""
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder


def _count(minimum: int):
    """argparse type: an int >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return parse


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m jaxdiff.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="shapes, moving_shapes (optionally name/config) or a tfds catalog name")
    p.add_argument("--data_dir", default=None, help="the tfds data_dir to write into (default: tfds' own, ~/tensorflow_datasets or $TFDS_DATA_DIR)")
    p.add_argument("--resolution", type=_count(1), help="built-in: image side (default 64)")
    p.add_argument("--num_frames", type=_count(1), help="moving_shapes: frames per video (default 16)")
    for k in _SIZES:
        p.add_argument(f"--{k}", type=_count(0 if k == "seed" else 1), help="built-in: examples per split / generator seed")
    args = p.parse_args(argv)
    custom = {k: getattr(args, k) for k in ("resolution", "num_frames", *_SIZES)}
    name = args.name
    if name in ("shapes", "moving_shapes"):
        try:
            name = config_name(name, **custom)
        except ValueError as e:
            p.error(str(e))
    elif any(v is not None for v in custom.values()):
        p.error(f"--resolution/--num_frames/--*_size/--seed apply to shapes and moving_shapes, "
                f"not {name!r}")
    try:
        builder = prepare(name, args.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        p.error(f"unknown dataset {name!r}: not in the tfds catalog nor prepared in "
                f"{args.data_dir}; built-in: shapes, moving_shapes")
    except ValueError as e:
        p.error(str(e))
    splits = ", ".join(f"{s}={i.num_examples}" for s, i in builder.info.splits.items())
    print(f"prepared {name} in {builder.data_dir} ({splits}); read it with "
          f"DataConfig(name={name!r}, data_dir={args.data_dir!r})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m jaxdiff.data.prepare"))
