"""Pieces several recipe configs share: the diffusion objective and tiny models for smoke runs and tests."""
import os

import ml_collections

from jaxdiff.training.recipes.diffusion.config import model_fields

# Where the recipes' runs live: training workdirs are named under it, and the shapes recipes' frozen
# parts default to the runs of that name there (relative to the working directory unless set).
RUNS = os.environ.get("JAXDIFF_RUNS", "runs")


def run_dir(name: str) -> str:
    return os.path.join(RUNS, name)


def diffusion_model(backbone: str, space: str, **fields) -> ml_collections.ConfigDict:
    """The diffusion recipe's `config.model`: every field (so each is a flag), defaults from the recipe's
    ModelConfig and Objective; flow matching (prediction_type 'flow') with its usual companions."""
    if fields.get("prediction_type") == "flow":
        fields = dict(schedule="flow_matching", weighting="simple", timestep_distribution="logit_normal",
                      sample_method="flow_euler", **fields)
    return ml_collections.ConfigDict(model_fields(backbone=backbone, space=space, **fields))


def tiny_unet(cross_attention: bool) -> dict:
    down = ("CrossAttnDownBlock2D", "DownBlock2D") if cross_attention else ("DownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D") if cross_attention else ("UpBlock2D", "UpBlock2D")
    return dict(block_out_channels=(16, 32), down_block_types=down, up_block_types=up, layers_per_block=1,
                num_attention_heads=2, cross_attention_dim=16, norm_num_groups=8,
                mid_block_type="UNetMidBlock2DCrossAttn" if cross_attention else "UNetMidBlock2D")


def tiny_vae() -> dict:
    return dict(block_out_channels=(16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                scaling_factor=1.0)


def tiny_text_encoder() -> dict:
    """Vocabulary, length and special ids come from the data."""
    return dict(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1, num_attention_heads=2)


def tiny_run(c: ml_collections.ConfigDict) -> None:
    """Shrinks the schedule of a run to a smoke test on synthetic squares."""
    c.data = ml_collections.ConfigDict(dict(source="squares", image_size=16))
    c.steps, c.batch_size, c.log_every, c.checkpoint_every = 20, 8, 5, 10
    c.optim.lr, c.optim.warmup_steps = 1e-3, 5


def shapes_data() -> ml_collections.ConfigDict:
    """The built-in `shapes` dataset at 32x32 (prepare it once: python -m jaxdiff.data.prepare shapes;
    data_dir '' is tfds' default folder)."""
    return ml_collections.ConfigDict(dict(
        source="shapes", name="shapes/32px", data_dir="", image_size=32, max_length=16, worker_count=0, token_masks=0,
        preview_prompts=("a red triangle on the right", "two blue circles", "a large purple square",
                         "a yellow circle and a blue square", "a purple square to the right of a cyan circle",
                         "three green circles", "a small cyan triangle", "a green triangle and a blue triangle")))
