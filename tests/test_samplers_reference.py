"""Every sampler against diffusers' scheduler on the same model function, schedule and noise.

Golden files come from tests/fixtures/make_sampler_fixtures.py (diffusers + torch); stochastic
samplers replay the noise diffusers drew at each step.
"""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

CASES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "samplers", "*.npz")))


def model_fn(x, t):
    """Same analytic model as the fixture script's torch version."""
    t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.8 * x + 0.1 * jnp.sin(3.0 * x) * jnp.cos(t / 500.0) + 0.02 * t / 1000.0


def schedule_of(meta):
    spec = dict(meta["schedule"])
    name = spec.pop("beta_schedule")
    return jd.schedules.get(name, 1000, **spec)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_all_fixture_cases_present():
    names = {os.path.basename(c)[:-4] for c in CASES}
    for method in ("ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpmpp_2m", "unipc", "lcm", "flow_euler",
                   "ddim_inverse"):
        assert any(n.startswith(method) for n in names), method


@pytest.mark.parametrize("path", CASES, ids=lambda p: os.path.basename(p)[:-4])
def test_matches_diffusers(path):
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    schedule = schedule_of(meta)
    kwargs = dict(meta["sample"])
    method = kwargs.pop("method")
    if method == "ddim_invert":
        out = jd.samplers.ddim_invert(model_fn, schedule, jnp.asarray(data["noise"]), steps=meta["steps"], **kwargs)
    else:
        m = jd.samplers.get_method(method)
        k = m.noises({**m.options, **{o: kwargs[o] for o in m.options if o in kwargs}})
        step_noise = data["step_noise"][:, None] if k else None
        fn = jax.jit(lambda noise, sn: jd.samplers.sample(model_fn, schedule, noise, method=method,
                                                           steps=meta["steps"], step_noise=sn, **kwargs))
        out = fn(jnp.asarray(data["noise"]), step_noise)
    err = rel_err(out, data["output"])
    assert err <= 1e-5, f"{meta['scheduler']}: relative error {err:.2e}"


SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
# diffusers scheduler configs as a diffusers user holds them: the fixture script's configs of these cases
DIFFUSERS_CONFIGS = {
    "ddim_sd_leading": {"_class_name": "DDIMScheduler", **SD, "set_alpha_to_one": False, "steps_offset": 1,
                        "clip_sample": False},
    "euler_karras": {"_class_name": "EulerDiscreteScheduler", **SD, "use_karras_sigmas": True,
                     "timestep_spacing": "leading"},
    "dpmpp_2m_karras": {"_class_name": "DPMSolverMultistepScheduler", **SD, "use_karras_sigmas": True},
}


@pytest.mark.parametrize("case", sorted(DIFFUSERS_CONFIGS))
def test_a_diffusers_config_samples_as_diffusers_does(case):
    """A diffusers scheduler config maps (`schedule_from_config`) to the fixture's schedule and sample
    arguments, under diffusers' own option names (set_alpha_to_one, use_karras_sigmas, ...), and
    those options, copied out of the config dict, drive `sample` to diffusers' output."""
    from jaxdiff.convert.scheduler import schedule_from_config

    data = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers", f"{case}.npz"))
    meta = json.loads(str(data["meta"]))
    config = DIFFUSERS_CONFIGS[case]
    schedule, kwargs = schedule_from_config(config)
    np.testing.assert_array_equal(schedule.alphas_cumprod, schedule_of(meta).alphas_cumprod)
    assert {k: kwargs[k] for k in meta["sample"]} == meta["sample"]
    copied = {k: config[k] for k in ("set_alpha_to_one", "use_karras_sigmas", "steps_offset", "timestep_spacing")
              if k in config}
    noise = jnp.asarray(data["noise"])
    mapped = jd.samplers.sample(model_fn, schedule, noise, steps=meta["steps"], **kwargs)
    direct = jd.samplers.sample(model_fn, schedule, noise, steps=meta["steps"], method=kwargs["method"], **copied)
    np.testing.assert_array_equal(mapped, direct)
    assert rel_err(mapped, data["output"]) <= 1e-5
