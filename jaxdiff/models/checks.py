"""Checks of a model config read from a reference checkpoint (diffusers / transformers `config.json`).

The models' `from_diffusers_config` / `from_transformers_config` raise `CheckpointError` naming the
field; the converters in `jaxdiff.convert` raise it too, for tensors that do not fit.
"""
from __future__ import annotations

from typing import Mapping


class CheckpointError(ValueError):
    """A checkpoint does not fit the module it is loaded into."""


def check_supported(config: Mapping, allowed: Mapping, what: str) -> None:
    """Fails on config values we do not implement, instead of silently ignoring them.

    `allowed` maps a config field to the set of values supported (or None: any value).
    Fields absent from `allowed` and starting with '_' are metadata and skipped.
    """
    for field, value in config.items():
        if field.startswith("_") or field not in allowed:
            continue
        ok = allowed[field]
        if ok is not None and _freeze(value) not in ok:
            raise CheckpointError(f"{what} config field {field}={value!r} is not supported; supported: {sorted(map(repr, ok))}")


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v
