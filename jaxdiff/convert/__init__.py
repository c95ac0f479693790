"""Weight import and export for diffusers and transformers folders."""
from jaxdiff.convert.diffusers import from_diffusers, load_pipeline, to_diffusers
from jaxdiff.convert.lora import apply_lora, load_lora, read_lora, save_lora
from jaxdiff.convert.transformers import from_transformers, to_transformers

__all__ = ["from_diffusers", "load_pipeline", "to_diffusers", "from_transformers", "to_transformers",
           "load_lora", "read_lora", "apply_lora", "save_lora"]
