"""Weight import and export for diffusers and transformers folders.

The converters are loaded on first use (PEP 562): the model modules import
`jaxdiff.convert.common`, and the converters import the models, so importing them eagerly
here would make `import jaxdiff.models.clip` and `import jaxdiff.convert` circular.
"""
import importlib

_EXPORTS = {
    "from_diffusers": "diffusers",
    "to_diffusers": "diffusers",
    "load_pipeline": "diffusers",
    "from_transformers": "transformers",
    "to_transformers": "transformers",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jaxdiff.convert.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'jaxdiff.convert' has no attribute {name!r}")


__all__ = list(_EXPORTS)
