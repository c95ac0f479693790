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
    if method == "invert":
        out = jd.samplers.invert(model_fn, schedule, jnp.asarray(data["noise"]), steps=meta["steps"], **kwargs)
    else:
        m = jd.samplers.get_method(method)
        k = m.noises({**m.options, **{o: kwargs[o] for o in m.options if o in kwargs}})
        step_noise = data["step_noise"][:, None] if k else None
        fn = jax.jit(lambda noise, sn: jd.samplers.sample(model_fn, schedule, noise, method=method,
                                                           steps=meta["steps"], step_noise=sn, **kwargs))
        out = fn(jnp.asarray(data["noise"]), step_noise)
    err = rel_err(out, data["output"])
    assert err <= 1e-5, f"{meta['scheduler']}: relative error {err:.2e}"
