"""Metrics out: one JSON object per line in `metrics.jsonl`, TensorBoard events, and PNG sample grids."""
from __future__ import annotations

import json
import os

import numpy as np

from jaxdiff.training.tensorboard import EventWriter


class MetricWriter:
    """Writes under `workdir` (call only on process 0)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._events = EventWriter(os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        values = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        self._events.scalars(step, values)

    def grid(self, step: int, images) -> str:
        """images [N, H, W, 3] in [0, 1] -> samples/step_<step>.png (a near-square grid) and TensorBoard."""
        from PIL import Image

        grid = image_grid(np.asarray(images))
        path = os.path.join(self.workdir, "samples", f"step_{step:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(grid).save(path)
        self._events.image(step, "samples", grid)
        return path

    def close(self) -> None:
        self._jsonl.close()
        self._events.close()


def image_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1] -> one uint8 image, ceil(sqrt(N)) columns, white gutters."""
    n, h, w, _ = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(np.clip(images * 255 + 0.5, 0, 255).astype(np.uint8)):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return grid
