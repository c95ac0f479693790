import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

SD = jd.schedules.get("scaled_linear")


def apply_fn(x, t, context):
    """A conditional 'network': output depends on x, t and the context vector."""
    return 0.5 * x + context[:, None, :] * (1.0 + t[:, None, None] / 1000.0)


def test_cfg_closed_form_and_rescale():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    t = jnp.array([10.0, 700.0])
    cond, uncond = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]]), jnp.zeros((2, 3))
    c, u = apply_fn(x, t, cond), apply_fn(x, t, uncond)
    np.testing.assert_allclose(jd.guidance.cfg(apply_fn, cond, uncond, 1.0)(x, t), c, rtol=1e-6)
    np.testing.assert_allclose(jd.guidance.cfg(apply_fn, cond, uncond, 0.0)(x, t), u, rtol=1e-6)
    np.testing.assert_allclose(jd.guidance.cfg(apply_fn, cond, uncond, 7.5)(x, t), u + 7.5 * (c - u), rtol=1e-5)
    full = jd.guidance.cfg(apply_fn, cond, uncond, 7.5, rescale=1.0)(x, t)
    np.testing.assert_allclose(jnp.std(full, axis=(1, 2)), jnp.std(c, axis=(1, 2)), rtol=1e-5)
    half = jd.guidance.cfg(apply_fn, cond, uncond, 7.5, rescale=0.5)(x, t)
    np.testing.assert_allclose(half, 0.5 * full + 0.5 * (u + 7.5 * (c - u)), rtol=1e-5)


def test_changing_prompt_seed_or_scale_does_not_recompile():
    @jax.jit
    def generate(noise, key, context, scale):
        fn = jd.guidance.cfg(apply_fn, context, jnp.zeros_like(context), scale, rescale=0.7)
        return jd.samplers.sample(fn, SD, noise, key=key, method="euler_ancestral", steps=8)

    noise = jax.random.normal(jax.random.key(0), (2, 5, 3))
    ctx = jnp.ones((2, 3))
    a = generate(noise, jax.random.key(1), ctx, 7.5)
    b = generate(noise, jax.random.key(2), ctx, 7.5)
    c = generate(noise, jax.random.key(1), 2.0 * ctx, 3.0)
    assert generate._cache_size() == 1
    assert not np.allclose(a, b) and not np.allclose(a, c)
    np.testing.assert_array_equal(a, generate(noise, jax.random.key(1), ctx, 7.5))  # same seed, same image


def test_img2img_strength_and_mask_blend():
    model_fn = lambda x, t: 0.3 * x
    x_init = jax.random.normal(jax.random.key(5), (2, 4, 4, 1))
    noise = jax.random.normal(jax.random.key(6), x_init.shape)
    same = jd.samplers.sample(model_fn, SD, noise, method="dpmpp_2m", steps=10, x_init=x_init, strength=0.0)
    np.testing.assert_array_equal(same, x_init)
    # strength 0.3 of 10 steps runs the last 3 steps of the full run's grid
    x, traj = jd.samplers.sample(model_fn, SD, noise, method="ddim", steps=10, x_init=x_init, strength=0.3,
                                 return_trajectory=True)
    assert traj["x"].shape == (3,) + x_init.shape
    mask = jnp.zeros((1, 4, 4, 1)).at[:, :, :2].set(1.0)  # generate the left half, keep the right
    out = jd.samplers.sample(model_fn, SD, noise, method="unipc", steps=10,
                             hook=jd.samplers.mask_blend(x_init, mask, noise))
    np.testing.assert_array_equal(out[:, :, 2:], x_init[:, :, 2:])
    assert not np.allclose(out[:, :, :2], x_init[:, :, :2])


def test_inversion_then_sampling_reconstructs():
    """DDIM inversion then DDIM sampling on the same grid returns the input, up to the inversion's
    first-order approximation (the model is read at the target timestep): error ~ 1 / steps."""
    model_fn = lambda x, t: 0.2 * jnp.tanh(x) + 0.1 * x
    x0 = jax.random.normal(jax.random.key(7), (3, 8))
    errs = []
    for steps in (50, 200):
        xt = jd.samplers.ddim_invert(model_fn, SD, x0, steps=steps)
        back = jd.samplers.sample(model_fn, SD, xt, method="ddim", steps=steps)
        errs.append(float(jnp.abs(back - x0).mean()))
    assert errs[1] < 0.01 and errs[0] / errs[1] > 3.0, errs


FN = lambda x, t: x
NOISE = jnp.zeros((2, 4))
ZSNR = jd.schedules.get("scaled_linear", rescale_zero_terminal_snr=True)
FLOW = jd.schedules.get("flow_matching")


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="dpm++2m"), "unknown sampler 'dpm\\+\\+2m'; choose one of: ddpm, ddim, euler"),
    (dict(steps=0), "steps must be an integer in 1..1000"),
    (dict(steps=1001), "steps must be an integer in 1..1000"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(prediction_type="eps"), "unknown prediction_type 'eps'; choose one of: epsilon"),
    (dict(timestep_spacing="uniform"), "unknown timestep_spacing 'uniform'; choose one of: leading"),
    (dict(method="euler", eta=0.5), "'euler' does not take option\\(s\\) eta; it takes: none"),
    (dict(method="ddpm"), "pass key=jax.random.key"),
    (dict(x_init=jnp.zeros((2, 5))), "x_init has shape \\(2, 5\\) but noise has shape \\(2, 4\\)"),
    (dict(strength=1.5, x_init=NOISE), "strength must be in \\[0, 1\\]"),
    (dict(method="flow_euler"), "needs a flow_matching schedule"),
    (dict(method="lcm", steps=60), "lcm takes 1..50 steps"),
    (dict(method="ddim", use_karras_sigmas=True), "use_karras_sigmas applies to"),
    (dict(steps=1000, steps_offset=1), "fall outside the schedule's 0..999"),
    (dict(strength=float("nan"), x_init=NOISE), "strength must be in \\[0, 1\\], got nan"),
    (dict(eta=float("nan")), "eta must be a finite number, got nan"),
    (dict(eta=float("inf")), "eta must be a finite number, got inf"),
    (dict(method="langevin_pc", snr=float("nan"), key=jax.random.key(0)), "snr must be a finite number"),
])
def test_sample_rejects_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        jd.samplers.sample(FN, SD, kwargs.pop("noise", NOISE), **kwargs)


def test_prediction_type_the_schedule_cannot_use():
    with pytest.raises(ValueError, match="'epsilon' cannot recover x_0 where alpha = 0"):
        jd.samplers.sample(FN, ZSNR, NOISE, method="euler", steps=10, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="'heun' integrates in sigma/alpha"):
        jd.samplers.sample(FN, ZSNR, NOISE, method="heun", steps=10, timestep_spacing="trailing",
                           prediction_type="v_prediction")
    with pytest.raises(ValueError, match="lcm needs a discrete schedule"):
        jd.samplers.sample(FN, FLOW, NOISE, method="lcm", steps=4, prediction_type="flow")
    with pytest.raises(ValueError, match="noise must be a floating array"):
        jd.samplers.sample(FN, SD, [1.0, 2.0])
    with pytest.raises(TypeError, match="schedule tables must be concrete"):
        jax.jit(lambda s: jd.samplers.sample(FN, s, NOISE, steps=4))(SD)


X = jnp.zeros((2, 4, 4, 3))


@pytest.mark.parametrize("model_fn,got", [
    (lambda x, t: x[:1], r"shape \(1, 4, 4, 3\) dtype float32"),                   # batch 1: would broadcast
    (lambda x, t: x[..., :1], r"shape \(2, 4, 4, 1\) dtype float32"),              # fewer channels: would broadcast
    (lambda x, t: x.astype(jnp.int32), r"shape \(2, 4, 4, 3\) dtype int32"),      # not floating
])
def test_model_output_must_match_x_t(model_fn, got):
    """At trace time, naming both shapes: in the sampler, the inversion and the guidance wrapper."""
    want = got + r" for x_t of shape \(2, 4, 4, 3\) dtype float32"
    with pytest.raises(ValueError, match="model_fn returned " + want):
        jd.samplers.sample(model_fn, SD, X, steps=2)
    with pytest.raises(ValueError, match="model_fn returned " + want):
        jd.samplers.ddim_invert(model_fn, SD, X, steps=2)
    guided = jd.guidance.cfg(lambda x, t, c: model_fn(x[:2], t)[:1], jnp.ones((2, 3)), jnp.zeros((2, 3)), 7.5)
    with pytest.raises(ValueError, match=r"apply_fn \(on the unconditional and conditional halves\) returned"):
        guided(X, jnp.zeros(2))


@pytest.mark.parametrize("scale,rescale,match", [
    (float("nan"), 0.0, "guidance scale must be a finite number, got nan"),
    (float("-inf"), 0.0, "guidance scale must be a finite number, got -inf"),
    (7.5, float("nan"), r"guidance rescale must be in \[0, 1\], got nan"),
    (7.5, 1.5, r"guidance rescale must be in \[0, 1\], got 1.5"),
])
def test_cfg_refuses_non_finite_scales(scale, rescale, match):
    with pytest.raises(ValueError, match=match):
        jd.guidance.cfg(apply_fn, jnp.ones((2, 3)), jnp.zeros((2, 3)), scale, rescale)
