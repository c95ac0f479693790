"""The shape every sampler has.

A sampler is a `Method`: which grid it walks, a `plan` that turns the grid into per-step
coefficients (NumPy float64, computed once at trace time), and a pure `step` that the
shared driver runs inside one `lax.scan`:

    step(state, c, denoise, noise) -> (state, x0_hat)

- state: dict of arrays, always with 'x' (the current x_t in the model's own
  parameterisation x_t = alpha x_0 + sigma eps) plus any history a multistep method keeps;
- c: this step's coefficients as float32 scalars, always including the grid values
  't', 'alpha', 'sigma' (current point) and 't_next', 'alpha_next', 'sigma_next';
- denoise(x, t, alpha, sigma) -> (x0_hat, eps_hat): the model, called at timestep t and
  read through the prediction type at noise level (alpha, sigma);
- noise: [k, *x.shape] standard normal draws for this step (k = `noises`, often 0).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from jaxdiff.samplers.grids import Grid

Denoise = Callable[..., tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Method:
    """A sampler (see module docstring).

    grid: 'discrete', 'sigma', 'sigma_multistep', 'lcm' or 'flow' (which grid to walk on a
      discrete schedule; on a flow schedule every method walks the flow grid).
    plan: (grid, **options) -> {name: [n] float64 array}.
    step: the pure step function.
    init: extra state entries for a start x (history buffers), or None.
    noises: (options) -> number of standard normal draws per step.
    options: the keyword options this method takes, with defaults.
    step_options: options that shape the step's program (passed to `step` as keywords).
    flow_spacing: where its steps fall on a flow schedule, after the diffusers scheduler it mirrors
      (see `grids.flow_grid`): 'table' (FlowMatch*), 'dpm' or 'unipc' (their `use_flow_sigmas`).
    ve_start: whether diffusers starts this sampler at noise std sigma_max (its
      `init_noise_sigma` for Euler-type samplers with linspace/trailing spacing).
    needs_finite_ve: the method integrates in sigma/alpha and cannot start at alpha = 0.
    """

    name: str
    doc: str
    grid: str
    plan: Callable[..., dict[str, np.ndarray]]
    step: Callable
    init: Callable | None = None
    noises: Callable[[dict], int] = lambda options: 0
    options: dict = dataclasses.field(default_factory=dict)
    step_options: tuple[str, ...] = ()
    flow_spacing: str = "table"
    ve_start: bool = False
    needs_finite_ve: bool = False


def safe_log_snr_half(grid: Grid) -> np.ndarray:
    """lambda = log(alpha / sigma) at every grid point (DPM-Solver's half log-SNR); +-inf at the ends allowed."""
    with np.errstate(divide="ignore"):
        return np.log(grid.alpha) - np.log(grid.sigma)
