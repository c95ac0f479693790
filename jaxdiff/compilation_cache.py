"""JAX's persistent compilation cache, so a second process skips compiling the same programs."""
from __future__ import annotations

import os

import jax

CACHE_ROOT = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxdiff")  # jaxdiff's caches
DEFAULT_DIR = os.path.join(CACHE_ROOT, "xla")


def enable(path: str | None = None, min_compile_seconds: float = 0.0) -> str:
    """Caches compiled programs under `path` (default: $JAXDIFF_CACHE or ~/.cache/jaxdiff/xla): every one by
    default, since a fresh process recompiles each program left out (the initial noise's alone takes 0.3 s)."""
    path = path or os.environ.get("JAXDIFF_CACHE", DEFAULT_DIR)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
