"""The one entry point that runs any sampler: validation at the edge, then one `lax.scan`.

`sample` builds the method's grid and float64 coefficient plan (both depend only on
static arguments: method, steps, spacing, schedule), then scans the method's pure step
over it. Prompt, seed, guidance scale and noise are traced values, so changing them never
recompiles; changing the step count or shapes does.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion, schedules
from jaxdiff.samplers import grids
from jaxdiff.samplers.base import Method
from jaxdiff.samplers.dpm_solver import DPMPP_2M
from jaxdiff.samplers.first_order import DDIM, DDPM, EULER, EULER_ANCESTRAL, FLOW_EULER, LCM, linear_step
from jaxdiff.samplers.heun import FLOW_HEUN, HEUN
from jaxdiff.samplers.langevin import LANGEVIN_PC
from jaxdiff.samplers.unipc import UNIPC
from jaxdiff.schedules import FLOW, Schedule

METHODS: dict[str, Method] = {m.name: m for m in (
    DDPM, DDIM, EULER, EULER_ANCESTRAL, HEUN, DPMPP_2M, UNIPC, LCM, FLOW_EULER, FLOW_HEUN, LANGEVIN_PC)}

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
# How img2img turns a strength into the steps it runs (see `img2img_start`)
STRENGTH_ROUNDINGS = ("down", "up")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def make_grid(method: Method, schedule: Schedule, steps: int, *, timestep_spacing: str = "leading",
              steps_offset: int = 0, set_alpha_to_one: bool = True, use_karras_sigmas: bool = False,
              mu: float | None = None, use_dynamic_shifting: bool = False,
              time_shift_type: str = "exponential", sigmas=None) -> grids.Grid:
    """The grid a method walks on a schedule (see `grids`; `sample` for the options)."""
    schedule = schedules.concrete(schedule)
    n_train = schedule.num_train_timesteps
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= n_train:
        raise ValueError(f"steps must be an integer in 1..{n_train} (num_train_timesteps), got {steps!r}")
    if timestep_spacing not in grids.SPACINGS:
        raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose one of: {', '.join(grids.SPACINGS)}")
    if use_karras_sigmas and (schedule.kind == FLOW or method.grid not in ("sigma", "sigma_multistep")):
        raise ValueError(f"use_karras_sigmas applies to euler, euler_ancestral, heun, dpmpp_2m and unipc on a discrete "
                         f"schedule, not to {method.name!r} on a {schedule.kind!r} schedule")
    shift = _dynamic_shift(schedule, mu, use_dynamic_shifting, time_shift_type)
    if sigmas is not None:
        _check_sigmas(sigmas, steps, method, schedule)
    if schedule.kind == FLOW:
        if method.grid == "lcm":
            raise ValueError("lcm needs a discrete schedule (its boundary scalings are defined on timesteps)")
        return grids.flow_grid(schedule, steps, method.flow_spacing, shift, sigmas)
    if method.grid == "flow":
        raise ValueError(f"{method.name!r} needs a flow_matching schedule; use 'euler' on a {schedule.kind!r} one")
    if method.grid == "discrete":
        return grids.discrete_grid(schedule, steps, timestep_spacing, steps_offset, set_alpha_to_one)
    if method.grid == "lcm":
        return grids.lcm_grid(schedule, steps)
    return grids.sigma_grid(schedule, steps, timestep_spacing, steps_offset,
                            multistep=method.grid == "sigma_multistep", karras=use_karras_sigmas)


def _dynamic_shift(schedule: Schedule, mu, use_dynamic_shifting: bool, time_shift_type: str) -> float | None:
    """The time shift that dynamic shifting (mu) puts in place of the schedule's; None without mu."""
    if time_shift_type not in schedules.TIME_SHIFT_TYPES:
        raise ValueError(f"unknown time_shift_type {time_shift_type!r}; choose one of: "
                         f"{', '.join(schedules.TIME_SHIFT_TYPES)}")
    if use_dynamic_shifting and mu is None:
        raise ValueError("use_dynamic_shifting needs mu (e.g. jaxdiff.schedules.calculate_shift(image_seq_len))")
    if mu is None:
        return None
    check_number("mu", mu)
    if schedule.kind != FLOW or schedule.shift != 1.0:
        raise ValueError(f"mu (dynamic shifting) applies to an unshifted flow_matching schedule (shift=1), not to a "
                         f"{schedule.kind!r} schedule with shift {schedule.shift:g}: mu replaces the shift")
    return schedules.dynamic_shift(float(mu), time_shift_type)


def _check_sigmas(sigmas, steps: int, method: Method, schedule: Schedule) -> None:
    """Custom sigmas (diffusers' `set_timesteps(sigmas=...)`): one per step, in (0, 1], for the flow samplers
    that walk a FlowMatch scheduler's table."""
    if schedule.kind != FLOW or method.flow_spacing != "table":
        raise ValueError(f"sigmas= applies to flow_euler and flow_heun on a flow_matching schedule, not to "
                         f"{method.name!r} on a {schedule.kind!r} schedule")
    s = np.asarray(sigmas, np.float64)
    if s.shape != (steps,) or not np.isfinite(s).all() or s.min() <= 0 or s.max() > 1:
        raise ValueError(f"sigmas must be {steps} numbers in (0, 1] (one per step), got {sigmas!r}")


def img2img_start(steps: int, strength: float, rounding: str = "down") -> int:
    """The grid point img2img starts from, as diffusers' pipelines compute it in Python floats: 'down' runs
    int(steps * strength) steps (its SD and SDXL pipelines), 'up' skips int(steps - steps * strength) steps and so
    runs steps * strength rounded up (its SD3 and Flux img2img pipelines). E.g. 4 steps at strength 0.6: 2 or 3."""
    if rounding not in STRENGTH_ROUNDINGS:
        raise ValueError(f"unknown strength_rounding {rounding!r}; choose one of: {', '.join(STRENGTH_ROUNDINGS)}")
    if rounding == "down":
        return steps - min(int(steps * strength), steps)
    return int(max(steps - min(steps * strength, steps), 0))


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf) -> None:
    """A scalar argument must be a finite number in [low, high]; traced values (unknown until run) pass."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        ok = np.ndim(value) == 0 and not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok or not low <= float(value) <= high:
        bounded = (low, high) != (-math.inf, math.inf)
        raise ValueError(f"{name} must be {f'in [{low:g}, {high:g}]' if bounded else 'a finite number'}, got {value!r}")


def check_model_output(out, x, who: str = "model_fn") -> None:
    """At trace time: a model's output must have x_t's shape and a floating dtype (a batch of 1 or fewer
    channels would otherwise broadcast silently through the sampler's arithmetic)."""
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != x.shape or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{who} returned shape {shape} dtype {dtype} for x_t of shape {x.shape} dtype {x.dtype}; "
                         f"it must return x_t's shape in a floating dtype")


def _options(method: Method, options: dict) -> dict:
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        allowed = ", ".join(method.options) or "none"
        raise TypeError(f"sampler {method.name!r} does not take option(s) {', '.join(unknown)}; it takes: {allowed}")
    for name, value in options.items():
        if isinstance(method.options[name], (int, float)):  # numeric options (eta, snr, ...): no nan or inf
            check_number(name, value)
    return {**method.options, **options}


def _check_start(prediction_type: str, grid: grids.Grid, method: Method) -> None:
    if grid.alpha[0] == 0 and prediction_type in ("epsilon", "score"):
        raise ValueError(f"prediction_type {prediction_type!r} cannot recover x_0 where alpha = 0 (zero terminal SNR "
                         f"at t={grid.t[0]:g}); use v_prediction, sample or flow, or start below the last timestep")
    if grid.alpha[0] == 0 and method.needs_finite_ve:
        raise ValueError(f"{method.name!r} integrates in sigma/alpha, which is infinite at zero terminal SNR; "
                         f"use euler, dpmpp_2m, unipc or ddim on this schedule")


def _check_array(name, a, like=None):
    if not hasattr(a, "shape") or not jnp.issubdtype(a.dtype, jnp.floating) or a.ndim < 1:
        raise ValueError(f"{name} must be a floating array with a leading batch axis, got {type(a).__name__} "
                         f"{getattr(a, 'shape', '')} {getattr(a, 'dtype', '')}")
    if like is not None and a.shape != like.shape:
        raise ValueError(f"{name} has shape {a.shape} but noise has shape {like.shape}")


def sample(model_fn: ModelFn, schedule: Schedule, noise, *, key=None, method: str = "ddim", steps: int = 50,
           prediction_type: str = "epsilon", timestep_spacing: str = "leading", steps_offset: int = 0,
           set_alpha_to_one: bool = True, use_karras_sigmas: bool = False, mu: float | None = None,
           use_dynamic_shifting: bool = False, time_shift_type: str = "exponential", sigmas=None, x_init=None,
           strength: float = 1.0, strength_rounding: str = "down",
           hook: Callable | None = None, step_noise=None, noise_fn: Callable | None = None,
           return_trajectory: bool = False,
           callback: Callable[[Any], None] | None = None, **options):
    """Draws x_0 from noise with a named sampler, as one `lax.scan` (jittable end to end).

    Args:
      model_fn: (x_t [B, ...], t [B]) -> model output; sees what a diffusers model would see
        at that step (x_t after the scheduler's input scaling; t on the training scale,
        sigma * N for flow matching).
      schedule: from `jaxdiff.schedules` (closed over, not traced: its tables are float64).
      noise: [B, ...] standard normal; scaled as diffusers' `init_noise_sigma` does.
      key: PRNG key for the stochastic samplers (ddpm, ddim with eta > 0, euler_ancestral, lcm,
        langevin_pc); step i draws from `fold_in(key, i)`.
      method: one of `METHODS`.
      steps: number of sampler steps (model calls: 1 per step; heun 2 but 1 on its last;
        langevin_pc 1 + corrector_steps).
      prediction_type: epsilon, v_prediction, sample, flow or score.
      timestep_spacing, steps_offset: diffusers' `set_timesteps` rules (SD: leading, 1).
      set_alpha_to_one: the discrete grid ends at alpha = 1 (else at the first timestep's alpha; SD: False).
      use_karras_sigmas: Karras sigma spacing for the sigma-grid samplers.
        These options and `prediction_type` carry diffusers' scheduler-config names and values
        (`jaxdiff.convert.scheduler` maps a whole config), except prediction_type 'flow' for 'flow_prediction'.
      mu: dynamic shifting on a flow schedule of shift 1 (Flux's resolution-dependent shift, what diffusers'
        `set_timesteps(mu=...)` takes; `jaxdiff.schedules.calculate_shift` computes it from the token count):
        the steps are shifted by exp(mu), or by mu with time_shift_type='linear'. A Python number: it
        shapes the grid, so a new mu recompiles (as a new step count does).
      use_dynamic_shifting: the config says so; then mu must be given (as diffusers requires).
      sigmas: flow_euler / flow_heun only: the steps' unshifted sigmas (one per step, e.g. the Flux pipeline's
        linspace(1, 1/steps, steps)) in place of the scheduler's spacing; the shift (or mu) still applies.
        A tuple of Python numbers: it shapes the grid.
      x_init, strength: img2img; start from x_init noised to the step where `strength` of the
        steps remain (diffusers' rule); strength 0 returns x_init.
      strength_rounding: 'down' (SD's pipelines) or 'up' (SD3's and Flux's): see `img2img_start`.
      hook: (x_next, point) -> x_next after every step, `point` a dict of the next grid
        point's t, alpha, sigma and `last`; e.g. `mask_blend` for inpainting.
      step_noise: optional [steps, k, B, ...] normal draws to use instead of `key` (k draws per step).
      noise_fn: (key, shape) -> standard normal draws of that shape, what the stochastic samplers draw
        their step noise with (default `jax.random.normal`); e.g. `diffusion.frame_correlated_noise`
        with axis=2 for videos [B, T, ...] (a step's draws are [k, B, T, ...]).
      return_trajectory: also return {'x': [n, B, ...] x after each step, 'x0': [n, B, ...] predictions}.
      callback: a host function called with the step number (1..n) after every step, through
        `jax.debug.callback` (progress bars); it is part of the program, so keep the same one.
      **options: method options (ddim: eta; ddpm: variance_type; langevin_pc: snr, corrector_steps).
    Returns: x_0 [B, ...] float32 (and the trajectory if asked).
    """
    m = get_method(method)
    diffusion.check_prediction_type(prediction_type)
    opts = _options(m, options)
    _check_array("noise", noise)
    if x_init is not None:
        _check_array("x_init", x_init, noise)
    check_number("strength", strength, 0.0, 1.0)
    grid = make_grid(m, schedule, steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                     set_alpha_to_one=set_alpha_to_one, use_karras_sigmas=use_karras_sigmas, mu=mu,
                     use_dynamic_shifting=use_dynamic_shifting, time_shift_type=time_shift_type, sigmas=sigmas)
    noise = jnp.asarray(noise, jnp.float32)
    if x_init is None:
        ve_start = m.ve_start and timestep_spacing in ("linspace", "trailing") and schedule.kind != FLOW
        x = noise * (grid.sigma[0] if ve_start else 1.0)
    else:
        grid = grid.tail(img2img_start(steps, strength, strength_rounding))
        x_init = jnp.asarray(x_init, jnp.float32)
        if grid.steps == 0:
            empty = jnp.zeros((0,) + noise.shape, jnp.float32)
            return (x_init, {"x": empty, "x0": empty}) if return_trajectory else x_init
        x = grid.alpha[0] * x_init + grid.sigma[0] * noise
    _check_start(prediction_type, grid, m)
    plan = m.plan(grid, **{k: v for k, v in opts.items() if k not in m.step_options})
    step = functools.partial(m.step, **{k: opts[k] for k in m.step_options})
    init = m.init(x) if m.init else {}
    return _scan(model_fn, prediction_type, step, grid, plan, {"x": x, **init}, key, m.noises(opts),
                 step_noise, hook, return_trajectory, callback, noise_fn)


def ddim_invert(model_fn: ModelFn, schedule: Schedule, x0, *, steps: int = 50, prediction_type: str = "epsilon",
                timestep_spacing: str = "leading", steps_offset: int = 0, set_alpha_to_one: bool = True,
                return_trajectory: bool = False):
    """DDIM inversion x_0 -> x_T: the deterministic DDIM grid walked backwards.

    Each step from point i+1 up to point i evaluates the model at the *target* timestep t_i on the
    current (less noisy) x, since x at t_i is not yet known -- the approximation every DDIM
    inversion makes (Dhariwal & Nichol 2021; diffusers' DDIMInverseScheduler does the same).
    Sampling the result with method='ddim' on the same grid returns close to x_0.
    """
    diffusion.check_prediction_type(prediction_type)
    _check_array("x0", x0)
    grid = make_grid(DDIM, schedule, steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                     set_alpha_to_one=set_alpha_to_one)
    # reversed walk: source point = grid[i + 1], target point = grid[i], i = n-1 .. 0
    rev = grids.Grid(t=grid.t[::-1], alpha=grid.alpha[::-1], sigma=grid.sigma[::-1])
    if prediction_type in ("epsilon", "score") and rev.alpha[-1] == 0:
        raise ValueError(f"prediction_type {prediction_type!r} cannot invert to zero terminal SNR")
    n = grid.steps
    plan = {"A": np.zeros(n), "B": rev.alpha[1:], "C": rev.sigma[1:]}
    # step k: the model sees the target timestep rev.t[k]; its output is read at the source rev.alpha[k]
    return _scan(model_fn, prediction_type, linear_step, rev, plan, {"x": jnp.asarray(x0, jnp.float32)}, None, 0,
                 None, None, return_trajectory, None)


def denoiser(model_fn: ModelFn, prediction_type: str):
    """denoise(x, t, alpha, sigma) -> (x0_hat, eps_hat): the model at timestep t, read at (alpha, sigma)."""
    def denoise(x, t, alpha, sigma):
        out = model_fn(x, jnp.broadcast_to(t, x.shape[:1]))
        check_model_output(out, x)
        return diffusion.to_x0_eps(prediction_type, jnp.asarray(out, jnp.float32), x, alpha, sigma)

    return denoise


def step_inputs(grid: grids.Grid, plan: dict) -> dict[str, np.ndarray]:
    """Per-step values a `step` reads (see `base`): the plan plus the grid's current and next point, [n] float64."""
    n = grid.steps
    return {**plan, "t": grid.t, "alpha": grid.alpha[:-1], "sigma": grid.sigma[:-1], "alpha_next": grid.alpha[1:],
            "sigma_next": grid.sigma[1:], "t_next": np.append(grid.t[1:], 0.0),
            "last": (np.arange(n) == n - 1).astype(np.float64)}


def _scan(model_fn, prediction_type, step, grid: grids.Grid, plan, state, key, k_noise, step_noise, hook,
          return_trajectory, callback, noise_fn=None):
    n = grid.steps
    coeffs = {k: jnp.asarray(v, jnp.float32) for k, v in step_inputs(grid, plan).items()}
    x = state["x"]
    if k_noise and step_noise is None and key is None:
        raise ValueError("this sampler draws noise at every step: pass key=jax.random.key(seed)")
    if step_noise is not None:
        step_noise = jnp.asarray(step_noise, jnp.float32).reshape((n, k_noise) + x.shape)

    denoise = denoiser(model_fn, prediction_type)
    draw = noise_fn or functools.partial(jax.random.normal, dtype=jnp.float32)

    def body(state, inputs):
        c, i, given = inputs
        if not k_noise:
            noise = jnp.zeros((0,) + x.shape, jnp.float32)
        elif given is not None:
            noise = given
        else:
            noise = jnp.asarray(draw(jax.random.fold_in(key, i), (k_noise,) + x.shape), jnp.float32)
        state, x0 = step(state, c, denoise, noise)
        if hook is not None:
            point = {"t": c["t_next"], "alpha": c["alpha_next"], "sigma": c["sigma_next"], "last": c["last"]}
            state = {**state, "x": hook(state["x"], point)}
        if callback is not None:
            jax.debug.callback(callback, i + 1, ordered=True)
        return state, ((state["x"], x0) if return_trajectory else None)

    state, ys = jax.lax.scan(body, state, (coeffs, jnp.arange(n), step_noise))
    if return_trajectory:
        return state["x"], {"x": ys[0], "x0": ys[1]}
    return state["x"]


def mask_blend(known_x0, mask, noise) -> Callable:
    """Inpainting hook: keep the known region, noised to each step's level, where mask == 0.

    After every step x <- mask * x + (1 - mask) * (alpha' known + sigma' noise), and exactly
    `known` after the last step (RePaint-style blending as in diffusers' 4-channel inpainting).
    Args: known_x0, noise: [B, ...]; mask: broadcastable, 1 = generate, 0 = keep.
    """
    def hook(x, point):
        noised = point["alpha"] * known_x0 + point["sigma"] * noise
        keep = jnp.where(point["last"] > 0, known_x0, noised)
        return mask * x + (1.0 - mask) * keep

    return hook
