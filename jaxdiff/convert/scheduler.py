"""A diffusers `scheduler_config.json` as a jaxdiff schedule plus the matching `sample` arguments.

`sample` takes diffusers' own names for the options it shares with a scheduler config
(prediction_type, timestep_spacing, steps_offset, set_alpha_to_one, use_karras_sigmas), so those
keys pass through under the same names; only the class name and the prediction type
'flow_prediction' are translated.

Flow matching: FlowMatch*Scheduler configs (`shift`) and DPM-Solver / UniPC ones with
`use_flow_sigmas` (`flow_shift`) become a `flow_matching` schedule of that shift; with
`use_dynamic_shifting` the schedule is unshifted (shift 1, as diffusers' table is) and the kwargs
carry `use_dynamic_shifting` and `time_shift_type`, so `sample` wants `mu`, which depends on the
image: `dynamic_shift_mu(config, image_seq_len)` computes it from the config's own constants.
"""
from __future__ import annotations

from typing import Any

from jaxdiff import schedules
from jaxdiff.convert.common import CheckpointError

# diffusers scheduler class -> our sampler (PNDM/PLMS has no counterpart: pick a method)
METHOD_OF_CLASS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
    "FlowMatchHeunDiscreteScheduler": "flow_heun",
    "PNDMScheduler": None,
}
# diffusers' own default spacing per class, for configs that do not say
DEFAULT_SPACING = {"DPMSolverMultistepScheduler": "linspace", "EulerDiscreteScheduler": "linspace",
                   "EulerAncestralDiscreteScheduler": "linspace", "HeunDiscreteScheduler": "linspace",
                   "UniPCMultistepScheduler": "linspace"}
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample",
                    "flow_prediction": "flow"}
# fields whose value changes the math; anything else we do not implement must keep its default
UNSUPPORTED_IF = {
    "clip_sample": (True,), "thresholding": (True,), "stochastic_sampling": (True,),
    "use_exponential_sigmas": (True,), "use_beta_sigmas": (True,), "invert_sigmas": (True,),
    "shift_terminal": "any", "final_sigmas_type": ("sigma_min",), "euler_at_final": (True,),
    "timestep_type": ("continuous",), "interpolation_type": ("log_linear",),
}


def schedule_from_config(config: dict) -> tuple[schedules.Schedule, dict[str, Any]]:
    """(schedule, sample kwargs) for a diffusers scheduler config.

    The kwargs hold `method` (absent for PNDM), `prediction_type`, `timestep_spacing`,
    `steps_offset`, `set_alpha_to_one` and `use_karras_sigmas`, and with dynamic shifting
    `use_dynamic_shifting` and `time_shift_type` (then pass `mu=dynamic_shift_mu(config, image_seq_len)`).
    """
    cls = config.get("_class_name")
    if cls not in METHOD_OF_CLASS:
        raise CheckpointError(f"scheduler {cls!r} is not supported; supported: {', '.join(METHOD_OF_CLASS)}")
    for field, bad in UNSUPPORTED_IF.items():
        value = config.get(field)
        if value is not None and (bad == "any" or value in bad):
            raise CheckpointError(f"scheduler config field {field}={value!r} is not supported")
    if config.get("algorithm_type", "dpmsolver++") != "dpmsolver++" or config.get("solver_order", 2) != 2:
        raise CheckpointError(f"only DPM-Solver++ of order 2 is implemented, got algorithm_type="
                              f"{config.get('algorithm_type')!r}, solver_order={config.get('solver_order')!r}")
    # FlowMatch*Scheduler has no prediction_type: its models predict the flow velocity
    flow_class = cls.startswith("FlowMatch")
    prediction = config.get("prediction_type", "flow_prediction" if flow_class else "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise CheckpointError(f"prediction_type {prediction!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}")
    n = int(config.get("num_train_timesteps", 1000))
    dynamic = bool(config.get("use_dynamic_shifting", False))
    if flow_class or config.get("use_flow_sigmas"):
        if config.get("use_karras_sigmas"):
            raise CheckpointError("use_karras_sigmas on flow sigmas is not supported")
        shift = 1.0 if dynamic else float(config.get("shift" if flow_class else "flow_shift", 1.0))
        schedule = schedules.get("flow_matching", n, shift=shift)
    elif dynamic:
        raise CheckpointError("use_dynamic_shifting applies to flow sigmas (a FlowMatch* class or use_flow_sigmas)")
    elif config.get("trained_betas") is not None:
        schedule = schedules.from_betas(config["trained_betas"])
    else:
        beta_schedule = config.get("beta_schedule", "linear")
        kwargs = {} if beta_schedule == "squaredcos_cap_v2" else {
            "beta_start": float(config.get("beta_start", 1e-4)), "beta_end": float(config.get("beta_end", 0.02))}
        schedule = schedules.get(beta_schedule, n, rescale_zero_terminal_snr=bool(config.get("rescale_betas_zero_snr")),
                                 **kwargs)
    kwargs = {"prediction_type": PREDICTION_TYPES[prediction],
              "timestep_spacing": config.get("timestep_spacing", DEFAULT_SPACING.get(cls, "leading")),
              "steps_offset": int(config.get("steps_offset", 0)),
              "set_alpha_to_one": bool(config.get("set_alpha_to_one", True)),
              "use_karras_sigmas": bool(config.get("use_karras_sigmas", False))}
    if dynamic:
        kwargs.update(use_dynamic_shifting=True, time_shift_type=config.get("time_shift_type", "exponential"))
    if METHOD_OF_CLASS[cls] is not None:
        kwargs["method"] = METHOD_OF_CLASS[cls]
    return schedule, kwargs


def dynamic_shift_mu(config: dict, image_seq_len: int) -> float:
    """mu for an image of `image_seq_len` latent tokens, from the config's `base_image_seq_len`,
    `max_image_seq_len`, `base_shift` and `max_shift` (diffusers' defaults where absent), as the Flux
    pipeline computes it."""
    return schedules.calculate_shift(image_seq_len, int(config.get("base_image_seq_len", 256)),
                                     int(config.get("max_image_seq_len", 4096)),
                                     float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15)))
