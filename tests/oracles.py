"""Exact denoisers for data whose posterior mean has a closed form (Gaussian, Gaussian mixture).

The oracle reads its noise level from the timestep the way the samplers' grids define it
(table lookup / linear interpolation of the VE sigma; s = t / N for flow matching), so
with it a sampler's only error is its own discretisation (and Monte Carlo noise).
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion


def noise_level(schedule, t):
    """(alpha, sigma) [B] at model timesteps t [B]."""
    t = jnp.asarray(t, jnp.float32)
    if schedule.kind == "flow":
        s = t / schedule.num_train_timesteps
        return 1.0 - s, s
    ve_table = jnp.asarray(np.minimum(schedule.ve_sigma, 1e30), jnp.float32)
    ve = jnp.interp(t, jnp.arange(schedule.num_train_timesteps, dtype=jnp.float32), ve_table)
    return 1.0 / jnp.sqrt(1.0 + ve**2), 1.0 / jnp.sqrt(1.0 + 1.0 / ve**2)


class GaussianMixture:
    """p(x0) = sum_k w_k N(mu_k, s_k^2 I) in D dimensions."""

    def __init__(self, weights, means, stds):
        self.w = np.asarray(weights, np.float64)
        self.mu = np.asarray(means, np.float64)  # [K, D]
        self.s = np.asarray(stds, np.float64)  # [K]

    @property
    def mean(self):
        return self.w @ self.mu

    @property
    def cov(self):
        d = self.mu.shape[1]
        second = sum(w * (np.outer(m, m) + s**2 * np.eye(d)) for w, m, s in zip(self.w, self.mu, self.s))
        return second - np.outer(self.mean, self.mean)

    def posterior_mean(self, x, alpha, sigma):
        """E[x0 | x_t = x]: x [B, D], alpha/sigma [B]."""
        a, s2 = alpha[:, None, None], sigma[:, None, None] ** 2
        mu, var0 = jnp.asarray(self.mu, jnp.float32)[None], jnp.asarray(self.s**2, jnp.float32)[None, :, None]
        var_t = a**2 * var0 + s2  # [B, K, 1]
        diff = x[:, None, :] - a * mu
        logp = jnp.log(jnp.asarray(self.w, jnp.float32))[None] - 0.5 * jnp.sum(diff**2 / var_t + jnp.log(var_t), -1)
        r = jax.nn.softmax(logp, axis=-1)[..., None]
        comp = mu + a * var0 / var_t * diff
        return jnp.sum(r * comp, axis=1)

    def model_fn(self, schedule, prediction_type="epsilon"):
        def fn(x, t):
            alpha, sigma = noise_level(schedule, t)
            x0 = self.posterior_mean(x, alpha, sigma)
            eps = (x - alpha[:, None] * x0) / sigma[:, None]
            return diffusion.target(prediction_type, x0, eps, alpha, sigma)

        return fn

    def sample(self, rng, n):
        k = rng.choice(len(self.w), size=n, p=self.w)
        return self.mu[k] + self.s[k, None] * rng.standard_normal((n, self.mu.shape[1]))


def gaussian(mean, std):
    """A single isotropic Gaussian as a one-component mixture."""
    return GaussianMixture([1.0], [mean], [std])
