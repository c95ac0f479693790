"""jaxdiff.convert.from_diffusers / to_diffusers: round trips, sharded folders, and errors that name the key."""
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import jaxdiff as jd
from jaxdiff.convert.common import CheckpointError
from jaxdiff.convert.diffusers import torch_key_of
from jaxdiff.models import AutoencoderKLConfig, UNetConfig

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def copy_fixture(name, tmp_path) -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def flat(params):
    return traverse_util.flatten_dict(jax.device_get(params))


def test_torch_keys():
    assert torch_key_of(("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn1", "to_out_0", "kernel")) \
        == "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight"
    assert torch_key_of(("time_embedding", "linear_1", "bias")) == "time_embedding.linear_1.bias"
    assert torch_key_of(("x", "ff", "net_0", "proj", "kernel")) == "x.ff.net.0.proj.weight"
    assert torch_key_of(("class_embedding", "embedding")) == "class_embedding.weight"
    assert torch_key_of(("conv_norm_out", "scale")) == "conv_norm_out.weight"


@pytest.mark.parametrize("name", ["unet_sd2", "vae"])
def test_round_trip_is_exact(name, tmp_path):
    module, params = jd.convert.from_diffusers(str(FIXTURES / name))
    jd.convert.to_diffusers(module, params, str(tmp_path / "out"))
    module2, params2 = jd.convert.from_diffusers(str(tmp_path / "out"))
    assert module2.config == module.config
    a, b = flat(params), flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))
    # the exported file holds the original tensors, key for key, bit for bit
    original, exported = load_file(str(FIXTURES / name / WEIGHTS)), load_file(str(tmp_path / "out" / WEIGHTS))
    assert original.keys() == exported.keys()
    for k in original:
        np.testing.assert_array_equal(original[k], exported[k], err_msg=k)


def test_export_accepts_boxed_params(tmp_path):
    module, params = jd.convert.from_diffusers(str(FIXTURES / "vae_plain"))
    # init's tree holds nn.Partitioned boxes; refill them with the fixture's values
    # (eval_shape: compiling a real init of every RNG initialiser takes ~20 s on CPU)
    shapes = jax.eval_shape(module.init, jax.random.key(1), jnp.zeros((1, 4, 4, 3)))["params"]
    is_box = lambda x: isinstance(x, nn.Partitioned)
    boxed = jax.tree.map(lambda box, value: box.replace_boxed(value), shapes, params, is_leaf=is_box)
    assert all(is_box(x) for x in jax.tree.leaves(boxed, is_leaf=is_box))
    jd.convert.to_diffusers(module, boxed, str(tmp_path))
    _, reloaded = jd.convert.from_diffusers(str(tmp_path))
    a, b = flat(params), flat(reloaded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_sharded_folder(tmp_path):
    tensors = load_file(str(FIXTURES / "unet_sd1" / WEIGHTS))
    keys = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
    (tmp_path / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    shutil.copy(FIXTURES / "unet_sd1" / "config.json", tmp_path / "config.json")
    _, sharded = jd.convert.from_diffusers(str(tmp_path))
    _, single = jd.convert.from_diffusers(str(FIXTURES / "unet_sd1"))
    a, b = flat(sharded), flat(single)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def edit_weights(folder: Path, edit):
    tensors = dict(load_file(str(folder / WEIGHTS)))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def test_missing_key_is_named(tmp_path):
    folder = copy_fixture("unet_class_inpaint", tmp_path)
    edit_weights(folder, lambda t: t.pop("mid_block.resnets.0.conv2.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'mid_block\.resnets\.0\.conv2\.weight'"):
        jd.convert.from_diffusers(str(folder))


def test_unused_key_is_named(tmp_path):
    folder = copy_fixture("vae", tmp_path)
    edit_weights(folder, lambda t: t.update({"decoder.extra.weight": np.zeros((3,), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unused tensor 'decoder\.extra\.weight'"):
        jd.convert.from_diffusers(str(folder))


def test_wrong_shape_is_named(tmp_path):
    folder = copy_fixture("vae", tmp_path)
    edit_weights(folder, lambda t: t.update({"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}))
    with pytest.raises(CheckpointError, match=r"'quant_conv\.weight' has shape \(3, 3, 8, 8\).*needs \(1, 1, 8, 8\)"):
        jd.convert.from_diffusers(str(folder))


@pytest.mark.parametrize("field,value,match", [
    ("resnet_time_scale_shift", "ada_group", "resnet_time_scale_shift='ada_group'.*'default', 'scale_shift'"),
    ("attention_type", "gated", "attention_type='gated'"),
    ("addition_embed_type", "image", "addition_embed_type='image' is not supported.*text_time"),
    ("act_fn", "gelu", "act_fn='gelu'.*'silu'"),
    ("only_cross_attention", [True, False, False], r"only_cross_attention=\[True, False, False\]"),
    ("down_block_types", ["AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
     "down_block_types: unsupported block type 'AttnDownBlock2D'; supported: CrossAttnDownBlock2D, DownBlock2D"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type='UNetMidBlock2DSimpleCrossAttn'"),
    ("some_future_field", 1, "some_future_field=1 is unknown"),
])
def test_unsupported_unet_config_is_named(field, value, match, tmp_path):
    folder = copy_fixture("unet_sd1", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        jd.convert.from_diffusers(str(folder))


def test_unsupported_vae_config_and_class_are_named():
    with pytest.raises(CheckpointError, match="up_block_types"):
        AutoencoderKLConfig.from_diffusers_config({"block_out_channels": [8], "up_block_types": ["AttnUpDecoderBlock2D"]})
    with pytest.raises(CheckpointError, match="norm_type='spatial'"):
        AutoencoderKLConfig.from_diffusers_config({"norm_type": "spatial"})
    with pytest.raises(CheckpointError, match="'UNet2DModel'.*supported: UNet2DConditionModel, AutoencoderKL"):
        jd.convert.diffusers.module_from_config({"_class_name": "UNet2DModel"})


def test_diffusers_config_round_trip():
    config = json.loads((FIXTURES / "unet_sd2" / "config.json").read_text())
    ours = UNetConfig.from_diffusers_config(config)
    assert UNetConfig.from_diffusers_config(ours.to_diffusers_config()) == ours
    assert ours.use_linear_projection and ours.num_attention_heads == (2, 4, 2)
    assert ours.transformer_layers_per_block == (1, 2, 1)


def test_diffusers_loads_our_export(tmp_path):
    """diffusers' from_pretrained on `to_diffusers` output reproduces the reference outputs."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    module, params = jd.convert.from_diffusers(str(FIXTURES / "unet_class_inpaint"))
    jd.convert.to_diffusers(module, params, str(tmp_path))
    model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
    io = np.load(FIXTURES / "unet_class_inpaint" / "io.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(io["x"].transpose(0, 3, 1, 2).copy()), torch.from_numpy(io["t"]),
                    torch.from_numpy(io["context"]), class_labels=torch.from_numpy(io["class_labels"])).sample
    np.testing.assert_array_equal(out.numpy().transpose(0, 2, 3, 1), io["sample"])


def test_bfloat16_params_export_as_bfloat16(tmp_path):
    """bfloat16 params are written as safetensors BF16 (half the bytes); they load back bit for bit, and as float32
    to exactly their float32 values."""
    module, params = jd.convert.from_diffusers(str(FIXTURES / "vae"), param_dtype=jnp.bfloat16)
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    jd.convert.to_diffusers(module, params, str(tmp_path))
    assert load_file(str(tmp_path / WEIGHTS))["quant_conv.weight"].dtype == jnp.bfloat16
    _, reloaded = jd.convert.from_diffusers(str(tmp_path), param_dtype=jnp.bfloat16)
    _, as_float32 = jd.convert.from_diffusers(str(tmp_path))
    a, b, c = flat(params), flat(reloaded), flat(as_float32)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(c[k].dtype == np.float32 and np.array_equal(np.asarray(a[k], np.float32), c[k]) for k in a)


TRANSFORMERS_FIXTURES = FIXTURES.parent / "transformers"


def make_pipeline_folder(root: Path, unet="unet_sd1") -> Path:
    shutil.copytree(FIXTURES / unet, root / "unet")
    shutil.copytree(FIXTURES / "vae", root / "vae")
    shutil.copytree(TRANSFORMERS_FIXTURES / "text_gelu" / "model", root / "text_encoder")
    shutil.copytree(TRANSFORMERS_FIXTURES / "tokenizer_sd1", root / "tokenizer")
    (root / "scheduler").mkdir()
    scheduler = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.35.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_load_pipeline(tmp_path):
    pipe = jd.convert.load_pipeline(str(make_pipeline_folder(tmp_path)))
    assert pipe.scheduler_config["beta_schedule"] == "scaled_linear"
    _, unet_params = jd.convert.from_diffusers(str(FIXTURES / "unet_sd1"))
    a, b = flat(pipe.denoiser_params), flat(unet_params)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ids = pipe.tokenizer(["a photo of a cat", ""], max_length=16)
    assert ids.shape == (2, 16) and ids[0, 0] == pipe.tokenizer.bos_token_id
    # the parts fit together: text states -> U-Net context -> latents -> VAE decode
    ids = jnp.asarray(ids) % pipe.text_encoder.config.vocab_size  # the tiny text model has a 99-token vocabulary

    @jax.jit
    def chain(ids, z):
        context, _ = pipe.text_encoder.apply({"params": pipe.text_params}, ids)
        eps = pipe.denoiser.apply({"params": pipe.denoiser_params}, z, jnp.array([10, 10]), context)
        return pipe.vae.apply({"params": pipe.vae_params}, eps[:, :8, :8], method=pipe.vae.decode)

    image = chain(ids, jax.random.normal(jax.random.key(0), (2, 16, 16, 4)))
    assert image.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(image)))


def test_load_pipeline_checks_components(tmp_path):
    folder = make_pipeline_folder(tmp_path / "a", unet="unet_sd2")
    with pytest.raises(CheckpointError, match="hidden_size is 32 wide but the denoiser's cross_attention_dim takes 20"):
        jd.convert.load_pipeline(str(folder))
    folder = make_pipeline_folder(tmp_path / "b")
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lacks components \['vae'\]"):
        jd.convert.load_pipeline(str(folder))
