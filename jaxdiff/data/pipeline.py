"""The grain input pipeline: a tfds dataset (built-in or any locally prepared catalog
dataset) or a folder of images -> shuffled, decoded, normalised, tokenised batches,
laid out as global arrays for the mesh.

No TensorFlow: records come from `tfds` array_record data sources (random access), and
grain does the rest (shuffle, map, batch, worker processes).

    cfg = DataConfig(name="shapes", data_dir=DIR, batch_size=64)
    for batch in global_batches(make_iterator(cfg, tokenizer), sharding):
        batch["image"]    # jax.Array float32 [B, H, W, 3] in [-1, 1] ([B, T, H, W, 3] for videos)
        batch["tokens"]   # jax.Array int32 [B, L] (only with a tokenizer)
        batch["caption"]  # np.ndarray of str [B], stays on the host

For videos, frame 0 (`batch["image"][:, 0]`) is the conditioning image for image-to-video.
"""
import dataclasses
import os
from typing import Callable, Iterator

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxdiff.data import moving_shapes, shapes  # noqa: F401  registers the builders that tfds.builder finds
from jaxdiff.data.layout import layout_map, trajectory_map

CROPS = ("center", "random", "none")
BUILT_IN = ("shapes", "moving_shapes")
FOLDER = "folder"
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data come from and how they become batches.

    name: a tfds dataset name, optionally with its config ("shapes", "shapes/32px",
      "mnist", "cifar10", "celeb_a"), or "folder" for a folder of images.
    data_dir: the tfds data_dir it was prepared into (None: tfds' default), or the folder.
    image_key / caption_key: record fields. caption_key=None or caption_template set:
      captions are `caption_template.format(label=...)` from `label_key` (a ClassLabel's
      name when the field has names), or "" without a template (unconditional data).
    resolution: output side; None keeps the stored size (all images must then agree).
    crop: "center" / "random" square crop after resizing the shorter side to
      `resolution`, or "none" to resize the whole image to resolution x resolution.
    batch_size: the *global* batch; each of the jax processes reads its own shard and
      batch_size / process_count examples of it per step.
    num_epochs: None repeats forever.
    worker_count: grain worker processes (0 reads in this process with threads).
    layout: also give 'layout' float32 [B, H, W, LAYOUT_CHANNELS], the layout map of each record's
      `objects` (`jaxdiff.data.layout.layout_map`; the built-in datasets' object lists), or for videos [B, T, H,
      W, LAYOUT_CHANNELS], each frame's (`trajectory_map` of moving_shapes' moving objects).
    """

    name: str = "shapes"
    data_dir: str | None = None
    split: str = "train"
    image_key: str = "image"
    caption_key: str | None = "caption"
    label_key: str = "label"
    caption_template: str | None = None
    resolution: int | None = None
    crop: str = "center"
    batch_size: int = 64
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    drop_remainder: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 4
    layout: bool = False


def prepare_hint(name: str, data_dir: str | None) -> str:
    base = name.split("/")[0]
    where = f" --data_dir {data_dir}" if data_dir else ""
    if base in BUILT_IN:
        return f"prepare it with `python -m jaxdiff.data.prepare {name}{where}`"
    return (f"prepare it with `python -m jaxdiff.data.prepare {name}{where}` (array_record "
            f"format; catalog datasets need their download and, for tfds image features, "
            f"TensorFlow at prepare time only)")


# ---------------------------------------------------------------- sources

class FolderSource:
    """A folder of images as a random-access source of {'image', 'caption', 'label'}.

    Images (png/jpg/bmp/webp) directly in the folder, or in one subfolder per class
    (ImageFolder layout; the subfolder name is the label). Captions, optional, from a
    sidecar `NAME.txt` or a `captions.txt` with one line per image in sorted path order.
    """

    def __init__(self, folder: str):
        files = sorted(os.path.relpath(os.path.join(d, f), folder)
                       for d, _, fs in os.walk(folder) for f in fs
                       if f.lower().endswith(IMAGE_FILES))
        self.folder, self.files = folder, files
        self.label_names = sorted({os.path.dirname(f) for f in files} - {""})
        listing = os.path.join(folder, "captions.txt")
        self.captions = None
        if os.path.exists(listing):
            with open(listing) as f:
                self.captions = [line.rstrip("\n") for line in f]
            if len(self.captions) != len(files):
                raise ValueError(f"{listing} has {len(self.captions)} lines for {len(files)} "
                                 "images; write one caption per image, in sorted path order")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = os.path.join(self.folder, self.files[i])
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        sidecar = os.path.splitext(path)[0] + ".txt"
        if self.captions is not None:
            caption = self.captions[i]
        elif os.path.exists(sidecar):
            with open(sidecar) as f:
                caption = f.read().strip()
        else:
            caption = ""
        label = os.path.dirname(self.files[i])
        return {"image": image, "caption": caption,
                "label": self.label_names.index(label) if label else -1}


def _folder_source(cfg: DataConfig):
    if not cfg.data_dir or not os.path.isdir(cfg.data_dir):
        raise FileNotFoundError(f"image folder {cfg.data_dir!r} does not exist; set data_dir "
                                "to a folder of images (png/jpg), optionally one subfolder per class")
    root = os.path.join(cfg.data_dir, cfg.split)
    source = FolderSource(root if os.path.isdir(root) else cfg.data_dir)
    if len(source) == 0:
        raise ValueError(f"image folder {source.folder!r} is empty: no {', '.join(IMAGE_FILES)} files")
    return source, (source.label_names or None)


def _tfds_source(cfg: DataConfig):
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise FileNotFoundError(f"data_dir {cfg.data_dir!r} does not exist; "
                                f"{prepare_hint(cfg.name, cfg.data_dir)}")
    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"unknown dataset {cfg.name!r}: neither a tfds catalog name nor "
                         f"prepared in data_dir {cfg.data_dir!r}; built-in: "
                         f"{', '.join(BUILT_IN)}, or name='{FOLDER}' for an image folder") from e
    if not builder.is_prepared():
        raise FileNotFoundError(f"dataset {cfg.name!r} is not prepared in {builder.data_dir}; "
                                f"{prepare_hint(cfg.name, cfg.data_dir)}")
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(f"dataset {cfg.name!r} in {builder.data_dir} is stored as "
                         f"{builder.info.file_format.value}; random access needs array_record: "
                         f"{prepare_hint(cfg.name, cfg.data_dir)}")
    splits = list(builder.info.splits)
    try:
        n = builder.info.splits[cfg.split].num_examples
    except (KeyError, ValueError) as e:
        raise ValueError(f"split {cfg.split!r} of {cfg.name!r} does not exist; choose one of: "
                         f"{', '.join(splits)} (slices like 'train[:90%]' work too)") from e
    if n == 0:
        raise ValueError(f"split {cfg.split!r} of {cfg.name!r} is empty")
    features = builder.info.features
    if cfg.image_key not in features:
        raise ValueError(f"image_key {cfg.image_key!r} is not a field of {cfg.name!r}; "
                         f"its fields: {', '.join(sorted(features))}")
    label = features[cfg.label_key] if cfg.label_key in features else None
    names = list(label.names) if isinstance(label, tfds.features.ClassLabel) else None
    return builder.as_data_source(split=cfg.split), names


def open_source(cfg: DataConfig):
    """(random-access source of raw records, label names or None), validated."""
    if cfg.crop not in CROPS:
        raise ValueError(f"unknown crop {cfg.crop!r}; choose one of: {', '.join(CROPS)}")
    return _folder_source(cfg) if cfg.name == FOLDER else _tfds_source(cfg)


# ---------------------------------------------------------------- per-example transforms

def as_rgb_uint8(image, key: str = "image") -> np.ndarray:
    """A stored image or video -> uint8 [H, W, 3] or [T, H, W, 3].

    Accepts encoded PNG/JPEG bytes, [H, W] and [H, W, 1] (grey), [..., 3] and
    [..., 4] (alpha dropped).
    """
    if isinstance(image, bytes):
        import io
        with Image.open(io.BytesIO(image)) as im:
            image = np.asarray(im.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"field {key!r} has dtype {image.dtype}; expected uint8 images")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim not in (3, 4):
        raise ValueError(f"field {key!r} has shape {image.shape} (rank {image.ndim}); expected an "
                         "image [H, W], [H, W, C] or a video [T, H, W, C]")
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels in (3, 4):
        return image[..., :3]
    raise ValueError(f"field {key!r} has {channels} channels (shape {image.shape}); expected 1, 3 or 4")


def resize_crop(image: np.ndarray, resolution: int, crop: str, rng: np.random.Generator | None):
    """uint8 [..., H, W, 3] -> [..., R, R, 3]. 'center'/'random': scale the shorter side
    to R, then crop; 'none': scale the whole frame to R x R."""
    h, w = image.shape[-3:-1]
    if (h, w) == (resolution, resolution):
        return image
    if crop == "none":
        size = (resolution, resolution)
    else:
        s = resolution / min(h, w)
        size = (max(resolution, round(w * s)), max(resolution, round(h * s)))
    frames = image.reshape(-1, h, w, 3)
    frames = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames])
    if crop != "none":
        dy, dx = size[1] - resolution, size[0] - resolution
        if crop == "random":
            y, x = int(rng.integers(dy + 1)), int(rng.integers(dx + 1))
        else:
            y, x = dy // 2, dx // 2
        frames = frames[:, y:y + resolution, x:x + resolution]
    return frames.reshape(image.shape[:-3] + frames.shape[1:])


def normalise(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """A raw record -> {'image': float32 [-1, 1], 'caption': str}. A picklable class so grain can ship it
    to worker processes."""

    image_key: str
    caption_key: str | None
    label_key: str
    caption_template: str | None
    label_names: tuple | None
    resolution: int | None
    crop: str
    layout: bool = False

    def caption(self, record: dict) -> str:
        if self.caption_template is not None:
            label = record[self.label_key]
            name = self.label_names[int(label)] if self.label_names else label
            return self.caption_template.format(label=name)
        if self.caption_key is None:
            return ""
        text = record[self.caption_key]
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        image = as_rgb_uint8(record[self.image_key], self.image_key)
        if self.resolution is not None:
            image = resize_crop(image, self.resolution, self.crop, rng)
        out = {"image": normalise(image), "caption": self.caption(record)}
        if self.layout:
            objects = record["objects"]   # a video's: moving_shapes' trajectories, drawn frame by frame
            out["layout"] = (trajectory_map(objects, image.shape[0], image.shape[-2]) if image.ndim == 4
                             else layout_map(objects, image.shape[-2]))
        return out


@dataclasses.dataclass(frozen=True)
class Tokenize:
    """Adds 'tokens': int32 [B, L] = tokenizer(list of B captions)."""

    tokenizer: Callable

    def __call__(self, batch: dict) -> dict:
        captions = [str(c) for c in batch["caption"]]
        tokens = np.asarray(self.tokenizer(captions))
        if tokens.ndim != 2 or tokens.shape[0] != len(captions):
            raise ValueError(f"tokenizer returned shape {tokens.shape} for {len(captions)} "
                             "captions; expected int [B, L]")
        return {**batch, "tokens": tokens.astype(np.int32)}


# ---------------------------------------------------------------- datasets and batches

def _preprocess_for(cfg: DataConfig, source, label_names) -> Preprocess:
    """Checks the first record's fields and sizes at the edge, before any worker starts."""
    pre = Preprocess(cfg.image_key, cfg.caption_key, cfg.label_key, cfg.caption_template,
                     tuple(label_names) if label_names else None, cfg.resolution, cfg.crop, cfg.layout)
    first = source[0]
    if cfg.layout and "objects" not in first:
        raise ValueError(f"layout=True reads each record's 'objects', which {cfg.name!r} has not; its fields: "
                         f"{', '.join(sorted(first))}")
    field, key = (("label_key", cfg.label_key) if cfg.caption_template is not None
                  else ("caption_key", cfg.caption_key))
    if key is not None and key not in first:
        raise ValueError(f"{field} {key!r} is not a field of {cfg.name!r}; its fields: "
                         f"{', '.join(sorted(first))} (or set caption_key=None for no captions)")
    pre(first, np.random.default_rng(0))  # rank / channel / dtype errors surface here
    return pre


def make_dataset(cfg: DataConfig, tokenizer: Callable | None = None,
                 shard_index: int | None = None, shard_count: int | None = None) -> grain.IterDataset:
    """The grain pipeline of this process's shard: an IterDataset of local batches
    {'image': float32 [b, ...], 'caption': str [b], 'tokens': int32 [b, L]} with
    b = batch_size / shard_count. Shards default to the jax processes."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if cfg.batch_size % shard_count:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {shard_count} processes")
    source, label_names = open_source(cfg)
    pre = _preprocess_for(cfg, source, label_names)
    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds.slice(slice(shard_index, None, shard_count))
    if len(ds) < cfg.batch_size // shard_count and cfg.drop_remainder:
        raise ValueError(f"shard {shard_index} of {cfg.name!r} split {cfg.split!r} has {len(ds)} "
                         f"examples, fewer than one local batch ({cfg.batch_size // shard_count})")
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)  # after the shuffle: each epoch is reshuffled
    ds = ds.random_map(pre, seed=cfg.seed)
    ds = ds.batch(cfg.batch_size // shard_count, drop_remainder=cfg.drop_remainder)
    if tokenizer is not None:
        ds = ds.map(Tokenize(tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=4 * cfg.batch_size))
    if cfg.worker_count > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
    return it


def make_iterator(cfg: DataConfig, tokenizer: Callable | None = None) -> Iterator[dict]:
    """An iterator of this process's local batches (see make_dataset)."""
    return iter(make_dataset(cfg, tokenizer))


def _absl_flags_parsed():
    # grain's worker processes read absl flags; a program that never parsed them
    # (pytest, a notebook) would fail with UnparsedFlagAccessError.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def global_batch(batch: dict, sharding: jax.sharding.Sharding | None = None) -> dict:
    """A process-local batch -> global jax.Arrays along the leading (batch) axis.

    Numeric fields become `jax.make_array_from_process_local_data(sharding, local)`
    with global batch = local batch x process count (with one process, a device_put
    laid out by `sharding`); string fields (captions) stay NumPy on the host.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "USO":
            out[key] = value
        elif sharding is None:
            out[key] = jax.device_put(value)
        else:
            shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
            out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


def global_batches(batches, sharding: jax.sharding.Sharding | None = None) -> Iterator[dict]:
    """Maps global_batch over an iterator of local batches."""
    for batch in batches:
        yield global_batch(batch, sharding)
