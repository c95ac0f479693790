"""jaxdiff.trace_cache: what a fresh process would trace again -- a module's param shapes, a whole program as a
jax.export -- kept beside the persistent compilation cache and found again only under the same identity, argument
signature and source stamp. (conftest turns the cache off after every test.)"""
import dataclasses
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxdiff as jd
from jaxdiff import trace_cache
from jaxdiff.compilation_cache import enable
from jaxdiff.convert.scheduler import schedule_from_config
from jaxdiff.models import AutoencoderKLConfig
from jaxdiff.trace_cache import StoredProgram

FIXTURES = Path(__file__).parent / "fixtures"


def entries(tmp_path, kind="programs"):
    folder = tmp_path / f"xla-{kind}"
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_param_shapes_are_kept_beside_the_compilation_cache(tmp_path, monkeypatch):
    """With the persistent compilation cache on, a module's param shapes (boxed: shape, dtype, logical axis names)
    are written once and read back without tracing its init, the same tree; a damaged entry is traced again; another
    config is another entry; with the cache off nothing is written."""
    from jaxdiff.models import layers

    module, params = jd.convert.from_diffusers(str(FIXTURES / "diffusers" / "vae"))
    assert trace_cache.shapes_file(module) is None
    enable(str(tmp_path / "xla"))
    traced = layers.param_shapes(module, boxed=True)
    path = trace_cache.shapes_file(module)
    assert path.startswith(str(tmp_path / "xla-param-shapes")) and os.path.isfile(path)
    is_box = lambda x: isinstance(x, nn.Partitioned)
    describe = lambda tree: [(type(x).__name__, x.names, x.value.shape, x.value.dtype) if is_box(x)
                             else (x.shape, x.dtype) for x in jax.tree.leaves(tree, is_leaf=is_box)]
    with monkeypatch.context() as m:
        m.setattr(jax, "eval_shape", lambda *a: pytest.fail("traced although cached"))
        assert describe(layers.param_shapes(module, boxed=True)) == describe(traced)
        again, reloaded = jd.convert.from_diffusers(str(FIXTURES / "diffusers" / "vae"))
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(reloaded), jax.device_get(params))
    with open(path, "w") as f:
        f.write("{broken")
    assert describe(layers.param_shapes(module, boxed=True)) == describe(traced)
    with open(path) as f:
        assert json.load(f).keys() == traverse_util.flatten_dict(nn.meta.unbox(traced), sep="/").keys()
    other = module.clone(config=AutoencoderKLConfig(**{**vars(module.config), "latent_channels": 8}))
    assert trace_cache.shapes_file(other) != path


def counted(traces: list, offset: float):
    """A new function object each call (jax.jit caches traces by function): sin(x) * scale + offset, counting its
    traces."""
    def f(x, scale):
        traces.append(x.shape)
        return jnp.sin(x) * scale + offset
    return f


def test_a_stored_program_is_traced_once_then_read_from_disk(tmp_path):
    """The first call exports the jitted function (one trace) and writes it; a new StoredProgram of a new function
    object under the same identity (what a fresh process holds) computes the same values without tracing; another
    argument shape or identity is another entry, traced; a damaged entry is traced and written again; with no
    identity, or the cache off, nothing is written."""
    traces = []
    x = jnp.arange(6.0).reshape(2, 3)
    want = lambda scale: np.sin(np.arange(6.0)).reshape(2, 3) * scale + 0.5
    StoredProgram(jax.jit(counted(traces, 0.5)), "f")(x, 2.0)
    assert traces == [(2, 3)] and entries(tmp_path) == []          # the cache is off: plain jit

    enable(str(tmp_path / "xla"))
    np.testing.assert_allclose(StoredProgram(jax.jit(counted(traces, 0.5)), "f")(x, 2.0), want(2.0), rtol=1e-6)
    assert len(traces) == 2 and len(entries(tmp_path)) == 1
    fresh = StoredProgram(jax.jit(counted(traces, 0.5)), "f")
    np.testing.assert_allclose(fresh(x, 3.0), want(3.0), rtol=1e-6)
    np.testing.assert_allclose(fresh(x, 1.0), want(1.0), rtol=1e-6)
    assert len(traces) == 2                                          # found on disk, never traced

    np.testing.assert_allclose(fresh(jnp.ones(4), 1.0), np.sin(1.0) + 0.5, rtol=1e-6)   # another signature
    assert traces[-1] == (4,) and len(entries(tmp_path)) == 2
    other = StoredProgram(jax.jit(counted(traces, -1.0)), "f, offset -1")(x, 2.0)        # another identity
    np.testing.assert_allclose(other, want(2.0) - 1.5, rtol=1e-6)
    assert len(traces) == 4 and len(entries(tmp_path)) == 3

    for name in entries(tmp_path):
        (tmp_path / "xla-programs" / name).write_bytes(b"damaged")
    np.testing.assert_allclose(StoredProgram(jax.jit(counted(traces, 0.5)), "f")(x, 2.0), want(2.0), rtol=1e-6)
    assert len(traces) == 5 and len(entries(tmp_path)) == 3
    np.testing.assert_allclose(StoredProgram(jax.jit(counted(traces, 0.5)), "f")(x, 2.0), want(2.0), rtol=1e-6)
    assert len(traces) == 5                                          # rewritten whole
    StoredProgram(jax.jit(counted(traces, 0.5)), None)(x, 2.0)
    assert len(traces) == 6 and len(entries(tmp_path)) == 3


def test_fingerprints_name_values_by_content():
    @dataclasses.dataclass
    class Holder:
        values: np.ndarray
        name: str

    a = np.linspace(0, 1, 1000)
    b = a.copy()
    b[500] += 1e-9                      # np's repr would print both the same
    fp = trace_cache.fingerprint
    assert fp(Holder(a, "x")) == fp(Holder(a.copy(), "x")) != fp(Holder(b, "x"))
    assert fp(Holder(a, "x")) != fp(Holder(a, "y")) and fp(a) != fp(a.astype(np.float32))
    assert fp({"b": 1, "a": (2, 3.0)}) == fp({"a": (2, 3.0), "b": 1}) != fp({"a": [2, 3.0], "b": 1})
    unet = jd.models.UNet2DCondition(jd.models.UNetConfig(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8))
    assert fp(unet) == repr(unet) and fp(unet) != fp(unet.clone(dtype=jnp.bfloat16))
    with pytest.raises(trace_cache.Unstable, match="no stable name for a object"):
        fp({"tokenizer": object()})


def test_a_pipeline_reads_its_program_from_disk_while_nothing_it_reads_changed(tmp_path, monkeypatch):
    """A fresh TextToImage of the same folder finds the generation program the first one stored: the same images,
    sampling never traced; a changed schedule (a field the program reads) is traced and stored anew and gives
    other images; a program with a host callback (progress) is never stored."""
    from jaxdiff.pipelines import text_to_image

    enable(str(tmp_path / "xla"))
    folder = str(FIXTURES / "pipeline_sd")
    traces = []
    sample = text_to_image.samplers.sample
    monkeypatch.setattr(text_to_image.samplers, "sample", lambda *a, **k: traces.append(1) or sample(*a, **k))
    prompts = ["a red circle", "a blue square"]
    first = jd.pipelines.TextToImage.from_pretrained(folder)(prompts, steps=3, seed=1)
    assert len(traces) == 1 and len(entries(tmp_path)) == 1
    fresh = jd.pipelines.TextToImage.from_pretrained(folder)
    np.testing.assert_array_equal(fresh(prompts, steps=3, seed=1), first)
    assert len(traces) == 1

    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    fresh.schedule = schedule_from_config({**config, "beta_end": config["beta_end"] * 1.5})[0]
    changed = fresh(prompts, steps=3, seed=1)
    assert len(traces) == 2 and len(entries(tmp_path)) == 2 and np.abs(changed - first).max() > 1e-3
    fresh(prompts, steps=3, seed=1, progress=True)
    assert len(traces) == 3 and len(entries(tmp_path)) == 2
