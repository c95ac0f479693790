"""Videos in and out: GIF (Pillow, through imageio) and MP4 (H.264 through imageio-ffmpeg), chosen by extension.

    write_video("out.gif", frames, fps=8)      # frames: uint8 [T, H, W, 3], or float in [0, 1]
    frames = read_video("out.gif")             # uint8 [T, H, W, 3]

Writes are atomic: the file appears complete under its name or not at all. MP4 needs the
`imageio-ffmpeg` package (`pip install imageio-ffmpeg`, which bundles an ffmpeg binary); GIF
needs nothing beyond imageio and Pillow.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

VIDEO_EXTENSIONS = (".gif", ".mp4")


def to_uint8_frames(frames) -> np.ndarray:
    """[T, H, W, 3] (or [T, H, W, 1] / [T, H, W]) uint8, or float in [0, 1] -> uint8 [T, H, W, 3]."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.shape[0] == 0:
        raise ValueError(f"video frames must be [T, H, W, 3] (or 1 channel) with T >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        if not np.issubdtype(frames.dtype, np.floating):
            raise ValueError(f"video frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")
        frames = np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames


def _extension(path: str) -> str:
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in VIDEO_EXTENSIONS:
        raise ValueError(f"unknown video extension {ext or '(none)'!r} in {str(path)!r}; choose one of: "
                         f"{', '.join(VIDEO_EXTENSIONS)}")
    return ext


def _require_ffmpeg():
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError as e:
        raise RuntimeError("writing MP4 needs the imageio-ffmpeg package (it bundles ffmpeg): "
                           "pip install imageio-ffmpeg, or write a .gif instead") from e


def write_video(path, frames, fps: float = 8.0) -> str:
    """Writes frames as a GIF or MP4 (by `path`'s extension), atomically. Returns the path.

    Args:
      frames: uint8 [T, H, W, 3], or float in [0, 1] (clipped, rounded).
      fps: frames per second (> 0). GIF stores durations in 10 ms steps, so fps is rounded to those.
    MP4 is H.264 (yuv420p): odd sizes are padded by one black row/column at the bottom/right.
    """
    import imageio.v3 as iio

    ext = _extension(path)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = to_uint8_frames(frames)
    if ext == ".mp4":
        _require_ffmpeg()
        t, h, w, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ext, dir=folder)
    os.close(fd)
    try:
        if ext == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", plugin="pillow", duration=1000.0 / fps, loop=0)
        else:
            iio.imwrite(tmp, frames, extension=".mp4", plugin="FFMPEG", fps=fps, codec="libx264",
                        pixelformat="yuv420p", macro_block_size=1, quality=8)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return str(path)


def read_video(path, fps: float | None = None) -> np.ndarray:
    """Reads a GIF or MP4 back: uint8 [T, H, W, 3].

    Pillow's GIF writer merges identical consecutive frames into one frame of summed duration;
    reading undoes that, repeating each stored frame duration / frame-duration times, where the
    frame duration is 1000 / fps ms (in GIF's 10 ms steps) or, without `fps`, the shortest stored one.
    """
    import imageio.v3 as iio
    from PIL import Image

    ext = _extension(path)
    if ext == ".mp4":
        _require_ffmpeg()
        return np.asarray(iio.imread(path, plugin="FFMPEG"))[..., :3]
    frames, durations = [], []
    with Image.open(path) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
            durations.append(im.info.get("duration", 0) or 0)
    base = _gif_duration(fps) if fps else min((d for d in durations if d > 0), default=0)
    repeats = [max(1, round(d / base)) if base else 1 for d in durations]
    return np.repeat(np.stack(frames), repeats, axis=0)


def _gif_duration(fps: float) -> int:
    """A frame's duration as GIF stores it: milliseconds in 10 ms steps (Pillow truncates)."""
    return int(1000.0 / fps / 10) * 10
