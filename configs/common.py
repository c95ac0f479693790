"""Pieces several recipe configs share: the diffusion objective and tiny models for smoke runs and tests."""
import ml_collections

from jaxdiff.training.recipes.diffusion import CAPTION_MEANS_CACHE


def diffusion_objective(prediction_type: str = "epsilon", schedule: str = "scaled_linear") -> dict:
    return dict(schedule=schedule, num_train_timesteps=1000, prediction_type=prediction_type,
                rescale_zero_terminal_snr=False, init_from="",
                weighting="min_snr" if prediction_type != "flow" else "simple", min_snr_gamma=5.0,
                timestep_distribution="uniform" if prediction_type != "flow" else "logit_normal",
                timestep_logit_mean=0.0, timestep_logit_std=1.0,
                caption_dropout=0.1, sample_method="dpmpp_2m" if prediction_type != "flow" else "flow_euler",
                sample_steps=25, guidance_scale=4.0, terminal_mean_share=0.0, terminal_mean_examples=50_000,
                terminal_mean_cache=CAPTION_MEANS_CACHE, mirror_pairs="")


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
