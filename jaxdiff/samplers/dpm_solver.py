"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2, data prediction, midpoint form).

With lambda = log(alpha / sigma), h = lambda' - lambda and the previous step's h_0:
  x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) [D0 + D1 / 2],  D0 = x0_i,  D1 = (x0_i - x0_{i-1}) h / h_0.
The first step (no history) and the last (to sigma = 0) are first order, as diffusers does
with `lower_order_final` and `final_sigmas_type="zero"`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.base import Method, safe_log_snr_half
from jaxdiff.samplers.grids import Grid


def dpmpp_2m_coefficients(grid: Grid) -> dict[str, np.ndarray]:
    lam = safe_log_snr_half(grid)
    n = grid.steps
    with np.errstate(invalid="ignore", divide="ignore"):
        h = lam[1:] - lam[:-1]
        phi = -grid.alpha[1:] * np.expm1(-h)  # -alpha' (e^{-h} - 1)
        q = np.zeros(n)  # h / h_0 = 1 / r_0, zero where the step is first order
        q[1:] = h[1:] / h[:-1]
        q = np.where(np.isfinite(q), q, 0.0)
    second = (np.arange(n) > 0) & (np.arange(n) < n - 1)
    q = np.where(second, q, 0.0)
    return {"A": grid.sigma[1:] / grid.sigma[:-1], "B0": phi * (1.0 + 0.5 * q), "B1": -phi * 0.5 * q}


def dpmpp_2m_init(x):
    return {"x0_prev": jnp.zeros_like(x)}


def dpmpp_2m_step(state, c, denoise, noise):
    x = state["x"]
    x0, _ = denoise(x, c["t"], c["alpha"], c["sigma"])
    x_next = c["A"] * x + c["B0"] * x0 + c["B1"] * state["x0_prev"]
    return {"x": x_next, "x0_prev": x0}, x0


DPMPP_2M = Method("dpmpp_2m", "DPM-Solver++(2M) (Lu et al. 2022)", "sigma_multistep", dpmpp_2m_coefficients,
                  dpmpp_2m_step, init=dpmpp_2m_init, flow_spacing="dpm")
