"""LoRA fine-tuning of a latent text-to-image model: its U-Net (and text encoder) frozen, low-rank adapters on
the attention projections trained (`jaxdiff.training.lora`), exported as a diffusers LoRA file.

  python -m train --config configs/lora.py --workdir runs/lora --config.data.data_dir=FOLDER   # the shipped model
  python -m jaxdiff.training.export --workdir runs/lora --out my_lora          # pytorch_lora_weights.safetensors
  python -m train --config configs/lora.py:tiny --workdir /tmp/lora            # seconds, synthetic squares

`shapes` adapts the shipped U-Net model (jaxdiff/assets/shapes_unet: its U-Net, VAE and text encoder) with its own
objective, on a folder of captioned 32x32 images (`data.data_dir`: PNGs with `captions.txt` or sidecar .txt
files; captions in the shapes vocabulary, other words read as unknown). `--config.lora.text_encoder=
"('q_proj','k_proj','v_proj','out_proj')"` adapts the text encoder too. `tiny` adapts a random tiny U-Net.
"""
from configs.latent_diffusion import get_config as latent_diffusion
from jaxdiff.pipelines import SHAPES_UNET_MODEL as SHIPPED_UNET
from jaxdiff.training.lora import ATTENTION

VARIANTS = ("shapes", "tiny")


def get_config(variant: str = "shapes"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/lora.py; choose one of: {', '.join(VARIANTS)}")
    c = latent_diffusion("tiny" if variant == "tiny" else "emphasis")
    c.lora = dict(rank=4, alpha=4, unet=ATTENTION, text_encoder=())
    c.ema_decay = 0.99
    if variant == "tiny":
        return c
    c.model.update(emphasis_words=(), emphasis_weight=1.0, init_from=SHIPPED_UNET)
    c.data.update(name="folder", data_dir="")
    c.steps, c.batch_size, c.checkpoint_every, c.sample_every, c.log_every = 600, 32, 200, 200, 20
    c.optim.update(lr=1e-3, warmup_steps=50)
    return c
