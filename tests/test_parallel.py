"""Sharding is exact: the tiny latent-diffusion recipe on 8 simulated devices (data=2, fsdp=2,
tensor=2) and as 2 jax.distributed processes x 4 devices matches 1 device; a checkpoint written
on 8 devices restores on 1; token sequences split over the context axis (data=2, context=4) give
1 device's numbers. Devices are simulated in subprocesses (XLA_FLAGS must precede jax)."""
import os
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from jaxdiff import parallel

WORKER = os.path.join(os.path.dirname(__file__), "training_worker.py")
CONTEXT_WORKER = os.path.join(os.path.dirname(__file__), "context_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _run(*args, worker=WORKER):
    return subprocess.Popen([sys.executable, worker, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=600):
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(npz):
    return {k: npz[k] for k in npz.files if k.startswith("params")}


def _max_rel_err(a, b):
    """The largest norm-wise relative error ||a - b|| / ||b|| over the parameter tensors (the
    project's parity measure; Adam's per-coordinate normalisation turns float32 reduction-order
    differences into ~1e-5 max-abs differences on near-zero coordinates)."""
    return max(float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-12)) for k in b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run per layout (started together), the 8-device checkpoint restored on 1 device."""
    d = tmp_path_factory.mktemp("sharding")
    port = _free_port()
    procs = [_run("--devices", "1", "--out", str(d / "one.npz"), "--workdir", str(d / "w1")),
             _run("--devices", "8", "--mesh", "2,2,2", "--out", str(d / "eight.npz"), "--workdir", str(d / "w8"))]
    procs += [_run("--devices", "4", "--mesh", "2,2,2", "--out", str(d / "two_procs.npz"), "--workdir",
                   str(d / "w2p"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                   "--process-id", str(i)) for i in range(2)]
    _wait(procs)
    _wait([_run("--devices", "1", "--restore", str(d / "w8"), "--out", str(d / "restored.npz"))])
    return {name: np.load(d / f"{name}.npz") for name in ("one", "eight", "two_procs", "restored")}


def test_eight_devices_match_one(runs):
    one, eight = runs["one"], runs["eight"]
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=TOL, atol=TOL)
    assert _max_rel_err(_params(eight), _params(one)) < TOL


def test_two_processes_match_one(runs):
    one, two = runs["one"], runs["two_procs"]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=TOL, atol=TOL)
    assert _max_rel_err(_params(two), _params(one)) < TOL


def test_checkpoint_from_eight_devices_restores_on_one(runs):
    assert int(runs["restored"]["step"]) == 10
    for k in _params(runs["eight"]):
        np.testing.assert_array_equal(runs["restored"][k], runs["eight"][k])


def test_mmdit_flow_matching_on_eight_devices_matches_one(tmp_path):
    """The diffusion recipe's MMDiT (configs/mmdit.py:tiny, flow matching) trains the same on 8 simulated devices as
    on one: on a (data, fsdp, tensor) = (2, 2, 2) mesh, and with its tokens split over context=4 x data=2.

    With Adam's usual eps the parameters cannot be compared tensor by tensor: the text stream's first gradients are
    float32 noise (~1e-8; every path from it to the loss passes zero-initialised gates and the zero-initialised
    output projection), and Adam turns noise into lr-sized steps whose signs follow the reduction order (measured:
    those tensors differ by 0.44 after 4 steps on (2, 2, 2), by 2e-6 on each pair of axes, by 1e-6 after 2 steps).
    Adam with eps = 1 takes momentum steps proportional to the gradient, which keep float noise at its own size."""
    layouts = {"one": ("1", "-1,1,1", "1"), "fsdp_tensor": ("8", "2,2,2", "1"), "context": ("8", "2,1,1", "4")}
    _wait([_run("--config", "mmdit", "--devices", n, f"--mesh={mesh}", "--context", context, "--adam-eps", "1.0",
                "--out", str(tmp_path / f"{name}.npz"), "--workdir", str(tmp_path / f"w_{name}"))
           for name, (n, mesh, context) in layouts.items()])
    one = np.load(tmp_path / "one.npz")
    for name in ("fsdp_tensor", "context"):
        eight = np.load(tmp_path / f"{name}.npz")
        np.testing.assert_allclose(eight["losses"], one["losses"], rtol=TOL, atol=TOL, err_msg=name)
        # norm-wise relative error per tensor, relative to at least 1e-3 (the text stream's zero-inits move by ~1e-9)
        assert max(np.linalg.norm(eight[k] - v) / max(np.linalg.norm(v), 1e-3)
                   for k, v in _params(one).items()) < TOL, name


def test_wan_on_context_mesh_matches_one_device(tmp_path):
    """A tiny Wan transformer's video tokens split over context=4 (x data=2, 8 simulated devices): its output and
    parameter gradients equal one device's. GSPMD partitions the attention as sequence parallelism (see
    jaxdiff/models/attention.py): the program's only all-gathers are each block's keys and values, [B/data, N,
    heads, head_dim] = [1, 256, 2, 16]; the tokens themselves stay split."""
    _wait([_run("--out", str(tmp_path / "wan.npz"), worker=CONTEXT_WORKER)])
    r = np.load(tmp_path / "wan.npz")
    assert np.linalg.norm(r["out_eight"] - r["out_one"]) / np.linalg.norm(r["out_one"]) < TOL
    grads = [k[len("one"):] for k in r.files if k.startswith("one[")]
    assert len(grads) > 20
    assert _max_rel_err({k: r["eight" + k] for k in grads}, {k: r["one" + k] for k in grads}) < TOL
    assert list(r["gathered"]) == ["f32[1,256,2,16]"] * 4   # 2 blocks x (keys, values)


def test_mesh_shape_infers_and_rejects():
    assert parallel.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 1, 2)
    assert parallel.mesh_shape({"data": -1}, 8) == (8, 1, 1, 1)
    assert parallel.mesh_shape({"data": 2, "context": -1}, 8) == (2, 1, 4, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="use 6 devices, but there are 8"):
        parallel.mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        parallel.mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        parallel.check_rules([("embed", "model")])


def test_default_rules_cover_every_logical_name_of_the_models():
    """Every parameter axis name of every model has a rule (a name without one would silently replicate)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxdiff import models

    unet = models.UNet2DCondition(models.UNetConfig(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, num_attention_heads=2,
        cross_attention_dim=8, norm_num_groups=4, num_class_embeds=2))
    vae = models.AutoencoderKL(models.AutoencoderKLConfig(block_out_channels=(8, 8), norm_num_groups=4))
    dit = models.DiT(models.DiTConfig(sample_size=4, hidden_size=8, depth=1, num_heads=2, num_classes=2,
                                      context_dim=8))
    clip = models.CLIPModel(models.CLIPConfig(
        text=models.CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, projection_dim=8,
                                   num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=4),
        vision=models.CLIPVisionConfig(hidden_size=8, intermediate_size=8, projection_dim=8, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=8, patch_size=4), projection_dim=8))
    video = models.TemporalUNet(models.TemporalUNetConfig(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, attention_head_dim=4,
        transformer_in_heads=2, cross_attention_dim=8, norm_num_groups=4))
    k, x, t, ctx, y = jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 2, 8)), jnp.zeros(1, int)
    trees = [jax.eval_shape(unet.init, k, x, t, ctx, y), jax.eval_shape(vae.init, k, jnp.zeros((1, 8, 8, 3))),
             jax.eval_shape(dit.init, k, x[:, :4, :4], t, ctx, y),
             jax.eval_shape(clip.init, k, jnp.zeros((1, 4), int), jnp.zeros((1, 8, 8, 3))),
             jax.eval_shape(video.init, k, jnp.zeros((1, 2, 8, 8, 4)), t, ctx)]
    names = {n for tree in trees for leaf in jax.tree.leaves(tree, is_leaf=lambda b: isinstance(b, nn.Partitioned))
             if isinstance(leaf, nn.Partitioned) for n in leaf.names if n}
    activations = {"batch", "height", "width", "channels", "length", "embed"}
    covered = {name for name, _ in parallel.DEFAULT_RULES}
    assert names | activations <= covered, sorted((names | activations) - covered)
    assert len(names) >= 10  # the models really are boxed


def test_uneven_dimension_stays_whole():
    """jit's shardings need even splits: 3 RGB input channels on fsdp=2 stay whole, 16 split."""
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "context": 1, "tensor": 2})
    assert tuple(parallel.spec_for((3, 16), ("embed", "mlp"), mesh, parallel.DEFAULT_RULES)) == (None, "tensor")
    assert tuple(parallel.spec_for((4, 16), ("embed", "mlp"), mesh, parallel.DEFAULT_RULES)) == ("fsdp", "tensor")
