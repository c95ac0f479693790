import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff import diffusion, losses

VP = jd.schedules.get("linear")
FLOW = jd.schedules.get("flow_matching", shift=2.0)


def test_q_sample_moments():
    x0 = jnp.full((20000, 1), 0.7)
    t = jnp.full((20000,), 300)
    xt = diffusion.q_sample(VP, x0, t, jax.random.normal(jax.random.key(0), x0.shape))
    assert float(xt.mean()) == pytest.approx(VP.alpha[300] * 0.7, abs=0.02)
    assert float(xt.std()) == pytest.approx(VP.sigma[300], rel=0.02)


def test_frame_correlated_noise_moments():
    """Unit variance per element; frames of one video correlate by `correlation`, videos not at all;
    correlation 0 is the plain normal draw."""
    key = jax.random.key(0)
    np.testing.assert_array_equal(diffusion.frame_correlated_noise(key, (3, 4, 5)), jax.random.normal(key, (3, 4, 5)))
    x = np.asarray(diffusion.frame_correlated_noise(key, (20000, 3, 2), 0.7))    # [B, T, C]
    assert x.var(axis=0) == pytest.approx(np.ones((3, 2)), abs=0.04)
    frames = np.corrcoef(x[:, :, 0].T)     # [T, T] over videos
    assert frames[np.triu_indices(3, 1)] == pytest.approx([0.7] * 3, abs=0.02)
    assert abs(np.corrcoef(x[:, 0, 0], x[:, 0, 1])[0, 1]) < 0.03     # channels (and videos) independent
    # another axis: [k, B, T, ...] step draws correlate along T = axis 2
    y = np.asarray(diffusion.frame_correlated_noise(key, (2, 10000, 2), 0.5, axis=2))
    assert np.corrcoef(y[0, :, 0], y[0, :, 1])[0, 1] == pytest.approx(0.5, abs=0.03)
    assert abs(np.corrcoef(y[0, :, 0], y[1, :, 0])[0, 1]) < 0.03
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"frame noise correlation must be in \[0, 1\), got"):
            diffusion.frame_correlated_noise(key, (2, 3), bad)


@pytest.mark.parametrize("schedule", [VP, FLOW], ids=["vp", "flow"])
def test_posterior_is_bayes_rule(schedule):
    """q(x_s | x_t, x_0) from the product q(x_t | x_s) q(x_s | x_0), written out independently."""
    s, t = np.array([120]), np.array([400])
    a_s, g_s, a_t, g_t = (float(getattr(schedule, n)[i]) for n, i in
                          (("alpha", 120), ("sigma", 120), ("alpha", 400), ("sigma", 400)))
    a_ts = a_t / a_s
    var_ts = g_t**2 - a_ts**2 * g_s**2
    x0, xt = jnp.array([[0.3, -1.2]]), jnp.array([[1.1, 0.4]])
    precision = 1 / g_s**2 + a_ts**2 / var_ts
    mean_ref = (a_s * np.asarray(x0) / g_s**2 + a_ts * np.asarray(xt) / var_ts) / precision
    mean, var = diffusion.q_posterior(schedule, x0, xt, jnp.asarray(t), jnp.asarray(s))
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5)
    np.testing.assert_allclose(var[0, 0], 1 / precision, rtol=1e-5)


def test_ddpm_posterior_matches_ho_et_al_eq7():
    s, t = 199, 200
    beta = VP.betas[t]
    ac_t, ac_s = VP.alphas_cumprod[t], VP.alphas_cumprod[s]
    p = diffusion.posterior(VP.alpha[s], VP.sigma[s], VP.alpha[t], VP.sigma[t])
    assert p.coef_x0 == pytest.approx(np.sqrt(ac_s) * beta / (1 - ac_t), rel=1e-9)
    assert p.coef_xt == pytest.approx(np.sqrt(1 - beta) * (1 - ac_s) / (1 - ac_t), rel=1e-9)
    assert p.variance == pytest.approx((1 - ac_s) / (1 - ac_t) * beta, rel=1e-9)
    assert p.step_variance == pytest.approx(beta, rel=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction", "flow", "score"])
@pytest.mark.parametrize("schedule", [VP, FLOW], ids=["vp", "flow"])
def test_prediction_round_trip(prediction_type, schedule):
    key0, key1 = jax.random.split(jax.random.key(1))
    x0 = jax.random.normal(key0, (4, 3))
    eps = jax.random.normal(key1, (4, 3))
    t = jnp.array([10, 250, 600, 900])
    a, s = schedule.table("alpha", t), schedule.table("sigma", t)
    x = a[:, None] * x0 + s[:, None] * eps
    out = diffusion.target(prediction_type, x0, eps, a, s)
    x0_hat, eps_hat = diffusion.to_x0_eps(prediction_type, out, x, a, s)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-4)


def test_named_conversions_closed_form():
    a, s = jnp.float32(0.6), jnp.float32(0.8)  # VP: a^2 + s^2 = 1
    x, v = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
    np.testing.assert_allclose(diffusion.convert(v, x, a, s, "v_prediction", "epsilon"), s * x + a * v, rtol=1e-6)
    np.testing.assert_allclose(diffusion.convert(v, x, a, s, "v_prediction", "sample"), a * x - s * v, rtol=1e-6)
    np.testing.assert_allclose(diffusion.convert(v, x, a, s, "epsilon", "score"), -v / s, rtol=1e-6)


@pytest.mark.parametrize("weighting", ["snr", "min_snr", "edm"])
def test_weightings_are_defined_on_x0_error(weighting):
    """The same x0 prediction must cost the same whichever parameterisation the network uses."""
    keys = jax.random.split(jax.random.key(2), 3)
    x0, eps, x0_hat = (jax.random.normal(k, (6, 5)) for k in keys)
    t = jnp.array([5, 80, 300, 500, 750, 990])
    a, s = VP.table("alpha", t), VP.table("sigma", t)
    x = a[:, None] * x0 + s[:, None] * eps
    eps_hat = (x - a[:, None] * x0_hat) / s[:, None]
    per = {}
    for pt in ("epsilon", "sample", "v_prediction"):
        out = diffusion.target(pt, x0_hat, eps_hat, a, s)
        per[pt] = losses.diffusion_loss(out, x0, eps, t, VP, prediction_type=pt, weighting=weighting)[1]
    np.testing.assert_allclose(per["epsilon"], per["sample"], rtol=2e-3)
    np.testing.assert_allclose(per["v_prediction"], per["sample"], rtol=2e-3)


def test_min_snr_weight_closed_form():
    t = jnp.arange(0, 1000, 50)
    a, s = VP.table("alpha", t), VP.table("sigma", t)
    snr = (a / s) ** 2
    np.testing.assert_allclose(losses.loss_weight("min_snr", "epsilon", a, s, min_snr_gamma=5.0),
                               np.minimum(snr, 5.0) / snr, rtol=1e-5)
    np.testing.assert_allclose(losses.loss_weight("min_snr", "v_prediction", a, s, min_snr_gamma=5.0),
                               np.minimum(snr, 5.0) / (snr + 1), rtol=1e-5)


def test_simple_loss_and_mask():
    x0 = jnp.zeros((2, 4, 4, 1))
    noise = jnp.ones_like(x0)
    t = jnp.array([3, 7])
    out = noise.at[:, :2].set(3.0)  # error 2 on the top half only
    loss, per = losses.diffusion_loss(out, x0, noise, t, VP)
    assert float(loss) == pytest.approx(2.0)  # mean of 4 over half the pixels
    mask = jnp.zeros((2, 4, 4, 1)).at[:, 2:].set(1.0)
    assert float(losses.diffusion_loss(out, x0, noise, t, VP, mask=mask)[0]) == 0.0
    assert float(losses.diffusion_loss(noise, x0, noise, t, VP, weighting="min_snr")[0]) == 0.0


def test_flow_matching_loss_target_is_velocity():
    x0, noise = jnp.ones((3, 2)), jnp.zeros((3, 2))
    t = jnp.array([0, 500, 999])
    assert float(losses.flow_matching_loss(noise - x0, x0, noise, t, FLOW)[0]) == 0.0
    with pytest.raises(ValueError, match="needs a flow_matching schedule"):
        losses.flow_matching_loss(noise, x0, noise, t, VP)


def test_timestep_distributions():
    u = losses.sample_timesteps(jax.random.key(0), 10000, VP)
    assert int(u.min()) >= 0 and int(u.max()) <= 999 and abs(float(u.mean()) - 499.5) < 10
    ln = losses.sample_timesteps(jax.random.key(0), 10000, VP, "logit_normal")
    assert abs(float(jnp.median(ln)) - 500) < 15 and float(jnp.mean((ln < 100) | (ln > 900))) < 0.06
    # a logit mean of 1.5 puts the median at sigmoid(1.5) of the way: t ~ 817
    noisy = losses.sample_timesteps(jax.random.key(0), 10000, VP, "logit_normal", logit_mean=1.5)
    assert abs(float(jnp.median(noisy)) - 1000 * float(jax.nn.sigmoid(1.5))) < 15
    with pytest.raises(ValueError, match="choose one of: uniform, logit_normal"):
        losses.sample_timesteps(jax.random.key(0), 4, VP, "beta")
    with pytest.raises(ValueError, match="unknown loss weighting 'minsnr'"):
        losses.loss_weight("minsnr", "epsilon", 1.0, 1.0)
