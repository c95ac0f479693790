"""Checks of a model config read from a reference checkpoint (diffusers / transformers `config.json`).

The models' `from_diffusers_config` / `from_transformers_config` raise `CheckpointError` naming the
field; the converters in `jaxdiff.convert` raise it too, for tensors that do not fit.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


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


def config_from_diffusers(cls, config: Mapping, class_name: str, **overrides) -> Any:
    """A config dataclass from a diffusers `config.json` dict, fields named as diffusers names them: metadata
    ('_' fields) skipped, an unknown field or a value the dataclass refuses is a CheckpointError naming it.
    `overrides` replace fields after reading (e.g. diffusers' None meaning another field's value)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise CheckpointError(f"{class_name} config fields {unknown} are unknown to jaxdiff; "
                              f"known: {', '.join(sorted(known))}")
    try:
        return cls(**{**{k: v for k, v in config.items() if k in known}, **overrides})
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def config_to_diffusers(config, class_name: str) -> dict:
    """A config dataclass as a diffusers `config.json` dict (tuples as lists), `_class_name` first."""
    out = {"_class_name": class_name}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
