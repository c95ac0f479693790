import os

import numpy as np
import pytest

import jaxdiff as jd

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "schedules.npz"))


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_beta_schedules_match_diffusers(name):
    kwargs = {"beta_start": 1e-4, "beta_end": 0.02} if name in ("linear", "scaled_linear", "sigmoid") else {}
    s = jd.schedules.get(name, 1000, **kwargs)
    np.testing.assert_allclose(s.alphas_cumprod, GOLDEN[name], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(s.alpha**2 + s.sigma**2, 1.0, rtol=1e-12)


def test_cosine_alias_and_closed_form():
    s = jd.schedules.get("cosine", 1000)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    # away from the 0.999 cap, alpha_bar_i = f(i + 1) / f(0) (Nichol & Dhariwal eq. 17)
    i = np.arange(900)
    np.testing.assert_allclose(s.alphas_cumprod[i], f(i + 1) / f(0), rtol=1e-10)
    np.testing.assert_array_equal(s.alpha, jd.schedules.get("squaredcos_cap_v2").alpha)


def test_zero_terminal_snr_matches_diffusers_and_lin_et_al():
    s = jd.schedules.get("scaled_linear", rescale_zero_terminal_snr=True)
    np.testing.assert_allclose(s.alphas_cumprod, GOLDEN["scaled_linear_sd_zero_snr"], rtol=1e-4, atol=1e-9)
    base = jd.schedules.get("scaled_linear")
    assert s.alpha[-1] == 0.0 and s.sigma[-1] == 1.0
    assert s.alpha[0] == pytest.approx(base.alpha[0], rel=1e-12)
    # sqrt(alpha_bar) is an affine map of the original (Algorithm 1)
    slope, intercept = np.polyfit(base.alpha, s.alpha, 1)
    np.testing.assert_allclose(slope * base.alpha + intercept, s.alpha, atol=1e-12)


def test_flow_matching_schedule_matches_diffusers():
    s = jd.schedules.get("flow_matching", shift=3.0)
    np.testing.assert_allclose(s.sigma, GOLDEN["flow_shift3"], rtol=1e-6)
    np.testing.assert_allclose(s.alpha + s.sigma, 1.0)
    np.testing.assert_allclose(s.timesteps, s.sigma * 1000)
    assert s.kind == "flow" and s.sigma[-1] == 1.0


def test_resolution_shift_endpoints():
    assert jd.schedules.resolution_shift(256) == pytest.approx(np.exp(0.5))
    assert jd.schedules.resolution_shift(4096) == pytest.approx(np.exp(1.15))


def test_karras_sigmas_closed_form():
    sig = jd.schedules.karras_sigmas(0.03, 14.6, 10, rho=7.0)
    assert sig[0] == pytest.approx(14.6) and sig[-1] == pytest.approx(0.03)
    np.testing.assert_allclose(np.diff(sig ** (1 / 7.0)), np.diff(sig ** (1 / 7.0))[0], rtol=1e-10)


def test_user_tables_round_trip():
    ve = np.geomspace(0.01, 50.0, 300)
    s = jd.schedules.from_sigmas(ve)
    np.testing.assert_allclose(s.ve_sigma, ve, rtol=1e-12)
    ac = jd.schedules.get("linear").alphas_cumprod
    np.testing.assert_allclose(jd.schedules.from_alphas_cumprod(ac).alphas_cumprod, ac, rtol=1e-12)
    np.testing.assert_allclose(jd.schedules.from_betas(jd.schedules.get("linear").betas).alphas_cumprod, ac,
                               rtol=1e-12)


def test_continuous_log_snr_views():
    s = jd.schedules.get("linear")
    lam = np.asarray(jd.schedules.interp_log_snr(s, np.array([0.0, 10.0, 999.0, 10.5])))
    np.testing.assert_allclose(lam[:3], s.log_snr[[0, 10, 999]], rtol=1e-5)
    assert s.log_snr[10] > lam[3] > s.log_snr[11]
    a, sg = jd.schedules.alpha_of_log_snr(lam), jd.schedules.sigma_of_log_snr(lam)
    np.testing.assert_allclose(np.asarray(a) ** 2 + np.asarray(sg) ** 2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(a)[:3], s.alpha[[0, 10, 999]], rtol=1e-4)
    t = jd.schedules.t_of_ve_sigma(s, s.ve_sigma[[3, 500]])
    np.testing.assert_allclose(t, [3, 500], atol=1e-9)


@pytest.mark.parametrize("call,match", [
    (lambda: jd.schedules.get("cosnie"), "unknown schedule 'cosnie'; choose one of: cosine, flow_matching"),
    (lambda: jd.schedules.get("linear", beta_max=0.1), "does not take beta_max"),
    (lambda: jd.schedules.get("flow_matching", shift=-1.0), "shift must be > 0"),
    (lambda: jd.schedules.get("linear", 1), "num_train_timesteps must be an int >= 2"),
    (lambda: jd.schedules.from_alphas_cumprod([0.5, 0.9]), "strictly decreasing"),
    (lambda: jd.schedules.from_sigmas([1.0, 0.5]), "strictly increasing"),
    (lambda: jd.schedules.get("flow_matching", rescale_zero_terminal_snr=True), "applies to beta schedules"),
])
def test_schedule_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
