"""Where the sampler stops: timestep spacing and the (t, alpha, sigma) of every grid point.

A sampling run of n steps visits grid points 0..n: point i < n is where the model is
called with timestep t[i]; point n is the end (clean data, or diffusers' final alpha).
Grids are built in float64 following diffusers' `set_timesteps` so the same model
function sees the same timesteps as a diffusers pipeline would:

- discrete grid (DDPM, DDIM, Langevin PC): integer timesteps read off the schedule table;
- sigma grid (Euler, Euler ancestral, Heun, DPM-Solver++, UniPC): the variance-exploding
  sigma interpolated at (possibly fractional) timesteps, or Karras spacing;
- LCM grid: the consistency model's skipping schedule over its original 50 steps;
- flow grid: rectified flow's sigmas, linearly spaced then shifted.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxdiff import schedules
from jaxdiff.schedules import Schedule

SPACINGS = ("leading", "trailing", "linspace")


class Grid(NamedTuple):
    """t: [n] model timesteps; alpha, sigma: [n + 1] (float64)."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.t)

    def tail(self, start: int) -> "Grid":
        """The grid from point `start` on (img2img starts part-way down)."""
        return Grid(self.t[start:], self.alpha[start:], self.sigma[start:])


def spaced_timesteps(spacing: str, steps: int, num_train: int, offset: int = 0, *, extra_point: bool = False,
                     integer: bool = True) -> np.ndarray:
    """Descending timesteps by diffusers' rule (Lin et al. 2024, Table 2).

    extra_point: DPM-Solver/UniPC space n + 1 points and drop the last for linspace/leading.
    integer: DDIM/DDPM/DPM/UniPC round to integers; Euler/Heun keep linspace fractional.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    m = steps + 1 if extra_point else steps
    if spacing == "linspace":
        t = np.linspace(0, num_train - 1, m)[::-1]
        t = t.round() if integer else t
    elif spacing == "leading":
        t = (np.arange(m) * (num_train // m)).round()[::-1] + offset
    else:
        t = np.arange(num_train, 0, -num_train / steps).round() - 1
    if extra_point and spacing != "trailing":
        t = t[:-1]
    t = np.asarray(t, np.float64)
    if t.min() < 0 or t.max() > num_train - 1:
        raise ValueError(f"timesteps {t.min():g}..{t.max():g} fall outside the schedule's 0..{num_train - 1} "
                         f"(steps={steps}, timestep_spacing={spacing!r}, steps_offset={offset})")
    return t


def discrete_grid(schedule: Schedule, steps: int, spacing: str, offset: int, set_alpha_to_one: bool) -> Grid:
    """Integer timesteps; the end point is alpha=1 (or the table's first entry, SD's `set_alpha_to_one=False`)."""
    t = spaced_timesteps(spacing, steps, schedule.num_train_timesteps, offset).astype(np.int64)
    a_end, s_end = (1.0, 0.0) if set_alpha_to_one else (schedule.alpha[0], schedule.sigma[0])
    alpha = np.append(np.asarray(schedule.alpha, np.float64)[t], a_end)
    sigma = np.append(np.asarray(schedule.sigma, np.float64)[t], s_end)
    return Grid(t.astype(np.float64), alpha, sigma)


def vp_from_ve(ve_sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) of a VP process at VE noise levels: alpha = 1/sqrt(1+s^2); inf -> (0, 1)."""
    ve = np.asarray(ve_sigma, np.float64)
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(1.0 + ve**2), 1.0 / np.sqrt(1.0 + 1.0 / ve**2)


def sigma_grid(schedule: Schedule, steps: int, spacing: str, offset: int, *, multistep: bool,
               karras: bool) -> Grid:
    """VE sigmas at the spaced timesteps, or Karras-spaced with timesteps by log-sigma interpolation; ends at 0."""
    n_train = schedule.num_train_timesteps
    ve_table = schedule.ve_sigma
    t = spaced_timesteps(spacing, steps, n_train, offset, extra_point=multistep, integer=multistep)
    with np.errstate(invalid="ignore"):
        ve = np.interp(t, np.arange(n_train), ve_table)
    ve = np.where(t == n_train - 1, ve_table[-1], ve)  # keep an infinite terminal sigma exact
    if karras:
        if not np.isfinite(ve_table[-1]):
            raise ValueError("Karras sigmas need a finite sigma_max; this schedule ends at zero SNR")
        # diffusers: DPM-Solver/UniPC span the whole table and round t; Euler/Heun span the spaced sigmas
        lo, hi = (ve_table[0], ve_table[-1]) if multistep else (ve[-1], ve[0])
        ve = schedules.karras_sigmas(lo, hi, steps)
        t = schedules.t_of_ve_sigma(schedule, ve)
        t = t.round() if multistep else t
    alpha, sigma = vp_from_ve(ve)
    return Grid(t, np.append(alpha, 1.0), np.append(sigma, 0.0))


def lcm_grid(schedule: Schedule, steps: int, original_steps: int = 50) -> Grid:
    """Latent consistency models' timesteps (Luo et al. 2023): n evenly skipped from the 50-step DDIM grid."""
    n_train = schedule.num_train_timesteps
    if not 1 <= steps <= original_steps:
        raise ValueError(f"lcm takes 1..{original_steps} steps (its original_inference_steps), got {steps}")
    k = n_train // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    t = origin[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)]
    alpha = np.append(np.asarray(schedule.alpha, np.float64)[t], 1.0)
    sigma = np.append(np.asarray(schedule.sigma, np.float64)[t], 0.0)
    return Grid(t.astype(np.float64), alpha, sigma)


FLOW_SPACINGS = ("table", "dpm", "unipc")


def flow_grid(schedule: Schedule, steps: int, spacing: str = "table", shift: float | None = None,
              sigmas=None) -> Grid:
    """Rectified-flow sigmas as the diffusers scheduler a method mirrors spaces them.

    spacing 'table' (FlowMatchEuler/HeunDiscreteScheduler): linspace between the table's largest and
    smallest sigma, then the time shift (which diffusers applies on top of the already shifted smallest
    sigma); the model sees s * N.
    'dpm' (DPMSolverMultistepScheduler, use_flow_sigmas): n + 1 points on [0, 1 - 1/N] shifted, the 0
    dropped; 'unipc' (UniPCMultistepScheduler, use_flow_sigmas): n + 1 points on [1/N, 1] shifted, the
    last dropped, and s = 1 moved to 1 - 1e-6. diffusers spaces these two differently (by 1/N); we match
    each. Both feed the model int(s * N), as diffusers casts their timesteps to int64.
    shift: the time shift, the schedule's own unless dynamic shifting gives one (`dynamic_shift`).
    sigmas: ('table' only) the unshifted sigmas given (diffusers' `set_timesteps(sigmas=...)`, which reads them
    as float32) in place of the linspace.
    Sigmas are rounded to float32 as diffusers stores them (alpha = 1 - s then matches its alpha_t,
    which matters at s = 1 - 1e-6).
    """
    n_train = schedule.num_train_timesteps
    shift = schedule.shift if shift is None else shift
    if spacing == "table" and sigmas is not None:
        u = np.asarray(sigmas, np.float32).astype(np.float64)
    elif spacing == "table":
        u = np.linspace(float(schedule.sigma[-1]), float(schedule.sigma[0]), steps)
    elif spacing == "dpm":
        u = (1.0 - np.linspace(1.0, 1.0 / n_train, steps + 1))[::-1][:-1]
    elif spacing == "unipc":
        u = np.linspace(1.0, 1.0 / n_train, steps + 1)[:-1]
    else:
        raise ValueError(f"unknown flow spacing {spacing!r}; choose one of: {', '.join(FLOW_SPACINGS)}")
    s = schedules.shift_sigmas(u, shift)
    if spacing == "unipc" and abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6  # diffusers: keeps log(alpha) finite at the first step
    s32 = s.astype(np.float32).astype(np.float64)
    t = s32 * n_train if spacing == "table" else np.trunc(s * n_train)
    return Grid(t, np.append(1.0 - s32, 1.0), np.append(s32, 0.0))
