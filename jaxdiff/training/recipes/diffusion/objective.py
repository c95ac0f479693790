"""The training objective: noise schedule, prediction type, loss weighting and timestep distribution.

Shared by the diffusion and toy2d recipes; a config's `model` holds these fields flat
(`--config.model.prediction_type=v_prediction`), and `Objective.of(config.model)` reads them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdiff import diffusion, losses, schedules
from jaxdiff.training.config import choice

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal")


@dataclasses.dataclass(frozen=True)
class Objective:
    """schedule: a `jaxdiff.schedules` name; rescale_zero_terminal_snr (Lin et al. 2024): the beta schedule
    rescaled to end at SNR 0, so the last timestep is pure noise as at sampling (needs v_prediction or
    sample: x_0 is not recoverable from epsilon there). weighting: `losses.WEIGHTINGS`. Timesteps uniform
    or logit-normal in t/N (Esser et al. 2024; a positive mean favours noisy steps). flow_shift (flow matching):
    SD3's time shift s -> shift s / (1 + (shift - 1) s) of the flow schedule, so training draws and samplers'
    steps alike land on noisier sigmas for shift > 1 (Esser et al. 2024, section 5.3.2; diffusers' `shift`).
    frame_noise_correlation (videos): the fraction of the noise's variance shared by a clip's frames
    (PYoCo's mixed noise prior, `diffusion.frame_correlated_noise`)."""
    schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    rescale_zero_terminal_snr: bool = False
    weighting: str = "min_snr"
    min_snr_gamma: float = 5.0
    timestep_distribution: str = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    flow_shift: float = 1.0
    frame_noise_correlation: float = 0.0

    def __post_init__(self):
        choice(self.prediction_type, PREDICTIONS, "model.prediction_type")
        choice(self.weighting, losses.WEIGHTINGS, "model.weighting")
        choice(self.timestep_distribution, TIMESTEP_DISTRIBUTIONS, "model.timestep_distribution")
        if self.rescale_zero_terminal_snr and self.prediction_type not in ("v_prediction", "sample"):
            raise ValueError(f"config.model.rescale_zero_terminal_snr needs prediction_type 'v_prediction' or "
                             f"'sample' (x_0 cannot be recovered from {self.prediction_type!r} at SNR 0)")
        if not (isinstance(self.flow_shift, (int, float)) and self.flow_shift > 0):
            raise ValueError(f"config.model.flow_shift={self.flow_shift!r}: need a positive time shift")
        if self.flow_shift != 1.0 and self.schedule != "flow_matching":
            raise ValueError(f"config.model.flow_shift={self.flow_shift!r} shifts the flow_matching schedule, not "
                             f"config.model.schedule={self.schedule!r}")
        r = self.frame_noise_correlation
        if not (isinstance(r, (int, float)) and 0.0 <= r < 1.0):
            raise ValueError(f"config.model.frame_noise_correlation={r!r}: need the fraction of the noise's variance "
                             f"shared across frames, in [0, 1)")

    @classmethod
    def of(cls, model) -> "Objective":
        """The objective fields of a config's `model` (a ConfigDict or dict); absent ones keep their defaults."""
        return cls(**{f.name: model[f.name] for f in dataclasses.fields(cls) if f.name in model})

    def make_schedule(self) -> schedules.Schedule:
        """The noise schedule; flow prediction and the flow_matching schedule go together."""
        extra = {"rescale_zero_terminal_snr": True} if self.rescale_zero_terminal_snr else {}
        if self.flow_shift != 1.0:
            extra["shift"] = float(self.flow_shift)
        schedule = schedules.get(self.schedule, self.num_train_timesteps, **extra)
        if (schedule.kind == "flow") != (self.prediction_type == "flow"):
            raise ValueError(f"config.model.prediction_type={self.prediction_type!r} does not fit "
                             f"config.model.schedule={self.schedule!r}: use prediction_type='flow' with exactly "
                             f"the flow_matching schedule")
        return schedule

    def loss(self, apply_fn, x0, key, schedule: schedules.Schedule, context=None, example_weights=None):
        """The denoising (or flow matching) loss of `apply_fn(x_t, timestep, context)` on clean data x0 [B, ...]:
        the mean over examples, or their `example_weights` [B]-weighted mean. The model sees the schedule's
        timestep value (i for discrete schedules, sigma * N for flow matching), as samplers give it; videos
        [B, T, ...] are noised with `frame_noise_correlation` of the noise shared across frames."""
        k_t, k_noise = jax.random.split(key)
        t = losses.sample_timesteps(k_t, x0.shape[0], schedule, self.timestep_distribution,
                                    logit_mean=self.timestep_logit_mean, logit_std=self.timestep_logit_std)
        noise = diffusion.frame_correlated_noise(k_noise, x0.shape, self.frame_noise_correlation)
        x_t = diffusion.q_sample(schedule, x0, t, noise)
        out = apply_fn(x_t, schedule.table("timesteps", t), context)
        loss, per_example = losses.diffusion_loss(out, x0, noise, t, schedule, prediction_type=self.prediction_type,
                                                  weighting=self.weighting, min_snr_gamma=self.min_snr_gamma)
        if example_weights is not None:
            loss = jnp.sum(example_weights * per_example) / jnp.sum(example_weights)
        return loss
