"""Diffusion math shared by training and sampling: forward noising, posteriors, predictions.

All of it is written for the general Gaussian process x_t = alpha_t x_0 + sigma_t eps
(Kingma et al. 2021), so it covers variance-preserving tables and rectified flow alike.
Per-example scalars (alpha, sigma) broadcast against x: pass them with shape [B] and they
are expanded over the trailing axes.

Prediction types (what the network outputs):
  epsilon       eps
  sample        x_0
  v_prediction  v = alpha eps - sigma x_0            (Salimans & Ho 2022)
  flow          u = eps - x_0                        (rectified flow velocity dx/ds)
  score         grad log p(x_t) = -eps / sigma       (Song et al. 2021)
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.schedules import Schedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow", "score")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of: {', '.join(PREDICTION_TYPES)}")


def _bcast(c, x):
    """Expands a scalar or per-example [B] coefficient over x's trailing axes."""
    c = jnp.asarray(c, x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def q_sample(schedule: Schedule, x0, t, noise):
    """Closed-form forward noising q(x_t | x_0): alpha_t x_0 + sigma_t eps.

    Args: x0 [B, ...]; t [B] integer training timesteps; noise like x0.
    """
    alpha, sigma = schedule.table("alpha", t), schedule.table("sigma", t)
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise


def frame_correlated_noise(key, shape, correlation: float = 0.0, axis: int = 1):
    """Standard normal noise whose draws along `axis` (the frames of latent videos [B, T, ...]) share
    `correlation` of their variance: sqrt(c) shared + sqrt(1 - c) independent, the mixed noise prior
    of PYoCo (Ge et al. 2023; their alpha^2 / (1 + alpha^2) = c).

    Every element stays N(0, 1), so schedules and samplers are unchanged; what changes is that a video
    model trained and sampled with it starts every frame from mostly the same noise, as an image model
    inflated into a video model would need to draw the same scene on every frame. `correlation` is a
    Python float in [0, 1); 0 gives exactly `jax.random.normal(key, shape)`.
    """
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"frame noise correlation must be in [0, 1), got {correlation!r}")
    if correlation == 0.0:
        return jax.random.normal(key, shape, jnp.float32)
    k_shared, k_own = jax.random.split(key)
    shared_shape = tuple(1 if i == axis % len(shape) else n for i, n in enumerate(shape))
    shared = jax.random.normal(k_shared, shared_shape, jnp.float32)
    own = jax.random.normal(k_own, shape, jnp.float32)
    return np.sqrt(correlation) * shared + np.sqrt(1.0 - correlation) * own


class Posterior(NamedTuple):
    """q(x_s | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, variance), for s < t."""

    coef_x0: jax.Array
    coef_xt: jax.Array
    variance: jax.Array
    # variance of the forward step q(x_t | x_s): DDPM's "fixed_large" choice (beta_t)
    step_variance: jax.Array


def posterior(alpha_s, sigma_s, alpha_t, sigma_t) -> Posterior:
    """Gaussian posterior between two noise levels (Kingma et al. 2021, eqs. 31-33).

    With alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2:
      mean = alpha_s sigma_{t|s}^2 / sigma_t^2 x_0 + alpha_{t|s} sigma_s^2 / sigma_t^2 x_t,
      var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2.
    For a VP schedule this is DDPM's eq. 7 (beta-tilde). Works on NumPy (float64) or JAX values.
    """
    xp = np if isinstance(alpha_t, (np.ndarray, np.floating, float)) else jnp
    alpha_ts = alpha_t / alpha_s
    step_var = sigma_t**2 - alpha_ts**2 * sigma_s**2
    return Posterior(coef_x0=alpha_s * step_var / sigma_t**2,
                     coef_xt=alpha_ts * sigma_s**2 / sigma_t**2,
                     variance=xp.maximum(step_var * sigma_s**2 / sigma_t**2, 0.0),
                     step_variance=step_var)


def q_posterior(schedule: Schedule, x0, xt, t, s):
    """Mean and variance of q(x_s | x_t, x_0) for integer timesteps s < t (arrays [B])."""
    p = posterior(schedule.table("alpha", s), schedule.table("sigma", s),
                  schedule.table("alpha", t), schedule.table("sigma", t))
    mean = _bcast(p.coef_x0, x0) * x0 + _bcast(p.coef_xt, xt) * xt
    return mean, _bcast(p.variance, x0)


# ----------------------------------------------------------------------------- predictions


def target(prediction_type: str, x0, noise, alpha, sigma):
    """What a network of this prediction type should output for (x_0, eps) at (alpha, sigma)."""
    check_prediction_type(prediction_type)
    a, s = _bcast(alpha, x0), _bcast(sigma, x0)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a * noise - s * x0
    if prediction_type == "flow":
        return noise - x0
    return -noise / s  # score


def to_x0_eps(prediction_type: str, out, x, alpha, sigma):
    """(x_0, eps) implied by a model output at x_t = x. The one place prediction types are converted.

    Each pair solves x = alpha x_0 + sigma eps together with the definition of the output.
    """
    check_prediction_type(prediction_type)
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    if prediction_type == "sample":
        return out, (x - a * out) / s
    if prediction_type == "v_prediction":
        norm = a * a + s * s
        return (a * x - s * out) / norm, (s * x + a * out) / norm
    if prediction_type == "flow":
        norm = a + s
        return (x - s * out) / norm, (x + a * out) / norm
    eps = -s * out  # score
    return (x - s * eps) / a, eps


def convert(out, x, alpha, sigma, from_type: str, to_type: str):
    """Converts a model output between prediction types at the same (x_t, alpha, sigma)."""
    x0, eps = to_x0_eps(from_type, out, x, alpha, sigma)
    return target(to_type, x0, eps, alpha, sigma)


def snr(alpha, sigma):
    """Signal-to-noise ratio alpha^2 / sigma^2."""
    return (alpha / sigma) ** 2
