"""LoRA training (configs/lora.py, jaxdiff.training.lora): only adapters train, the base stays bit-identical
and sharded, resume is exact, the export loads back onto the base as the trained model, and diffusers reads the worked
example's LoRA of the shipped model with the outputs jaxdiff gives (golden file)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHAPES
from flax import traverse_util
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file

from configs import lora as lora_config
from jaxdiff import convert
from jaxdiff.convert.lora import apply_lora, read_lora
from jaxdiff.pipelines import SHAPES_UNET_MODEL, TextToImage
from jaxdiff.training import export, load_params, train
from jaxdiff.training.lora import (
    TEXT_ATTENTION,
    LoRAConfig,
    init_adapters,
    lora_weights,
    targeted_kernels,
)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "lora_training")


def tiny(steps=6):
    c = lora_config.get_config("tiny")
    c.steps, c.checkpoint_every, c.log_every, c.sample_every = steps, 3, 0, 0
    return c


def get(tree, *path):
    for name in path:
        tree = tree[name]
    return tree


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def adapter_shapes_only(state):
    """The optimizer state's arrays are Adam's two moments of each adapter, nothing of the base."""
    shapes = sorted(x.shape for x in leaves(state.params))
    moments = sorted(x.shape for x in leaves(state.opt_state) if x.ndim)
    assert moments == sorted(shapes * 2)
    return sum(math.prod(s) for s in shapes)


def test_lora_trains_adapters_only_and_resumes_exactly(tmp_path):
    """Only {down, up} pairs train (step 0 is the base model: B = 0); killed after step 4 (checkpoint at 3)
    and resumed, step 6 equals the uninterrupted run bit for bit."""
    full = train(tiny(), str(tmp_path / "full"))
    flat = traverse_util.flatten_dict(jax.device_get(full.state.params))
    assert {p[-1] for p in flat} == {"down", "up"} and {p[0] for p in flat} == {"unet"}
    assert len(flat) == 2 * 32  # to_q, to_k, to_v, to_out.0 of 8 attentions (4 transformer blocks)
    assert adapter_shapes_only(full.state) == 4992
    assert all(np.abs(v).max() > 0 for p, v in flat.items() if p[-1] == "up")  # B left zero
    # the frozen base shards by its logical axes (to_q: input side over fsdp, output over tensor), adapters replicate
    attn = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
    assert get(full.frozen["base"], *attn, "kernel").sharding.spec == PartitionSpec("fsdp", "tensor")
    assert get(full.state.params["unet"], *attn, "down").sharding.spec == PartitionSpec()
    train(tiny(), str(tmp_path / "cut"), stop_after=4)
    resumed = train(tiny(), str(tmp_path / "cut"), resume=True)
    assert resumed.losses == full.losses[3:]
    for a, b in zip(leaves(resumed.state), leaves(full.state)):
        np.testing.assert_array_equal(a, b)


def test_fresh_adapters_leave_the_model_as_it_is():
    """A drawn as peft draws lora_A (U(-1/sqrt(in), 1/sqrt(in))), B zeros: the adapted params equal the base."""
    base = {"attn": {"to_q": {"kernel": jnp.ones((64, 8)), "bias": jnp.zeros(8)},
                     "conv": {"kernel": jnp.ones((3, 3, 16, 8))}}}
    adapters = init_adapters(jax.random.key(0), {("attn", "to_q", "kernel"): (64, 8),
                                                 ("attn", "conv", "kernel"): (3, 3, 16, 8)}, rank=4)
    down = np.asarray(adapters["attn"]["to_q"]["down"])
    assert down.shape == (64, 4) and np.abs(down).max() <= 1 / 8 and abs(down.std() - 1 / 8 / math.sqrt(3)) < 0.02
    conv = np.asarray(adapters["attn"]["conv"]["down"])
    assert conv.shape == (3, 3, 16, 4) and np.abs(conv).max() <= 1 / 12   # fan_in 3 * 3 * 16
    jax.tree.map(np.testing.assert_array_equal, apply_lora(base, lora_weights(adapters, 2.0)), base)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"config.lora.rank=0: need a positive int"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match=r"config.lora.alpha=-1: need a positive number"):
        LoRAConfig(alpha=-1)
    with pytest.raises(ValueError, match=r"config.lora.ranks: unknown field; fields: rank, alpha, unet, text_encoder"):
        LoRAConfig.of({"ranks": 4})
    with pytest.raises(ValueError, match=r"config.lora targets no module"):
        LoRAConfig(unet=())
    params = {"mid_block": {"attentions_0": {"transformer_blocks_0": {"attn1": {
        n: {"kernel": jnp.zeros((4, 4))} for n in ("to_q", "to_k", "to_v", "to_out_0")}}}}}
    assert len(targeted_kernels(params, "unet", ("to_out.0", "attn1.to_q"))) == 2
    with pytest.raises(ValueError, match=r"config.lora.unet: 'to_qq' names no module of the unet; its modules end "
                                         r"in: to_k, to_out.0, to_q, to_v"):
        targeted_kernels(params, "unet", ("to_qq",))
    c = tiny()
    c.recipe = "vae"
    with pytest.raises(ValueError, match=r"config.lora: LoRA training is for the diffusion recipe, not "
                                         r"config.recipe='vae'"):
        train(c, "unused")


def test_exported_lora_loads_back_as_the_trained_model(runs, tmp_path):
    """A LoRA of a trained U-Net and its text encoder: the base and the text encoder are bit-identical after
    training; the exported file, read back onto the base, gives the run's adapted params bit for bit; --merge
    writes a pipeline folder holding them."""
    c = lora_config.get_config("tiny")
    c.data.update(source="shapes", name=SHAPES, data_dir=runs["data_dir"], image_size=16, max_length=16)
    c.model.update(init_from=runs["ld"])
    c.model.vae.update(checkpoint=runs["vae"], scaling_factor=0.5)
    c.model.text_encoder.checkpoint = runs["clip"]
    c.lora.text_encoder = TEXT_ATTENTION
    c.steps, c.checkpoint_every, c.sample_every = 3, 0, 0
    run = str(tmp_path / "run")
    result = train(c, run)
    base, text = load_params(runs["ld"], "ema"), load_params(runs["clip"], "ema")["text_model"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.frozen["base"]), base)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.frozen["recipe"]["text"]), text)
    adapter_shapes_only(result.state)

    out = str(tmp_path / "lora")
    assert export.main(["--workdir", run, "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["pytorch_lora_weights.safetensors", "training.json"]
    assert json.load(open(os.path.join(out, "training.json")))["lora"]["step"] == 3
    ema = load_params(run, "ema")
    for component, params in (("unet", base), ("text_encoder", text)):
        trained = apply_lora(params, lora_weights(ema[component], 1.0))
        assert max(np.abs(a - b).max() for a, b in zip(leaves(trained), leaves(params))) > 0
        jax.tree.map(np.testing.assert_array_equal, apply_lora(params, read_lora(out, params, component)), trained)
    merged = str(tmp_path / "merged")
    assert export.main(["--workdir", run, "--out", merged, "--merge"]) == 0
    pipe = TextToImage.from_pretrained(merged)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.denoiser_params),
                 apply_lora(base, lora_weights(ema["unet"], 1.0)))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.text_params),
                 apply_lora(text, lora_weights(ema["text_encoder"], 1.0)))
    with pytest.raises(ValueError, match="is a LoRA run: its checkpoints hold adapters"):
        c.model.init_from = run
        train(c, str(tmp_path / "from_lora"))



def test_diffusers_reads_the_example_lora_with_our_outputs():
    """The worked example's LoRA (configs/lora.py on the shipped model) loaded by diffusers'
    `load_lora_weights` onto jaxdiff/assets/shapes_unet gives the U-Net outputs jaxdiff gives (golden file made by
    tests/fixtures/make_lora_training_fixtures.py)."""
    ref = load_file(os.path.join(FIXTURES, "reference.safetensors"))
    unet, params = convert.from_diffusers(os.path.join(SHAPES_UNET_MODEL, "unet"))
    adapted = apply_lora(params, read_lora(FIXTURES, params, "unet"))
    for name, p in (("base", params), ("lora", adapted)):
        got = np.asarray(unet.apply({"params": p}, ref["x"], ref["t"], ref["context"]))
        want = ref[f"unet_{name}"]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5, name
    assert np.abs(ref["unet_lora"] - ref["unet_base"]).max() > 0.1  # the LoRA changes the output
