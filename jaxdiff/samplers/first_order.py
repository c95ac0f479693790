"""One-step samplers: each step is x_next = A x + B x0_hat + C eps_hat + D z.

They differ only in their grid and in (A, B, C, D), all computed in float64:

- DDIM (Song et al. 2021, eq. 12) with eta; eta = 0 is the probability-flow ODE's
  first-order (exponential-integrator) step.
- Euler (Karras et al. 2022, Alg. 1 without churn): in x/alpha coordinates
  x~' = x~ + (s~' - s~) eps_hat, which is exactly the DDIM step on the sigma grid.
- Euler ancestral (k-diffusion): the step to sigma_down plus fresh noise sigma_up, which
  is exactly DDIM with eta = 1 on the sigma grid.
- Flow-matching Euler: x' = x + (s' - s) u on rectified flow, again the DDIM step
  (alpha' x0 + s' eps = x + (s' - s)(eps - x0)).
- DDPM ancestral sampling (Ho et al. 2020) from the posterior q(x_s | x_t, x0_hat), with
  the posterior variance ('fixed_small', beta-tilde) or the forward one ('fixed_large', beta).
- LCM multistep (Luo et al. 2023): consistency function c_skip x + c_out x0_hat, then
  re-noised with fresh noise to the next timestep.
"""
from __future__ import annotations

import numpy as np

from jaxdiff import diffusion
from jaxdiff.samplers.base import Method
from jaxdiff.samplers.grids import Grid


def linear_step(state, c, denoise, noise):
    """x_next = A x + B x0_hat + C eps_hat + D z."""
    x = state["x"]
    x0, eps = denoise(x, c["t"], c["alpha"], c["sigma"])
    x_next = c["A"] * x + c["B"] * x0 + c["C"] * eps
    if noise.shape[0]:
        x_next = x_next + c["D"] * noise[0]
    return {"x": x_next}, x0


def ddim_coefficients(grid: Grid, eta: float = 0.0) -> dict[str, np.ndarray]:
    """DDIM: x' = alpha' x0 + sqrt(sigma'^2 - c^2) eps + c z, c = eta * posterior std (Song et al. eq. 16)."""
    a, s, a1, s1 = grid.alpha[:-1], grid.sigma[:-1], grid.alpha[1:], grid.sigma[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        # r = (sigma'/alpha') / (sigma/alpha): ratio of VE noise levels, 0 when alpha = 0
        r = np.where(a == 0, 0.0, s1 * a / (a1 * s))
    std = eta * s1 * np.sqrt(np.clip(1.0 - r**2, 0.0, None))
    return {"A": np.zeros_like(a), "B": a1, "C": np.sqrt(np.clip(s1**2 - std**2, 0.0, None)), "D": std}


def ddpm_coefficients(grid: Grid, variance_type: str = "fixed_small") -> dict[str, np.ndarray]:
    """DDPM: posterior mean plus noise of the chosen variance (diffusers' `variance_type`); no noise from
    timestep 0 (as diffusers)."""
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"unknown DDPM variance_type {variance_type!r}; choose one of: fixed_small, fixed_large")
    p = diffusion.posterior(grid.alpha[1:], grid.sigma[1:], grid.alpha[:-1], grid.sigma[:-1])
    var = np.maximum(p.variance, 1e-20) if variance_type == "fixed_small" else p.step_variance
    std = np.sqrt(np.clip(var, 0.0, None)) * (grid.t > 0)
    return {"A": p.coef_xt, "B": p.coef_x0, "C": np.zeros_like(std), "D": std}


def lcm_coefficients(grid: Grid, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> dict[str, np.ndarray]:
    """LCM: x' = alpha' (c_skip x + c_out x0) + sigma' z with the discrete boundary scalings."""
    scaled = grid.t * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / np.sqrt(scaled**2 + sigma_data**2)
    a1, s1 = grid.alpha[1:], grid.sigma[1:]
    return {"A": a1 * c_skip, "B": a1 * c_out, "C": np.zeros_like(a1), "D": s1}


DDIM = Method("ddim", "DDIM (Song et al. 2021) with eta", "discrete", ddim_coefficients, linear_step,
              noises=lambda o: int(o["eta"] != 0), options={"eta": 0.0})
DDPM = Method("ddpm", "DDPM ancestral sampling (Ho et al. 2020)", "discrete", ddpm_coefficients, linear_step,
              noises=lambda o: 1, options={"variance_type": "fixed_small"})
EULER = Method("euler", "Euler (Karras et al. 2022, Alg. 1)", "sigma", ddim_coefficients, linear_step,
               ve_start=True)
EULER_ANCESTRAL = Method("euler_ancestral", "Euler ancestral (k-diffusion)", "sigma",
                         lambda grid: ddim_coefficients(grid, eta=1.0), linear_step,
                         noises=lambda o: 1, ve_start=True)
FLOW_EULER = Method("flow_euler", "Euler on the rectified-flow ODE (Liu et al. 2022)", "flow",
                    ddim_coefficients, linear_step)
LCM = Method("lcm", "Latent consistency model multistep sampling (Luo et al. 2023)", "lcm", lcm_coefficients,
             linear_step, noises=lambda o: 1)
