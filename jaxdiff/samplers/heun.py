"""Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn).

Integrates the probability-flow ODE in VE coordinates, d(x/alpha)/d(sigma/alpha) = eps_hat:
an Euler predictor to the next point, then the trapezoid correction with eps_hat there;
the last step (to sigma = 0) is plain Euler. Written for x = alpha x~, so per step
x' = P x + Q (eps_1 + eps_2) with P = alpha'/alpha, Q = (sigma' - alpha' sigma / alpha) / 2.
"""
from __future__ import annotations

import jax
import numpy as np

from jaxdiff.samplers.base import Method
from jaxdiff.samplers.grids import Grid


def heun_coefficients(grid: Grid) -> dict[str, np.ndarray]:
    a, s, a1, s1 = grid.alpha[:-1], grid.sigma[:-1], grid.alpha[1:], grid.sigma[1:]
    return {"P": a1 / a, "Q": (s1 - a1 * s / a) / 2.0, "second_order": (s1 > 0).astype(np.float64)}


def heun_step(state, c, denoise, noise):
    x = state["x"]
    x0, eps1 = denoise(x, c["t"], c["alpha"], c["sigma"])
    x_euler = c["P"] * x + 2.0 * c["Q"] * eps1

    def trapezoid(_):
        _, eps2 = denoise(x_euler, c["t_next"], c["alpha_next"], c["sigma_next"])
        return c["P"] * x + c["Q"] * (eps1 + eps2)

    return {"x": jax.lax.cond(c["second_order"] > 0, trapezoid, lambda _: x_euler, None)}, x0


HEUN = Method("heun", "Heun's 2nd-order method (Karras et al. 2022, Alg. 1)", "sigma", heun_coefficients,
              heun_step, ve_start=True, needs_finite_ve=True)
