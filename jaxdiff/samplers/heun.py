"""Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn), in two coordinates.

An Euler predictor to the next point, then the trapezoid correction with the model there; the
last step (to sigma = 0) is plain Euler. Each step is
  x' = P x + Q (eps_1 + eps_2) + R (x0_1 + x0_2)    (predictor: eps_2 = eps_1, x0_2 = x0_1).

- heun: the probability-flow ODE in VE coordinates, d(x/alpha)/d(sigma/alpha) = eps_hat, written
  for x = alpha x~: P = alpha'/alpha, Q = (sigma' - alpha' sigma / alpha) / 2, R = 0
  (diffusers' HeunDiscreteScheduler).
- flow_heun: the rectified-flow ODE dx/ds = u = eps_hat - x0_hat: P = 1, Q = -R = (s' - s) / 2
  (diffusers' FlowMatchHeunDiscreteScheduler). Heun is not invariant under the change of
  coordinates, so the two differ on the same grid.
"""
from __future__ import annotations

import jax
import numpy as np

from jaxdiff.samplers.base import Method
from jaxdiff.samplers.grids import Grid


def heun_coefficients(grid: Grid) -> dict[str, np.ndarray]:
    a, s, a1, s1 = grid.alpha[:-1], grid.sigma[:-1], grid.alpha[1:], grid.sigma[1:]
    return {"P": a1 / a, "Q": (s1 - a1 * s / a) / 2.0, "R": np.zeros_like(a),
            "second_order": (s1 > 0).astype(np.float64)}


def flow_heun_coefficients(grid: Grid) -> dict[str, np.ndarray]:
    ds = (grid.sigma[1:] - grid.sigma[:-1]) / 2.0
    return {"P": np.ones_like(ds), "Q": ds, "R": -ds, "second_order": (grid.sigma[1:] > 0).astype(np.float64)}


def heun_step(state, c, denoise, noise):
    x = state["x"]
    x0, eps1 = denoise(x, c["t"], c["alpha"], c["sigma"])
    x_euler = c["P"] * x + 2.0 * (c["Q"] * eps1 + c["R"] * x0)

    def trapezoid(_):
        x0_2, eps2 = denoise(x_euler, c["t_next"], c["alpha_next"], c["sigma_next"])
        return c["P"] * x + c["Q"] * (eps1 + eps2) + c["R"] * (x0 + x0_2)

    return {"x": jax.lax.cond(c["second_order"] > 0, trapezoid, lambda _: x_euler, None)}, x0


HEUN = Method("heun", "Heun's 2nd-order method (Karras et al. 2022, Alg. 1)", "sigma", heun_coefficients,
              heun_step, ve_start=True, needs_finite_ve=True)
FLOW_HEUN = Method("flow_heun", "Heun's 2nd-order method on the rectified-flow ODE", "flow", flow_heun_coefficients,
                   heun_step)
