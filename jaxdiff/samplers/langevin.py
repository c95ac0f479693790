"""Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Alg. 4/5).

At each grid point: `corrector_steps` Langevin MCMC steps on p_t with the score
-eps_hat / sigma, the step size set by the target signal-to-noise ratio `snr`
(eps = 2 (snr ||z|| / ||score||)^2; the paper's VP code also multiplies by 1 - beta_t, which
is within 2% of 1 on DDPM's schedules and has no counterpart on other schedules),
then the DDPM ancestral predictor to the next point. The last predictor step lands on the
clean point without noise, which is the paper's final denoising step.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.base import Method
from jaxdiff.samplers.first_order import ddpm_coefficients
from jaxdiff.samplers.grids import Grid


def langevin_coefficients(grid: Grid, snr: float = 0.16, corrector_steps: int = 1) -> dict[str, np.ndarray]:
    if snr <= 0 or corrector_steps < 1:
        raise ValueError(f"langevin_pc needs snr > 0 and corrector_steps >= 1, got snr={snr}, "
                         f"corrector_steps={corrector_steps}")
    coef = ddpm_coefficients(grid, "fixed_small")
    coef["snr"] = np.full(grid.steps, float(snr))
    return coef


def langevin_pc_step(state, c, denoise, noise, *, corrector_steps):
    x = state["x"]
    axes = tuple(range(1, x.ndim))
    for k in range(corrector_steps):
        _, eps = denoise(x, c["t"], c["alpha"], c["sigma"])
        score = -eps / c["sigma"]
        z = noise[k]
        grad_norm = jnp.sqrt(jnp.sum(score**2, axis=axes, keepdims=True))
        noise_norm = jnp.sqrt(jnp.sum(z**2, axis=axes, keepdims=True))
        step = 2.0 * (c["snr"] * noise_norm / grad_norm) ** 2
        x = x + step * score + jnp.sqrt(2.0 * step) * z
    x0, eps = denoise(x, c["t"], c["alpha"], c["sigma"])
    x_next = c["A"] * x + c["B"] * x0 + c["D"] * noise[corrector_steps]
    return {"x": x_next}, x0


LANGEVIN_PC = Method("langevin_pc", "Langevin predictor-corrector (Song et al. 2021)", "discrete",
                     langevin_coefficients, langevin_pc_step, noises=lambda o: o["corrector_steps"] + 1,
                     options={"snr": 0.16, "corrector_steps": 1}, step_options=("corrector_steps",))
