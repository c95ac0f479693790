"""Denoising and flow-matching losses with the usual timestep weightings.

Every weighting is defined as a weight w(t) on the x_0 error, ||x0_hat - x0||^2, and
converted to a weight on the network's own target error: if the x_0 error is k(t) times
the prediction error (k = sigma/alpha for epsilon, ...), the prediction's MSE is weighted
by w(t) k(t)^2. 'simple' is the exception: weight 1 on the prediction's own MSE
(Ho et al. 2020's L_simple), whatever it predicts.

  simple    1 on the prediction error
  snr       w = SNR                      (equals L_simple for epsilon prediction)
  min_snr   w = min(SNR, gamma)          (Hang et al. 2023, "Min-SNR weighting")
  edm       w = (s^2 + sd^2) / (s sd)^2  with s = sigma/alpha (Karras et al. 2022, eq. 8's lambda)
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from jaxdiff import diffusion
from jaxdiff.schedules import Schedule

WEIGHTINGS = ("simple", "snr", "min_snr", "edm")


def x0_error_scale(prediction_type: str, alpha, sigma):
    """k(t) with x0_hat - x0 = k(t) (pred - target), from `diffusion.to_x0_eps`'s x_0 formula."""
    diffusion.check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return sigma / alpha
    if prediction_type == "sample":
        return jnp.ones_like(alpha)
    if prediction_type == "v_prediction":
        return sigma / (alpha**2 + sigma**2)
    if prediction_type == "flow":
        return sigma / (alpha + sigma)
    return sigma**2 / alpha  # score: x0 = (x + sigma^2 score) / alpha


def loss_weight(weighting: str, prediction_type: str, alpha, sigma, *, min_snr_gamma: float = 5.0,
                sigma_data: float = 0.5):
    """Per-example weight on the prediction's MSE for a weighting scheme (see module docstring)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
    if weighting == "simple":
        return jnp.ones_like(alpha)
    snr = diffusion.snr(alpha, sigma)
    if weighting == "snr":
        w_x0 = snr
    elif weighting == "min_snr":
        w_x0 = jnp.minimum(snr, min_snr_gamma)
    else:
        s = sigma / alpha
        w_x0 = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    return w_x0 * x0_error_scale(prediction_type, alpha, sigma) ** 2


def masked_mean(err, mask=None):
    """Mean over all but the batch axis; with a mask (broadcastable to err), over masked entries."""
    axes = tuple(range(1, err.ndim))
    if mask is None:
        return jnp.mean(err, axis=axes)
    mask = jnp.broadcast_to(mask.astype(err.dtype), err.shape)
    return jnp.sum(err * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)


def diffusion_loss(model_out, x0, noise, t, schedule: Schedule, *, prediction_type: str = "epsilon",
                   weighting: str = "simple", min_snr_gamma: float = 5.0, sigma_data: float = 0.5,
                   mask=None):
    """Weighted denoising loss for a batch noised with `q_sample(schedule, x0, t, noise)`.

    Args:
      model_out: [B, ...] network output for x_t at timesteps t.
      x0, noise: [B, ...] the clean data and the noise that made x_t.
      t: [B] integer training timesteps.
      mask: optional per-pixel mask broadcastable to x0 (1 = counts).
    Returns: (scalar loss, per-example losses [B]). Computed in float32.
    """
    model_out, x0, noise = (jnp.asarray(a, jnp.float32) for a in (model_out, x0, noise))
    alpha, sigma = schedule.table("alpha", t), schedule.table("sigma", t)
    tgt = diffusion.target(prediction_type, x0, noise, alpha, sigma)
    per_example = masked_mean((model_out - tgt) ** 2, mask)
    per_example = per_example * loss_weight(weighting, prediction_type, alpha, sigma,
                                            min_snr_gamma=min_snr_gamma, sigma_data=sigma_data)
    return jnp.mean(per_example), per_example


def flow_matching_loss(model_out, x0, noise, t, schedule: Schedule, *, mask=None):
    """Conditional flow matching (Lipman et al. 2023) with the rectified-flow path: ||u - (eps - x0)||^2."""
    if schedule.kind != "flow":
        raise ValueError(f"flow_matching_loss needs a flow_matching schedule, got a {schedule.kind!r} one")
    return diffusion_loss(model_out, x0, noise, t, schedule, prediction_type="flow", weighting="simple", mask=mask)


def sample_timesteps(key, batch: int, schedule: Schedule, distribution: str = "uniform", *,
                     logit_mean: float = 0.0, logit_std: float = 1.0):
    """Training timesteps [B] (int32): uniform, or logit-normal in t/N (Esser et al. 2024, SD3)."""
    n = schedule.num_train_timesteps
    if distribution == "uniform":
        return jax.random.randint(key, (batch,), 0, n)
    if distribution == "logit_normal":
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
        return jnp.clip(jnp.floor(u * n), 0, n - 1).astype(jnp.int32)
    raise ValueError(f"unknown timestep distribution {distribution!r}; choose one of: uniform, logit_normal")
