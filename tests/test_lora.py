"""LoRA loading (jaxdiff.convert.lora) against diffusers + peft with the adapter loaded (golden files from
tests/fixtures/make_lora_fixtures.py), and against the closed form W + scale * (alpha / r) * B @ A."""
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxdiff as jd
from jaxdiff.convert import lora
from jaxdiff.convert.common import to_flax_layout
from jaxdiff.models.checks import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"
LORA = FIXTURES / "lora"
FILES = {"peft": LORA / "peft", "kohya": LORA / "kohya.safetensors", "kohya_sgm": LORA / "kohya_sgm.safetensors"}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.cache
def models():
    unet, unet_params = jd.convert.from_diffusers(str(FIXTURES / "pipeline_sd" / "unet"))
    text, text_params = jd.convert.from_transformers(str(FIXTURES / "pipeline_sd" / "text_encoder"))
    return unet, unet_params, text, text_params, load_file(LORA / "reference.safetensors")


@functools.cache
def runners():
    """Jitted U-Net and text encoder on the fixed inputs, params an argument (one compile for every LoRA)."""
    unet, _, text, _, ref = models()
    run_unet = jax.jit(lambda p: unet.apply({"params": p}, ref["x"], ref["t"], ref["context"]))
    run_text = jax.jit(lambda p: text.apply({"params": p}, ref["input_ids"])[0])
    return run_unet, run_text


def reference(name, scale):
    return models()[4][f"{name}_{str(scale).replace('.', '_')}"]


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


def test_base_models_match_diffusers():
    _, unet_params, _, text_params, ref = models()
    run_unet, run_text = runners()
    assert rel_err(run_unet(unet_params), ref["unet_base"]) < 1e-5
    assert rel_err(run_text(text_params), ref["text_base"]) < 1e-5


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("source", list(FILES))
def test_merged_lora_matches_diffusers(source, scale):
    _, unet_params, _, text_params, _ = models()
    run_unet, run_text = runners()
    err = rel_err(run_unet(jd.convert.load_lora(unet_params, str(FILES[source]), scale)), reference("unet", scale))
    print(f"{source} scale {scale}: U-Net relative error vs diffusers {err:.2e}")
    assert err <= 1e-5
    if source != "kohya_sgm":  # that file holds the U-Net's part only
        merged = jd.convert.load_lora(text_params, str(FILES[source]), scale, component="text_encoder")
        err = rel_err(run_text(merged), reference("text", scale))
        print(f"{source} scale {scale}: text encoder relative error vs diffusers {err:.2e}")
        assert err <= 1e-5


def test_formats_read_the_same_adapters():
    _, unet_params, _, _, _ = models()
    peft = lora.read_lora(str(FILES["peft"]), unet_params)
    assert len(peft) == 48  # 4 transformer blocks x (8 attention projections + ff.net.2 + proj_in), 8 conv1
    for source in ("kohya", "kohya_sgm"):
        other = lora.read_lora(str(FILES[source]), unet_params)
        assert other.keys() == peft.keys()
        for path, w in peft.items():
            np.testing.assert_array_equal(other[path].down, w.down)
            np.testing.assert_array_equal(other[path].up, w.up)
            assert float(other[path].scale) == float(w.scale)


def test_merge_is_the_closed_form_for_linears_and_convs():
    """W + scale * (alpha / r) * B @ A, from the file's torch-layout tensors and the metadata's alphas."""
    _, unet_params, _, _, _ = models()
    state = load_file(FILES["peft"] / lora.WEIGHT_NAME)
    merged = flat(jd.convert.load_lora(unet_params, str(FILES["peft"]), 0.5))
    base = flat(unet_params)
    for path, module, alpha_over_r in [
        (("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel"),
         "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 8 / 4),
        (("up_blocks_1", "resnets_1", "conv1", "kernel"), "up_blocks.1.resnets.1.conv1", 3 / 2),  # alpha_pattern
        (("mid_block", "attentions_0", "proj_in", "kernel"), "mid_block.attentions.0.proj_in", 8 / 4)]:
        a, b = state[f"unet.{module}.lora_A.weight"], state[f"unet.{module}.lora_B.weight"]
        delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(b.shape[0], *a.shape[1:])
        want = base[path] + 0.5 * alpha_over_r * to_flax_layout("kernel", delta)
        np.testing.assert_allclose(merged[path], want, rtol=1e-5, atol=1e-6)
    untouched = ("down_blocks_0", "resnets_0", "conv2", "kernel")
    np.testing.assert_array_equal(merged[untouched], base[untouched])


def test_input_params_are_untouched():
    _, unet_params, _, _, _ = models()
    before = {k: np.array(v) for k, v in flat(unet_params).items()}
    merged = jd.convert.load_lora(unet_params, str(FILES["peft"]), 1.0)
    assert merged is not unet_params
    after = flat(unet_params)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_unmerged_under_jit_matches_diffusers_and_a_new_scale_does_not_recompile():
    _, _, text, text_params, ref = models()
    adapters = lora.read_lora(str(FILES["peft"]), text_params, "text_encoder")
    traces = []

    @jax.jit
    def encode(params, adapters, scale, ids):
        traces.append(1)  # runs once per trace
        return text.apply({"params": lora.apply_lora(params, adapters, scale)}, ids)[0]

    for scale in (1.0, 0.5):
        err = rel_err(encode(text_params, adapters, jnp.float32(scale), ref["input_ids"]), reference("text", scale))
        print(f"unmerged text encoder, scale {scale}: relative error vs diffusers {err:.2e}")
        assert err <= 1e-5
    assert len(traces) == 1


def test_unmerged_equals_merged_for_several_loras():
    """Two LoRAs with their own (traced) scales = merging one, then the other; the same LoRA twice at 0.5 + 0.5
    is the LoRA at 1.0."""
    _, unet_params, _, _, _ = models()
    first = lora.read_lora(str(FILES["peft"]), unet_params)
    rng = np.random.default_rng(0)
    second = {path: lora.LoRAWeights(rng.standard_normal(w.down.shape, np.float32) * 0.1,
                                     rng.standard_normal(w.up.shape, np.float32) * 0.1, jnp.float32(0.25))
              for path, w in list(first.items())[::3]}
    traces = []

    @jax.jit
    def apply(params, adapters, scales):
        traces.append(1)
        return lora.apply_lora(params, adapters, scales)

    for scales in ([0.7, -0.3], [0.2, 1.5]):
        together = flat(apply(unet_params, [first, second], jnp.array(scales)))
        one_after_another = flat(lora.apply_lora(lora.apply_lora(unet_params, first, scales[0]), second, scales[1]))
        for path, value in one_after_another.items():
            np.testing.assert_allclose(together[path], value, rtol=1e-6, atol=1e-6)
    assert len(traces) == 1
    twice = flat(apply(unet_params, [first, first], jnp.array([0.5, 0.5])))
    once = flat(jd.convert.load_lora(unet_params, str(FILES["peft"]), 1.0))
    for path, value in once.items():
        np.testing.assert_allclose(twice[path], value, rtol=1e-6, atol=1e-6)


def test_export_round_trips_with_diffusers_metadata(tmp_path):
    _, unet_params, _, text_params, _ = models()
    adapters = {"unet": lora.read_lora(str(FILES["kohya"]), unet_params),
                "text_encoder": lora.read_lora(str(FILES["kohya"]), text_params, "text_encoder")}
    file = lora.save_lora(adapters, str(tmp_path / "out"))
    with safe_open(file, framework="numpy") as f:
        metadata = json.loads(f.metadata()[lora.METADATA_KEY])
        keys = set(f.keys())
    # diffusers' own file (the peft fixture) has the same tensors under the same keys, up to CLIP's tower level
    theirs = {k.replace("text_encoder.", "text_encoder.text_model.") for k in load_file(FILES["peft"] / lora.WEIGHT_NAME)}
    assert keys == theirs
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8
    assert metadata["unet.rank_pattern"] == {"down_blocks.0.resnets.0.conv1": 2, "down_blocks.1.resnets.0.conv1": 2,
                                             "mid_block.resnets.0.conv1": 2, "mid_block.resnets.1.conv1": 2,
                                             "up_blocks.0.resnets.0.conv1": 2, "up_blocks.0.resnets.1.conv1": 2,
                                             "up_blocks.1.resnets.0.conv1": 2, "up_blocks.1.resnets.1.conv1": 2}
    assert set(metadata["unet.alpha_pattern"].values()) == {3}
    assert metadata["text_encoder.r"] == 4 and metadata["text_encoder.lora_alpha"] == 8
    for component, params in (("unet", unet_params), ("text_encoder", text_params)):
        again = lora.read_lora(str(tmp_path / "out"), params, component)
        assert again.keys() == adapters[component].keys()
        for path, w in again.items():
            np.testing.assert_array_equal(w.down, adapters[component][path].down)
            np.testing.assert_array_equal(w.up, adapters[component][path].up)
            assert float(w.scale) == float(adapters[component][path].scale)


def test_transformer_component_maps_through_the_converter(tmp_path):
    """A Flux transformer's modules (no golden LoRA: the closed form) in a prefix-less file, as diffusers'
    `save_lora_adapter` writes one model's LoRA."""
    _, params = jd.convert.from_diffusers(str(FIXTURES / "flux" / "flux_dev"))
    base = flat(params)
    rng = np.random.default_rng(1)
    paths = {"transformer_blocks.0.attn.to_q": ("transformer_blocks_0", "attn", "to_q", "kernel"),
             "single_transformer_blocks.0.proj_mlp": ("single_transformer_blocks_0", "proj_mlp", "kernel"),
             "x_embedder": ("x_embedder", "kernel")}
    state = {}
    for module, path in paths.items():
        n_in, n_out = base[path].shape
        state[f"{module}.lora_A.weight"] = rng.standard_normal((3, n_in), np.float32)
        state[f"{module}.lora_B.weight"] = rng.standard_normal((n_out, 3), np.float32)
    save_file(state, str(tmp_path / "flux_lora.safetensors"))
    merged = flat(jd.convert.load_lora(params, str(tmp_path / "flux_lora.safetensors"), 0.3, "transformer"))
    for module, path in paths.items():  # no metadata, no alpha: delta W = B @ A
        delta = state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]
        np.testing.assert_allclose(merged[path], base[path] + 0.3 * delta.T, rtol=1e-5, atol=1e-5)
    assert sum(not np.array_equal(merged[p], base[p]) for p in base) == len(paths)


# ----------------------------------------------------------------------------- errors


def lora_file(tmp_path, **extra):
    """The peft fixture's tensors (and metadata) with changes: key=None drops a key."""
    state = load_file(FILES["peft"] / lora.WEIGHT_NAME)
    state.update({k: v for k, v in extra.items() if v is not None})
    state = {k: v for k, v in state.items() if extra.get(k, 0) is not None}
    with safe_open(FILES["peft"] / lora.WEIGHT_NAME, framework="numpy") as f:
        metadata = f.metadata()
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=metadata)
    return str(tmp_path / "bad.safetensors")


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def test_wrong_params_for_the_component_name_the_module_and_the_components():
    _, _, _, text_params, _ = models()
    with pytest.raises(CheckpointError, match=r"unet module 'down_blocks.*no such module; are they the unet's params\? "
                                              r"\(the file has LoRAs for: text_encoder, unet; choose one with component="):
        jd.convert.load_lora(text_params, str(FILES["peft"]))
    with pytest.raises(CheckpointError, match=r"no LoRA for component 'text_encoder_2'; it has: text_encoder, unet"):
        jd.convert.load_lora(text_params, str(FILES["peft"]), component="text_encoder_2")
    with pytest.raises(ValueError, match=r"unknown component 'te'; choose one of: unet, transformer"):
        jd.convert.load_lora(text_params, str(FILES["peft"]), component="te")


@pytest.mark.parametrize("extra, message", [
    ({"unet.down_blocks.0.nope.lora_A.weight": np.zeros((4, 16), np.float32),
      "unet.down_blocks.0.nope.lora_B.weight": np.zeros((16, 4), np.float32)},
     r"module 'down_blocks.0.nope'.*no such module"),
    ({"unet.conv_in.weight": np.zeros((16, 4, 3, 3), np.float32)}, r"'unet.conv_in.weight' is not a LoRA tensor"),
    ({f"{Q}.lora_A.weight": np.zeros((4, 17), np.float32)}, r"delta of shape \(17, 16\).*kernel is \(16, 16\)"),
    ({f"{Q}.lora_B.weight": np.zeros((16, 3), np.float32)}, r"not a LoRA pair"),
    ({f"{Q}.lora_B.weight": np.full((16, 4), np.nan, np.float32)}, r"to_q'.*up matrix holds NaN or inf"),
    ({f"{Q}.lora_B.weight": None}, r"to_q' has no up matrix"),
    ({f"{Q}.lora_magnitude_vector": np.ones(16, np.float32)}, r"DoRA"),
    ({"foo.lora_A.weight": np.zeros((4, 16), np.float32)}, r"'foo.lora_A.weight' names no component"),
])
def test_bad_files_fail_in_one_line_naming_the_key(tmp_path, extra, message):
    _, unet_params, _, _, _ = models()
    with pytest.raises(CheckpointError, match=message) as e:
        jd.convert.load_lora(unet_params, lora_file(tmp_path, **extra))
    assert "\n" not in str(e.value)


def test_not_a_lora_file(tmp_path):
    _, unet_params, _, _, _ = models()
    with pytest.raises(CheckpointError, match="pass the LoRA file itself"):
        jd.convert.load_lora(unet_params, str(FIXTURES / "pipeline_sd"))  # a pipeline folder: no .safetensors
    with pytest.raises(CheckpointError, match="not a LoRA tensor"):
        jd.convert.load_lora(unet_params, str(FIXTURES / "pipeline_sd" / "unet"))  # a model's weights


def respelled(tmp_path, rename, keep=lambda key: True, metadata=True):
    """The peft fixture with its keys renamed (and its metadata kept or dropped)."""
    state = load_file(FILES["peft"] / lora.WEIGHT_NAME)
    with safe_open(FILES["peft"] / lora.WEIGHT_NAME, framework="numpy") as f:
        header = f.metadata() if metadata else None
    save_file({rename(k): v for k, v in state.items() if keep(k)}, str(tmp_path / "x.safetensors"), metadata=header)
    return str(tmp_path / "x.safetensors")


def old_diffusers_name(key):
    """diffusers' attention-processor LoRA names, before peft: `attn1.processor.to_q_lora.down.weight`,
    `proj_in.lora.down.weight`; CLIP's `self_attn.to_q_lora.down.weight`."""
    key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
    for old, new in (("to_out.0.lora", "processor.to_out_lora"), ("to_q.lora", "processor.to_q_lora"),
                     ("to_k.lora", "processor.to_k_lora"), ("to_v.lora", "processor.to_v_lora"),
                     ("out_proj.lora", "to_out_lora"), ("q_proj.lora", "to_q_lora"), ("k_proj.lora", "to_k_lora"),
                     ("v_proj.lora", "to_v_lora")):
        key = key.replace(old, new)
    return key


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
@pytest.mark.parametrize("spelling", ["old_diffusers", "lora_te1", "one_model"])
def test_other_key_spellings_read_the_same_adapters(tmp_path, spelling, component):
    _, unet_params, _, text_params, _ = models()
    params = unet_params if component == "unet" else text_params
    want = lora.read_lora(str(FILES["peft" if spelling != "lora_te1" else "kohya"]), params, component)
    if spelling == "old_diffusers":  # no metadata in those files: alpha = r
        path = respelled(tmp_path, old_diffusers_name, metadata=False)
        want = {p: w._replace(scale=jnp.float32(1.0)) for p, w in want.items()}
    elif spelling == "lora_te1":  # SDXL's kohya files name the first text encoder so
        state = load_file(FILES["kohya"])
        save_file({k.replace("lora_te_", "lora_te1_"): v for k, v in state.items()}, str(tmp_path / "x.safetensors"))
        path = str(tmp_path / "x.safetensors")
    else:  # diffusers' save_lora_adapter on one model: no component prefix (metadata not prefixed either)
        state = {k.removeprefix(component + "."): v for k, v in load_file(FILES["peft"] / lora.WEIGHT_NAME).items()
                 if k.startswith(component + ".")}
        with safe_open(FILES["peft"] / lora.WEIGHT_NAME, framework="numpy") as f:
            config = json.loads(f.metadata()[lora.METADATA_KEY])
        config = {k.removeprefix(component + "."): v for k, v in config.items() if k.startswith(component + ".")}
        save_file(state, str(tmp_path / "x.safetensors"), metadata={lora.METADATA_KEY: json.dumps(config)})
        path = str(tmp_path / "x.safetensors")
    got = lora.read_lora(path, params, component)
    assert got.keys() == want.keys()
    for p, w in got.items():
        np.testing.assert_array_equal(w.down, want[p].down)
        np.testing.assert_array_equal(w.up, want[p].up)
        assert float(w.scale) == float(want[p].scale)
