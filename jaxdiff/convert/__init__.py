"""Weight import and export for diffusers and transformers folders."""
from jaxdiff.convert.diffusers import from_diffusers, load_pipeline, to_diffusers
from jaxdiff.convert.transformers import from_transformers, to_transformers

__all__ = ["from_diffusers", "load_pipeline", "to_diffusers", "from_transformers", "to_transformers"]
