"""The training system on one device: exact resume, EMA and LR closed forms, gradient
accumulation, config parsing and errors, TensorBoard framing, atomic checkpoints."""
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy2d as toy2d_config
from jaxdiff.training import (Checkpoints, accumulate_grads, base_config, ema_update,
                              lr_schedule, train, validate)
from jaxdiff.training import tensorboard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_config(steps=8, every=3):
    c = toy2d_config.get_config()
    c.steps, c.batch_size, c.checkpoint_every, c.log_every, c.sample_every = steps, 64, every, 2, 0
    c.model.hidden, c.optim.warmup_steps = 32, 2
    return c


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_resume_is_bit_exact(tmp_path):
    """Killed after step 5 (last checkpoint at 3), resumed: step 8 equals the uninterrupted run bit for bit."""
    full = train(toy_config(), str(tmp_path / "full"))
    killed = train(toy_config(), str(tmp_path / "cut"), stop_after=5)
    assert Checkpoints(str(tmp_path / "cut" / "checkpoints")).all_steps() == [3]
    resumed = train(toy_config(), str(tmp_path / "cut"), resume=True)
    assert int(resumed.state.step) == 8
    assert resumed.losses == full.losses[3:]
    assert killed.losses == full.losses[:5]
    for a, b in zip(leaves(resumed.state), leaves(full.state)):
        np.testing.assert_array_equal(a, b)
    lines = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [2, 4, 6, 8]
    assert {"loss", "lr", "grad_norm", "steps_per_sec", "examples_per_sec"} <= set(lines[0])
    assert os.listdir(tmp_path / "full" / "tensorboard")


def test_refuses_to_overwrite_a_run(tmp_path):
    train(toy_config(steps=3), str(tmp_path))
    with pytest.raises(FileExistsError, match="latest step 3.*--resume"):
        train(toy_config(steps=3), str(tmp_path))


def test_ema_closed_form():
    p, e0, d = jnp.array([2.0, -1.0]), jnp.array([0.0, 5.0]), 0.9
    e = e0
    for _ in range(7):
        e = ema_update(e, p, d)
    np.testing.assert_allclose(e, p + d ** 7 * (e0 - p), rtol=1e-6)


def test_warmup_cosine_closed_form():
    c = base_config()
    c.optim.lr, c.optim.warmup_steps, c.optim.min_lr_ratio = 1e-3, 10, 0.1
    lr = lr_schedule(c.optim, 110)
    peak, end = 1e-3, 1e-4
    for s in (0, 5, 10, 35, 60, 110):
        want = peak * s / 10 if s < 10 else end + (peak - end) * (1 + math.cos(math.pi * (s - 10) / 100)) / 2
        assert float(lr(s)) == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_accumulation_equals_big_batch():
    """Mean of 4 micro-batch gradients == the gradient of the whole batch (a mean-over-examples loss)."""
    w = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)}
    batch = {"x": jax.random.normal(jax.random.key(0), (16, 3)), "y": jax.random.normal(jax.random.key(1), (16, 2))}

    def loss_fn(params, frozen, batch, key, step):
        err = jnp.tanh(batch["x"] @ params["w"]) - batch["y"]
        return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}

    big = accumulate_grads(loss_fn, w, None, batch, jax.random.key(2), 0, 1)
    acc = accumulate_grads(loss_fn, w, None, batch, jax.random.key(2), 0, 4)
    for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(big)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_command_line_overrides_reach_the_config(tmp_path):
    """`--config.x.y=v` overrides any field; validation errors name the field; unknown fields are refused."""
    r = _cli("--config", "configs/latent_diffusion.py:tiny", "--workdir", str(tmp_path), "--config.optim.lr=0.25",
             "--config.mesh.fsdp=2", "--config.dtype=float16")
    assert r.returncode == 1 and "error: config.dtype='float16': choose one of: float32, bfloat16" in r.stderr
    r = _cli("--config", "configs/clip.py:tiny", "--workdir", str(tmp_path), "--config.optim.learning_rate=1")
    assert r.returncode != 0 and "learning_rate" in r.stderr


@pytest.mark.parametrize("field,value,message", [
    ("recipe", "gan", "config.recipe='gan': unknown recipe; choose one of: clip, vae, diffusion, toy2d, layout"),
    ("dtype", "float16", "config.dtype='float16': choose one of: float32, bfloat16"),
    ("steps", 0, "config.steps=0: need a positive int"),
    ("accumulate", 3, "config.batch_size=64 is not a multiple of config.accumulate=3"),
    ("ema_decay", 1.0, "config.ema_decay=1.0: need 0 <= decay < 1"),
])
def test_bad_config_values_are_named(field, value, message):
    c = toy_config()
    c[field] = value
    with pytest.raises(ValueError) as e:
        validate(c)
    assert str(e.value) == message


def test_bad_model_choices_are_named(tmp_path):
    from configs import latent_diffusion

    c = latent_diffusion.get_config("tiny")
    c.model.prediction_type = "flow"
    with pytest.raises(ValueError, match="prediction_type='flow' does not fit config.model.schedule='scaled_linear'"):
        train(c, str(tmp_path / "a"))
    c = latent_diffusion.get_config("tiny")
    c.model.backbone = "resnet"
    with pytest.raises(ValueError, match="config.model.backbone='resnet': choose one of: unet, dit"):
        train(c, str(tmp_path / "b"))
    c.mesh.data = 3
    with pytest.raises(ValueError, match="mesh sizes .* use 3 devices, but there are 1"):
        train(c, str(tmp_path / "c"))


def test_tensorboard_records_are_framed_with_crc32c(tmp_path):
    assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    w = tensorboard.EventWriter(str(tmp_path))
    w.scalars(7, {"loss": 0.5})
    w.close()
    data = open(w.path, "rb").read()
    records = []
    while data:
        (n,) = struct.unpack("<Q", data[:8])
        assert struct.unpack("<I", data[8:12])[0] == tensorboard.masked_crc(data[:8])
        payload = data[12:12 + n]
        assert struct.unpack("<I", data[12 + n:16 + n])[0] == tensorboard.masked_crc(payload)
        records.append(payload)
        data = data[16 + n:]
    assert b"brain.Event:2" in records[0]
    assert b"loss" in records[1] and struct.pack("<f", 0.5) in records[1]


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    """A save killed mid-way leaves only orbax's temporary folder, which is never taken as a checkpoint."""
    train(toy_config(steps=3), str(tmp_path))
    partial = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "state").mkdir()
    assert Checkpoints(str(tmp_path / "checkpoints")).latest_step() == 3
    resumed = train(toy_config(steps=4), str(tmp_path), resume=True)
    assert int(resumed.state.step) == 4


def test_bfloat16_compute_keeps_float32_master_weights(tmp_path):
    """dtype=bfloat16: the same tiny pixel-diffusion U-Net run computes its losses in bf16 (close to
    the float32 run's, not equal) while params, EMA and optimizer state stay float32. The float32 run
    also writes the sample grid of its previews at its last step."""
    from configs import pixel_diffusion

    runs = {}
    for dtype in ("float32", "bfloat16"):
        c = pixel_diffusion.get_config("tiny")
        c.steps, c.checkpoint_every, c.sample_every, c.dtype = 3, 0, 3 if dtype == "float32" else 0, dtype
        runs[dtype] = train(c, str(tmp_path / dtype))
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "float32" / "samples" / "step_0000003.png"))
    assert grid.ndim == 3 and grid.shape[-1] == 3 and grid.std() > 0
    f32, bf16 = runs["float32"], runs["bfloat16"]
    np.testing.assert_allclose(bf16.losses, f32.losses, rtol=5e-2)
    assert bf16.losses != f32.losses  # the compute really was bf16
    state = jax.device_get(bf16.state)
    for tree in (state.params, state.ema, state.opt_state):
        assert {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)} == {np.dtype(np.float32)}
    moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(f32.state.params))]
    assert 0 < max(moved) < 1e-2  # bf16 and f32 updates agree to bf16 precision



def test_config_timestep_distribution_reaches_the_loss():
    """config.model.timestep_logit_mean shifts the training timesteps the diffusion recipe draws."""
    import dataclasses

    from jaxdiff import schedules
    from jaxdiff.training.recipes.diffusion.objective import Objective

    seen = []

    def apply_fn(x, t, ctx):
        seen.append(t)
        return jnp.zeros_like(x)

    m = Objective.of(dict(timestep_distribution="logit_normal", timestep_logit_mean=4.0, timestep_logit_std=0.5,
                          prediction_type="epsilon", weighting="simple"))
    m.loss(apply_fn, jnp.zeros((512, 2)), jax.random.key(0), schedules.get("scaled_linear"))
    assert float(seen[0].min()) > 900        # sigmoid(4 - 3 * 0.5) = 0.92
    m = dataclasses.replace(m, timestep_logit_mean=0.0)
    m.loss(apply_fn, jnp.zeros((512, 2)), jax.random.key(0), schedules.get("scaled_linear"))
    assert float(seen[1].min()) < 300


def test_config_frame_noise_correlation_reaches_the_loss():
    """Videos x0 [B, T, ...] are noised with config.model.frame_noise_correlation of the noise shared by
    their frames (x_t = sigma_t noise for x0 = 0: the frames' correlation is the noise's)."""
    from jaxdiff import schedules
    from jaxdiff.training.recipes.diffusion.objective import Objective

    seen = []

    def apply_fn(x, t, ctx):
        seen.append(np.asarray(x))
        return jnp.zeros_like(x)

    for correlation in (0.9, 0.0):
        m = Objective(prediction_type="v_prediction", weighting="simple", frame_noise_correlation=correlation)
        m.loss(apply_fn, jnp.zeros((4000, 3, 2)), jax.random.key(0), schedules.get("scaled_linear"))
    (with_, without) = ([np.corrcoef(x[:, 0, 0], x[:, 2, 0])[0, 1] for x in seen])
    assert with_ == pytest.approx(0.9, abs=0.03) and abs(without) < 0.05
