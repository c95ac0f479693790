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
                   "flow_heun", "dpmpp_2m_flow", "unipc_flow", "ddim_inverse"):
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


FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}
WAN = {"num_train_timesteps": 1000, "use_flow_sigmas": True, "prediction_type": "flow_prediction"}
# flow configs as diffusers users hold them (Flux's, SD3's, Wan's); image_seq_len for those that shift dynamically
FLOW_CONFIGS = {
    "flow_euler_dynamic": (FLUX, 1024),
    "flow_euler_shift3": ({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                           "shift": 3.0}, None),
    "flow_heun_shift3": ({"_class_name": "FlowMatchHeunDiscreteScheduler", "num_train_timesteps": 1000,
                          "shift": 3.0}, None),
    "dpmpp_2m_flow_shift3": ({"_class_name": "DPMSolverMultistepScheduler", **WAN, "flow_shift": 3.0}, None),
    "dpmpp_2m_flow_dynamic": ({"_class_name": "DPMSolverMultistepScheduler", **WAN, "use_dynamic_shifting": True},
                              1024),
    "unipc_flow_shift5": ({"_class_name": "UniPCMultistepScheduler", **WAN, "flow_shift": 5.0}, None),
    "unipc_flow_dynamic": ({"_class_name": "UniPCMultistepScheduler", **WAN, "use_dynamic_shifting": True}, 1024),
}


@pytest.mark.parametrize("case", sorted(FLOW_CONFIGS))
def test_a_diffusers_flow_config_samples_as_diffusers_does(case):
    """Flow scheduler configs (shift, use_dynamic_shifting and its constants, use_flow_sigmas, flow_shift) map to
    the fixture's schedule and sample arguments; mu comes from the config's constants as the Flux pipeline's
    `calculate_shift` computes it (to the float), and the mapped run reproduces diffusers."""
    from jaxdiff.convert.scheduler import dynamic_shift_mu, schedule_from_config

    data = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers", f"{case}.npz"))
    meta = json.loads(str(data["meta"]))
    config, seq_len = FLOW_CONFIGS[case]
    schedule, kwargs = schedule_from_config(config)
    expected = schedule_of(meta)
    np.testing.assert_array_equal(schedule.sigma, expected.sigma)
    assert schedule.shift == expected.shift
    want = {k: v for k, v in meta["sample"].items() if k != "mu"}
    assert {k: kwargs[k] for k in want} == want
    mu = None
    if seq_len is not None:
        mu = dynamic_shift_mu(config, seq_len)
        assert mu == pytest.approx(meta["sample"]["mu"], rel=1e-15)
    out = jd.samplers.sample(model_fn, schedule, jnp.asarray(data["noise"]), steps=meta["steps"], mu=mu, **kwargs)
    assert rel_err(out, data["output"]) <= 1e-5


@pytest.mark.parametrize("case", ["dpmpp_2m_flow_shift3", "unipc_flow_shift5", "unipc_flow_dynamic",
                                  "flow_euler_dynamic", "flow_heun_shift3"])
def test_flow_grids_feed_the_model_diffusers_timesteps(case):
    """The timesteps the model sees: int64 casts of s * N for DPM-Solver / UniPC on flow sigmas (UniPC's first
    at 1 - 1e-6, so 999), float32 s * N for the FlowMatch schedulers (Heun: each once, diffusers repeats them)."""
    data = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers", f"{case}.npz"))
    meta = json.loads(str(data["meta"]))
    kwargs = dict(meta["sample"])
    method = jd.samplers.get_method(kwargs.pop("method"))
    shifting = {k: kwargs[k] for k in ("mu", "use_dynamic_shifting", "time_shift_type") if k in kwargs}
    grid = jd.samplers.make_grid(method, schedule_of(meta), meta["steps"], **shifting)
    t = data["timesteps"]
    if method.name == "flow_heun":
        t = np.concatenate([t[:1], t[1::2]])
    if method.flow_spacing == "table":
        np.testing.assert_allclose(grid.t.astype(np.float32), t, rtol=1e-6)
    else:
        np.testing.assert_array_equal(grid.t, t)


def test_dynamic_shifting_needs_mu_on_an_unshifted_flow_schedule():
    noise = jnp.zeros((1, 2, 2, 1))
    flow3 = jd.schedules.get("flow_matching", shift=3.0)
    with pytest.raises(ValueError, match="needs mu"):
        jd.samplers.sample(model_fn, jd.schedules.get("flow_matching"), noise, method="flow_euler", steps=4,
                           prediction_type="flow", use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu replaces the shift"):
        jd.samplers.sample(model_fn, flow3, noise, method="flow_euler", steps=4, prediction_type="flow", mu=0.7)
    with pytest.raises(ValueError, match="unknown time_shift_type"):
        jd.samplers.sample(model_fn, flow3, noise, method="flow_euler", steps=4, prediction_type="flow",
                           time_shift_type="cubic")
    # exponential dynamic shifting by mu is the static shift exp(mu) on the unshifted table
    g = jd.samplers.make_grid(jd.samplers.get_method("flow_euler"), jd.schedules.get("flow_matching"), 8,
                              mu=np.log(3.0))
    np.testing.assert_allclose(g.sigma[:-1], jd.schedules.shift_sigmas(np.linspace(1, 1e-3, 8), 3.0), rtol=1e-7)
