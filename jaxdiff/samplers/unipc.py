"""UniPC (Zhao et al. 2023), order 2, B(h) = e^h - 1 ("bh2"), data prediction.

Each step calls the model once at the predicted x_i, then
  UniC corrects x_i with that output (no extra model call), and
  UniP predicts x_{i+1} from the corrected x_i, using the output at the uncorrected x_i.
Orders follow diffusers' defaults: the predictor warms up at order 1 and drops to order 1
for the last step (`lower_order_final`); the corrector at step i has the predictor's order
of step i-1. All coefficients come from log-SNR differences, in float64.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.base import Method, safe_log_snr_half
from jaxdiff.samplers.grids import Grid


def _bh2_rhs(h):
    """b_1, b_2 of the order conditions for hh = -h (data prediction), and h*phi_1, B(h)."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = h_phi_1
    with np.errstate(invalid="ignore", divide="ignore"):
        h_phi_k = h_phi_1 / hh - 1.0
        b1 = h_phi_k / b_h
        h_phi_k = h_phi_k / hh - 0.5
        b2 = h_phi_k * 2.0 / b_h
    return h_phi_1, b_h, np.nan_to_num(b1), np.nan_to_num(b2)


def unipc_coefficients(grid: Grid) -> dict[str, np.ndarray]:
    lam = safe_log_snr_half(grid)
    a, s = grid.alpha, grid.sigma
    n = grid.steps
    order = np.minimum(np.minimum(np.arange(n) + 1, n - np.arange(n)), 2)  # warm-up, lower_order_final
    c = {k: np.zeros(n) for k in ("P_x", "P_m0", "P_m1", "C_self", "C_x", "C_m2", "C_m1", "C_m0")}
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(n):
            # UniP from x_i (corrected) to x_{i+1}: m0 = x0_i, m1 = x0_{i-1}
            h = lam[i + 1] - lam[i]
            h_phi_1, b_h, _, _ = _bh2_rhs(h)
            c["P_x"][i] = s[i + 1] / s[i]
            c["P_m0"][i] = -a[i + 1] * h_phi_1
            if order[i] == 2:
                q = _finite(h / (lam[i - 1] - lam[i]))  # 1 / r_1; D1 = q (m1 - m0), rho_p = 1/2
                c["P_m0"][i] += a[i + 1] * b_h * 0.5 * q
                c["P_m1"][i] = -a[i + 1] * b_h * 0.5 * q
            # UniC at x_i, using x_{i-1}, m_{i-2}, m_{i-1} and the new output m_i
            if i == 0:
                c["C_self"][i] = 1.0
                continue
            h = lam[i] - lam[i - 1]
            h_phi_1, b_h, b1, b2 = _bh2_rhs(h)
            if order[i - 1] == 2:
                q = _finite(h / (lam[i - 2] - lam[i - 1]))  # 1 / r_1
                rho1 = (b2 - b1) * q / (1.0 - q)  # solve [[1, 1], [r_1, 1]] rho = b
                rho2 = b1 - rho1
            else:
                rho1, rho2, q = 0.0, 0.5, 0.0
            c["C_x"][i] = s[i] / s[i - 1]
            c["C_m2"][i] = -a[i] * b_h * rho1 * q
            c["C_m1"][i] = -a[i] * h_phi_1 + a[i] * b_h * (rho1 * q + rho2)
            c["C_m0"][i] = -a[i] * b_h * rho2
    return c


def _finite(v):
    return float(v) if np.isfinite(v) else 0.0


def unipc_init(x):
    z = jnp.zeros_like(x)
    return {"x_prev": z, "m1": z, "m2": z}


def unipc_step(state, c, denoise, noise):
    x = state["x"]
    m0, _ = denoise(x, c["t"], c["alpha"], c["sigma"])
    x_c = c["C_self"] * x + c["C_x"] * state["x_prev"] + c["C_m2"] * state["m2"] + c["C_m1"] * state["m1"] \
        + c["C_m0"] * m0
    x_next = c["P_x"] * x_c + c["P_m0"] * m0 + c["P_m1"] * state["m1"]
    return {"x": x_next, "x_prev": x_c, "m1": m0, "m2": state["m1"]}, m0


UNIPC = Method("unipc", "UniPC-bh2, order 2 (Zhao et al. 2023)", "sigma_multistep", unipc_coefficients, unipc_step,
               init=unipc_init, flow_spacing="unipc")
