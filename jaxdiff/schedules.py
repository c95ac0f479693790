"""Noise schedules as pytrees: discrete variance-preserving tables and rectified flow.

Every schedule is described the same way, over the training timesteps i = 0..N-1:

    x_i = alpha[i] * x_0 + sigma[i] * eps,      eps ~ N(0, I)

and `timesteps[i]` is the value the model sees for index i (i itself for discrete
schedules, following diffusers; sigma * N for flow matching, as diffusers' flow
schedulers do). Samplers only ever read (alpha, sigma, timesteps), so any monotone
table -- a beta schedule, a user's alphas_cumprod or a sigma table -- works with every
sampler unchanged.

Tables are built in NumPy float64 and kept that way: samplers derive their per-step
coefficients from them at trace time (in float64), and code that indexes them inside
`jit` casts to float32 (`Schedule.table`).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DISCRETE, FLOW = "discrete", "flow"


@struct.dataclass
class Schedule:
    """A noise schedule over N training timesteps (see module docstring).

    Attributes:
      alpha: [N] float64, signal scale.
      sigma: [N] float64, noise scale.
      timesteps: [N] float64, the model's timestep input at each index.
      kind: 'discrete' (variance preserving, alpha^2 + sigma^2 = 1) or 'flow'
        (rectified flow, alpha + sigma = 1).
      shift: the flow schedule's time shift (samplers space their steps with it as diffusers do).
    """

    alpha: np.ndarray
    sigma: np.ndarray
    timesteps: np.ndarray
    kind: str = struct.field(pytree_node=False, default=DISCRETE)
    shift: float = struct.field(pytree_node=False, default=1.0)

    @property
    def num_train_timesteps(self) -> int:
        return int(np.shape(self.alpha)[0])

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """alpha_bar_t = alpha^2 / (alpha^2 + sigma^2) (exactly alpha^2 for VP schedules)."""
        a, s = _f64(self.alpha), _f64(self.sigma)
        return a**2 / (a**2 + s**2)

    @property
    def betas(self) -> np.ndarray:
        ac = self.alphas_cumprod
        return 1.0 - ac / np.concatenate([[1.0], ac[:-1]])

    @property
    def log_snr(self) -> np.ndarray:
        """lambda_i = log(alpha_i^2 / sigma_i^2) on the training grid (+inf where sigma = 0)."""
        with np.errstate(divide="ignore"):
            return 2.0 * (np.log(_f64(self.alpha)) - np.log(_f64(self.sigma)))

    @property
    def ve_sigma(self) -> np.ndarray:
        """sigma_i / alpha_i: the noise level of x / alpha (the variance-exploding / Karras view)."""
        with np.errstate(divide="ignore"):
            return _f64(self.sigma) / _f64(self.alpha)

    def table(self, name: str, t):
        """Looks up `alpha`, `sigma` or `timesteps` at integer indices t inside jit, as float32."""
        return jnp.asarray(np.asarray(getattr(self, name), np.float32))[t]


def concrete(schedule: Schedule) -> Schedule:
    """The schedule with float64 NumPy tables; a clear error if it was traced through jit."""
    return schedule.replace(alpha=_f64(schedule.alpha), sigma=_f64(schedule.sigma),
                            timesteps=_f64(schedule.timesteps))


def _f64(a) -> np.ndarray:
    try:
        return np.asarray(a, dtype=np.float64)
    except Exception as e:  # a tracer: the schedule was passed through jit as an argument
        raise TypeError(
            "schedule tables must be concrete: close over the schedule (or mark it static) instead of "
            "passing it through jax.jit as a traced argument; its tables are used in float64 at trace time"
        ) from e


# ----------------------------------------------------------------------------- beta schedules


def linear_betas(n: int, beta_start: float, beta_end: float) -> np.ndarray:
    """DDPM's linear schedule (Ho et al. 2020)."""
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)


def scaled_linear_betas(n: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Stable Diffusion's schedule: linear in sqrt(beta)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2


def cosine_betas(n: int, max_beta: float = 0.999, s: float = 0.008) -> np.ndarray:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17), diffusers' squaredcos_cap_v2."""
    def alpha_bar(t):
        return np.cos((t + s) / (1 + s) * np.pi / 2) ** 2

    t = np.arange(n, dtype=np.float64)
    return np.minimum(1.0 - alpha_bar((t + 1) / n) / alpha_bar(t / n), max_beta)


def sigmoid_betas(n: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Sigmoid schedule (GeoDiff, Xu et al. 2022), as in diffusers."""
    x = np.linspace(-6.0, 6.0, n, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha_bar) so the last step has SNR exactly 0 and the first is unchanged.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
    """
    r = np.sqrt(np.asarray(alphas_cumprod, np.float64))
    r0, rT = r[0], r[-1]
    r = (r - rT) * r0 / (r0 - rT)
    return r**2


_zero_terminal_snr = rescale_zero_terminal_snr  # `get` has a keyword argument of the same name


# ----------------------------------------------------------------------------- constructors


def from_alphas_cumprod(alphas_cumprod) -> Schedule:
    """A discrete VP schedule from any strictly decreasing alpha_bar table in (0, 1]."""
    ac = np.asarray(alphas_cumprod, np.float64)
    if ac.ndim != 1 or ac.size < 2:
        raise ValueError(f"alphas_cumprod must be a 1-D table of at least 2 values, got shape {ac.shape}")
    if not (np.all(ac >= 0) and np.all(ac <= 1)):
        raise ValueError("alphas_cumprod must lie in [0, 1]")
    if not np.all(np.diff(ac) < 0):
        raise ValueError("alphas_cumprod must be strictly decreasing (noise grows with t)")
    if ac[0] == 0:
        raise ValueError("alphas_cumprod[0] must be > 0 (the first step cannot be pure noise)")
    return Schedule(alpha=np.sqrt(ac), sigma=np.sqrt(1.0 - ac),
                    timesteps=np.arange(ac.size, dtype=np.float64), kind=DISCRETE)


def from_betas(betas) -> Schedule:
    b = np.asarray(betas, np.float64)
    if not np.all((b > 0) & (b <= 1)):
        raise ValueError("betas must lie in (0, 1]")
    return from_alphas_cumprod(np.cumprod(1.0 - b))


def from_sigmas(sigmas) -> Schedule:
    """A discrete schedule from a strictly increasing variance-exploding sigma table (k-diffusion's view).

    The VE process x + sigma * eps is the VP one scaled by 1/alpha: alpha_bar = 1 / (1 + sigma^2).
    """
    s = np.asarray(sigmas, np.float64)
    if s.ndim != 1 or not np.all(np.diff(s) > 0) or s[0] <= 0:
        raise ValueError("sigmas must be a 1-D, strictly increasing table of positive values")
    return from_alphas_cumprod(1.0 / (1.0 + s**2))


def flow_matching(num_train_timesteps: int = 1000, shift: float = 1.0) -> Schedule:
    """Rectified flow (Liu et al. 2022; Esser et al. 2024): x_s = (1 - s) x_0 + s eps.

    s_i = shift * u / (1 + (shift - 1) * u) with u = (i + 1) / N, the resolution shift of SD3
    (larger shift spends more steps at high noise); the model sees s * N, as in diffusers.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = np.arange(1, num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    s = shift_sigmas(u, shift)
    return Schedule(alpha=1.0 - s, sigma=s, timesteps=s * num_train_timesteps, kind=FLOW, shift=float(shift))


def shift_sigmas(s: np.ndarray, shift: float) -> np.ndarray:
    """The SD3 time shift s -> shift * s / (1 + (shift - 1) s)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent mu: linear in the number of latent tokens (diffusers' `calculate_shift`).

    The scheduler config holds the four constants (`base_image_seq_len`, `max_image_seq_len`, `base_shift`,
    `max_shift`; `jaxdiff.convert.scheduler.dynamic_shift_mu` reads them); pass the result as `mu=`.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def dynamic_shift(mu: float, time_shift_type: str = "exponential") -> float:
    """The time shift that diffusers' `time_shift(mu, 1, s)` applies: exp(mu) ('exponential') or mu ('linear').

    exp(mu) / (exp(mu) + (1/s - 1)) is `shift_sigmas(s, exp(mu))` rewritten.
    """
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ValueError(f"unknown time_shift_type {time_shift_type!r}; choose one of: {', '.join(TIME_SHIFT_TYPES)}")
    return math.exp(mu) if time_shift_type == "exponential" else float(mu)


TIME_SHIFT_TYPES = ("exponential", "linear")


def resolution_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flow shift for a resolution (Flux/SD3 'dynamic shifting'): exp(mu), mu linear in token count."""
    return math.exp(calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift))


_BETAS: dict[str, tuple[Callable, dict]] = {
    "linear": (linear_betas, dict(beta_start=1e-4, beta_end=0.02)),
    "scaled_linear": (scaled_linear_betas, dict(beta_start=0.00085, beta_end=0.012)),
    "cosine": (cosine_betas, dict()),
    "squaredcos_cap_v2": (cosine_betas, dict()),
    "sigmoid": (sigmoid_betas, dict(beta_start=1e-4, beta_end=0.02)),
}
NAMES = tuple(sorted([*_BETAS, "flow_matching"]))


def get(name: str, num_train_timesteps: int = 1000, *, rescale_zero_terminal_snr: bool = False,
        **kwargs) -> Schedule:
    """A schedule by name: linear, scaled_linear, cosine (= squaredcos_cap_v2), sigmoid, flow_matching.

    Beta schedules take `beta_start` / `beta_end` (defaults: DDPM's 1e-4..0.02 for linear and
    sigmoid, Stable Diffusion's 0.00085..0.012 for scaled_linear); flow_matching takes `shift`.
    """
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    if name == "flow_matching":
        if rescale_zero_terminal_snr:
            raise ValueError("rescale_zero_terminal_snr applies to beta schedules; flow_matching already ends at SNR 0")
        _check_kwargs(name, kwargs, {"shift"})
        return flow_matching(num_train_timesteps, **kwargs)
    if name not in _BETAS:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(NAMES)}")
    fn, defaults = _BETAS[name]
    _check_kwargs(name, kwargs, set(defaults) | ({"max_beta"} if fn is cosine_betas else set()))
    betas = fn(num_train_timesteps, **{**defaults, **kwargs})
    ac = np.cumprod(1.0 - betas)
    return from_alphas_cumprod(_zero_terminal_snr(ac) if rescale_zero_terminal_snr else ac)


def _check_kwargs(name, kwargs, allowed):
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise TypeError(f"schedule {name!r} does not take {', '.join(bad)}; it takes: {', '.join(sorted(allowed)) or 'nothing'}")


# ----------------------------------------------------------------------------- continuous views


def interp_log_snr(schedule: Schedule, t):
    """lambda(t) at continuous t in [0, N-1], linear between table entries (float32, jittable)."""
    table = jnp.asarray(np.clip(schedule.log_snr, -1e4, 1e4), jnp.float32)
    return jnp.interp(jnp.asarray(t, jnp.float32), jnp.arange(table.shape[0], dtype=jnp.float32), table)


def sigma_of_log_snr(log_snr):
    """VP sigma for a log-SNR: sigma^2 = sigmoid(-lambda) (Kingma et al. 2021, VDM)."""
    return jnp.sqrt(jax.nn.sigmoid(-log_snr))


def alpha_of_log_snr(log_snr):
    """VP alpha for a log-SNR: alpha^2 = sigmoid(lambda)."""
    return jnp.sqrt(jax.nn.sigmoid(log_snr))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """EDM sigma spacing, Karras et al. 2022 eq. 5: descending from sigma_max to sigma_min (float64)."""
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def t_of_ve_sigma(schedule: Schedule, ve_sigma) -> np.ndarray:
    """Continuous timestep for a VE sigma, interpolating log(sigma) over the table (as diffusers)."""
    log_table = np.log(schedule.ve_sigma)
    return np.interp(np.log(np.maximum(ve_sigma, 1e-10)), log_table, np.arange(log_table.size, dtype=np.float64))
