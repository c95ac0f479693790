"""jaxdiff: a pure-JAX, functional diffusion stack.

The core (schedules, diffusion math, losses, samplers, guidance) is imported eagerly;
the heavier parts (models, convert, data, pipelines, training, parallel, video_io, ...) load on
first attribute access so `import jaxdiff` stays fast.
"""
import importlib

from jaxdiff import diffusion, guidance, losses, samplers, schedules

__version__ = "0.1.0"

_LAZY = ("models", "convert", "data", "pipelines", "training", "parallel", "tokenizers", "toy2d", "video_io")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"jaxdiff.{name}")
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")


__all__ = ["diffusion", "guidance", "losses", "samplers", "schedules", *_LAZY]
