"""The video branch of the diffusion recipe (backbones temporal_unet and wan): a tiny text/image-to-video run
from scratch on moving_shapes, and one inflated from a tiny latent text-to-image run, which before
training is that run's U-Net on every frame; the export of a video run as a TextToVideo folder, and
ShapesEval's video path on it; a tiny Wan transformer trained with flow matching, exported, loaded and sampled."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff.data.pipeline  # noqa: F401  registers the builders
from configs import clip as clip_config
from configs import latent_diffusion as ld_config
from configs import vae as vae_config
from configs import video_diffusion as vd_config
from configs import wan as wan_config
from jaxdiff import guidance, samplers, schedules
from jaxdiff.data import eval as shapes_eval
from jaxdiff.models import TemporalUNetConfig, WanConfig, inflate
from jaxdiff.pipelines import TextToVideo
from jaxdiff.pipelines import shapes_eval as shapes_eval_cli
from jaxdiff.training import export, load_params, recipes, train
from jaxdiff.training.data import data_spec, shapes_batches
from jaxdiff.training.evaluate import read_run_config
from jaxdiff.training.metrics import image_grid
from jaxdiff.training.recipes.diffusion import Diffusion
from jaxdiff.training.recipes.diffusion.backbones import image_unet, network
from jaxdiff.training.recipes.diffusion.config import ModelConfig
from jaxdiff.video_io import read_video
from tfds_fixtures import prepare_tfds

VIDEOS = vd_config.TINY_DATA          # 16px, 4 frames, 16/2/2 examples
IMAGES = "shapes/16px-16-2-2-seed0"   # the same caption vocabulary, for the text-to-image run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tfds(tmp_path_factory, VIDEOS, IMAGES)


def tiny(variant, data_dir, steps=2):
    c = vd_config.get_config(variant)
    c.data.data_dir = data_dir
    c.steps, c.checkpoint_every, c.sample_every = steps, 0, 0
    return c


@pytest.fixture(scope="module")
def image_run(data_dir, tmp_path_factory):
    """A tiny latent text-to-image run (2 steps) on 16px shapes, to inflate."""
    c = ld_config.get_config("tiny")
    c.data.update(source="shapes", name=IMAGES, data_dir=data_dir, image_size=16, max_length=16)
    c.steps, c.checkpoint_every, c.sample_every = 2, 0, 0
    workdir = str(tmp_path_factory.mktemp("ld"))
    train(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def frozen_runs(data_dir, tmp_path_factory):
    """Tiny CLIP and VAE runs (1 step each) on 16px shapes: the frozen parts of `video_run`, which an
    exported model needs (a run on randomly initialised frozen parts does not export)."""
    workdirs = {}
    for name, recipe in (("clip", clip_config), ("vae", vae_config)):
        c = recipe.get_config("tiny")
        c.data.update(source="shapes", name=IMAGES, data_dir=data_dir, image_size=16, max_length=16)
        c.steps, c.checkpoint_every, c.sample_every, c.eval_examples = 1, 0, 0, 8
        workdirs[name] = str(tmp_path_factory.mktemp(name))
        train(c, workdirs[name])
    return workdirs


@pytest.fixture(scope="module")
def video_run(data_dir, frozen_runs, tmp_path_factory):
    """The tiny text/image-to-video run from scratch (2 steps) on those VAE and CLIP runs: (config, result)."""
    c = tiny("tiny", data_dir)
    c.model.vae.checkpoint, c.model.text_encoder.checkpoint = frozen_runs["vae"], frozen_runs["clip"]
    return c, train(c, str(tmp_path_factory.mktemp("vd")))


def test_tiny_video_run_trains_and_previews_frame_strips(video_run):
    c, result = video_run
    assert len(result.losses) == 2 and np.all(np.isfinite(result.losses))
    # The preview the loop's grid writer gets (called here directly: the loop's sample_every path
    # draws its key with state.key(-1), which this jax refuses).
    task = recipes.build(c, data_spec(c.data))
    frozen = jax.tree.map(jnp.asarray, nn.meta.unbox(task.frozen))
    images = np.asarray(jax.jit(task.sample)(result.state.ema, frozen, jax.random.key(0)))
    # 2 preview videos of 4 frames of 16x16, each video's frames side by side
    assert images.shape == (2, 16, 4 * 16, 3)
    assert np.all(np.isfinite(images)) and images.min() >= 0 and images.max() <= 1
    assert image_grid(images).shape == (20, 134, 3)


def test_export_loads_back_as_text_to_video_and_shapes_eval_scores_it(video_run, frozen_runs, tmp_path,
                                                                      monkeypatch, capsys):
    """The export CLI picks text-to-video by the run's backbone; TextToVideo loads the folder with the
    runs' EMA weights; `jaxdiff.pipelines.shapes_eval --model --videos` generates the held-out motion prompts with it
    (frames from training.json) and its table is score_video's verdicts on the videos it generated."""
    c, result = video_run
    out = str(tmp_path / "model")
    assert export.main(["--workdir", result.workdir, "--out", out]) == 0
    pipe = TextToVideo.from_pretrained(out)
    for got, want in ((pipe.denoiser_params, load_params(result.workdir, "ema")),
                      (pipe.vae_params, load_params(frozen_runs["vae"], "ema")["vae"]),
                      (pipe.text_params, load_params(frozen_runs["clip"], "ema")["text_model"])):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
    # The run's video U-Net: its config fields, on 4-channel 8x8 latents (+ 5 conditioning channels),
    # with the jaxdiff-only settings (frame positions, per-block heads) that diffusers lacks.
    assert pipe.denoiser.config == TemporalUNetConfig(**{**c.model.temporal_unet.to_dict(), "in_channels": 9,
                                                     "out_channels": 4, "sample_size": 8})
    assert pipe.denoiser.config.frame_position_embedding == "sinusoidal"
    assert pipe.frame_noise_correlation == c.model.frame_noise_correlation == vd_config.FRAME_NOISE_CORRELATION
    prompts = ["a red circle moving left", "a blue square moving up and a green circle moving down"]
    np.testing.assert_array_equal(pipe.tokenize(prompts), data_spec(c.data).tokenize(prompts))
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert (index["_class_name"], index["unet"]) == ("TextToVideoSDPipeline", ["diffusers", "UNet3DConditionModel"])
    info = json.load(open(os.path.join(out, "training.json")))
    assert {k: v["step"] for k, v in info.items()} == {"diffusion": 2, "vae": 1, "clip": 1}

    calls = []
    generate = TextToVideo.generate

    def recording(self, prompts, *args, **kwargs):
        videos = generate(self, prompts, *args, **kwargs)
        calls.append((list(prompts), kwargs, np.asarray(videos["videos"])))
        return videos

    monkeypatch.setattr(TextToVideo, "generate", recording)
    assert shapes_eval_cli.main(["--model", out, "--videos", "--per_family", "2", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| motion | 2 |" in printed
    table = json.loads(printed.strip().splitlines()[-1])
    [(asked, kwargs, videos)] = calls
    assert asked == shapes_eval.heldout_video_prompts(2, num_frames=4)    # the run trained on 4-frame clips
    # the folder's sampler and its run's guidance
    assert kwargs == dict(steps=2, guidance_scale=4.0, guidance_rescale=0.0, seed=0, method="dpmpp_2m")
    assert videos.shape == (2, 4, 16, 16, 3) and np.all(np.isfinite(videos))   # the folder's default frames
    assert videos.min() >= 0 and videos.max() <= 1
    hits = [shapes_eval.score_video(p, shapes_eval.to_uint8(v)) for p, v in zip(asked, videos)]
    constant = [shapes_eval.constant_objects(shapes_eval.to_uint8(v)) for v in videos]
    assert table == {"motion": np.mean(hits), "overall": np.mean(hits), "count": {"motion": 2},
                     "constant": np.mean(constant)}


def test_export_errors_name_the_run(tmp_path):
    """Unsupported runs fail on their config.json, before anything is loaded or written."""
    def run_folder(c, name):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(c.to_json())
        return str(tmp_path / name)

    out = str(tmp_path / "model")
    image = run_folder(ld_config.get_config("tiny"), "image")
    with pytest.raises(ValueError, match=r"not a latent text-to-video run .*backbone 'unet'"):
        export.export_text_to_video(image, out)
    scratch = run_folder(tiny("tiny", ""), "scratch")     # on randomly initialised frozen parts
    with pytest.raises(ValueError, match=r"not a latent text-to-image run .*backbone 'temporal_unet'"):
        export.export_text_to_image(scratch, out)
    with pytest.raises(ValueError, match="config.model.vae.checkpoint is empty"):
        export.export_run(scratch, out)
    dit = ld_config.get_config("tiny")
    dit.model.backbone = "dit"
    with pytest.raises(ValueError, match=r"backbone='dit', which has no pipeline export; exportable: diffusion "
                                         r"runs with backbone 'unet' \(text-to-image\), 'mmdit' \(text-to-image\), 'temporal_unet'"):
        export.export_run(run_folder(dit, "dit"), out)
    with pytest.raises(ValueError, match=r"is a 'vae' run"):
        export.export_run(run_folder(vae_config.get_config("tiny"), "vae"), out)
    assert export.main(["--workdir", scratch, "--out", out]) == 1
    assert not os.path.exists(out) and [p for p in os.listdir(tmp_path) if p.startswith(".export")] == []


def test_inflated_run_starts_as_the_image_unet_on_every_frame(data_dir, image_run, tmp_path):
    c = tiny("tiny_inflated", data_dir)
    c.model.init_from = image_run
    params = jax.device_get(train(c, str(tmp_path), stop_after=0).state.params)   # the state at step 0

    run = read_run_config(image_run)
    unet = image_unet(run.model.unet.to_dict(), 4, 8, jnp.float32)
    ema = load_params(image_run, "ema")
    init_key = jax.random.split(jax.random.key(c.seed))[0]    # state.create's key for task.init
    video_unet, expected = inflate(unet, ema, init_key, **c.model.temporal.to_dict())
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (2, 4, 8, 8, 4))                  # [B, T, h, w, C] latent videos
    t = jnp.array([10.0, 700.0])
    ctx = jax.random.normal(k[1], (2, 16, 16))
    first = jax.random.normal(k[2], (2, 8, 8, 4))                 # conditioning frames: zero conv_in weights
    out = video_unet.apply({"params": params}, x, t, ctx, cond_frames=first)
    per_frame = unet.apply({"params": ema}, x.reshape(8, 8, 8, 4), jnp.repeat(t, 4), jnp.repeat(ctx, 4, axis=0))
    np.testing.assert_allclose(out, per_frame.reshape(out.shape), atol=1e-5)
    assert float(jnp.abs(per_frame).max()) > 0.1


def test_video_config_errors_are_named(data_dir, tmp_path):
    def build(c):
        return recipes.build(c, data_spec(c.data))

    c = tiny("tiny", data_dir)
    c.model.space = "pixel"
    with pytest.raises(ValueError, match=r"backbone='temporal_unet' trains in a VAE's latent space only: "
                                         r"config.model.space='pixel'"):
        build(c)
    c = tiny("tiny", data_dir)
    del c.model["text_encoder"]
    with pytest.raises(ValueError, match="needs config.model.text_encoder"):
        build(c)
    c = tiny("tiny", data_dir)
    c.model.init_from = str(tmp_path)
    with pytest.raises(ValueError, match="exactly one of config.model.temporal_unet .* got both"):
        build(c)
    c = tiny("tiny_inflated", data_dir)
    with pytest.raises(ValueError, match="got neither"):
        build(c)
    c.model.init_from = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build(c)
    c = tiny("tiny", data_dir)
    c.model.frame_noise_correlation = 1.0
    with pytest.raises(ValueError, match=r"config.model.frame_noise_correlation=1.0: need the fraction of the "
                                         r"noise's variance shared across frames, in \[0, 1\)"):
        build(c)
    c = ld_config.get_config("tiny")
    c.model.frame_noise_correlation = 0.5
    with pytest.raises(ValueError, match="frame_noise_correlation is for videos .* not backbone 'unet'"):
        build(c)
    c = vd_config.get_config("tiny")
    c.data = ld_config.get_config("tiny").data    # synthetic squares: images only
    with pytest.raises(ValueError, match="config.data.source='squares' has none"):
        build(c)
    c = ld_config.get_config("tiny")
    del c.model["text_encoder"]
    c.model.init_from = str(tmp_path)
    with pytest.raises(ValueError, match="is for a latent text-conditioned backbone 'unet' .* not 'unet' in "
                                         "'latent' space without a text encoder"):
        build(c)


def test_video_recipe_refuses_image_batches(data_dir):
    """A shapes dataset of images under a temporal_unet: the loss names the data when traced."""
    c = tiny("tiny", data_dir)
    c.data.name, c.model.num_frames = IMAGES, 4
    task = recipes.build(c, data_spec(c.data))
    params = jax.eval_shape(task.init, jax.random.key(0))
    batch = {"image": jnp.zeros((2, 16, 16, 3)), "tokens": jnp.zeros((2, 16), jnp.int32)}
    with pytest.raises(ValueError, match=r"trains on videos \[B, T, H, W, 3\], but config.data "
                                         r"\(name='shapes/16px-16-2-2-seed0'\) gives images of shape \(2, 16, 16, 3\)"):
        jax.eval_shape(task.loss, params, task.frozen, batch, jax.random.key(0), 0)


@pytest.fixture(scope="module")
def wan_run(data_dir, tmp_path_factory):
    """configs/wan.py:tiny for 60 steps (lr 3e-3) on the VAE and CLIP text encoder configs/wan.py trains on, the
    shipped model's (an export needs trained frozen parts). Not the 1-step tiny VAE: its posterior noise (variance
    ~1.2 per latent) swamped the videos, the best prediction from t alone was within 5% of the untrained loss and
    100 steps gained 2%. (config, result)."""
    c = wan_config.get_config("tiny")
    shipped = wan_config.get_config("shapes").model
    c.model.vae, c.model.text_encoder = shipped.vae, shipped.text_encoder
    c.data.data_dir = data_dir
    c.steps, c.checkpoint_every, c.sample_every = 60, 0, 0
    return c, train(c, str(tmp_path_factory.mktemp("wan")))


def test_wan_run_learns_more_than_the_best_guess_from_t_alone(wan_run):
    """The flow-matching loss on the 16 training videos (8 fixed keys): at Wan's training init (zero output layer)
    it is E|noise - x0|^2 = 1 + E[x0^2] (closed form over the VAE's posterior samples); after 60 steps it is below
    1 + Var(x0), the loss of the best velocity predicted from t alone (-mean(x0) at every position), so the
    transformer reads the noisy videos. Measured: 1.822 vs 1 + E[x0^2] = 1.823; 1.23 vs 1.42."""
    c, result = wan_run
    d = Diffusion(c, data_spec(c.data))
    frozen = jax.tree.map(jnp.asarray, nn.meta.unbox(d.frozen))
    batch = {k: jnp.asarray(v) for k, v in next(shapes_batches(c.data, 16, 0)).items()}
    keys = jax.random.split(jax.random.key(100), 8)
    loss = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: d.loss(p, frozen, batch, k, 0)[0])(keys)))
    x0 = jax.jit(jax.vmap(lambda k: d.latents.encode(frozen["vae"], batch["image"], k)))(keys[:4])
    assert x0.shape == (4, 16, 4, 8, 8, 4)
    zero_output, blind = 1 + float(jnp.mean(x0 ** 2)), 1 + float(jnp.mean(x0.var(axis=1)))
    init = nn.meta.unbox(d.init(jax.random.key(0)))
    assert not np.any(init["proj_out"]["kernel"])
    assert float(loss(init)) == pytest.approx(zero_output, rel=0.01)
    assert float(loss(result.state.params)) < blind < zero_output - 0.2
    assert result.losses[-1] < result.losses[0]


def test_wan_run_exports_and_samples_as_its_flow_euler_sampler(wan_run, tmp_path):
    """The export CLI writes transformer/ (diffusers' WanTransformer3DModel) beside the image VAE and CLIP, with a
    FlowMatchEulerDiscreteScheduler at the run's shift; TextToVideo loads it with the run's EMA weights, trained
    frames and size, and its guided sampling equals flow Euler driven by hand on the EMA transformer with CLIP's
    states, every frame decoded by the recipe's VAE; `python -m sample --video --model` writes the clip."""
    from sample.__main__ import main as sample_main

    c, result = wan_run
    out = str(tmp_path / "model")
    assert export.main(["--workdir", result.workdir, "--out", out]) == 0
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert (index["_class_name"], index["transformer"], index["vae"], index["text_encoder"]) == (
        "WanFrameVAEPipeline", ["diffusers", "WanTransformer3DModel"], ["diffusers", "AutoencoderKL"],
        ["transformers", "CLIPTextModel"])
    assert "unlike diffusers' WanPipeline" in index["_note"]
    scheduler = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert (scheduler["_class_name"], scheduler["shift"]) == ("FlowMatchEulerDiscreteScheduler", wan_config.FLOW_SHIFT)

    pipe = TextToVideo.from_pretrained(out)
    assert pipe.wan and not pipe.video_vae and not pipe.wan_image_to_video
    assert (pipe.num_frames, pipe.video_size, pipe.size_multiple) == (4, (16, 16), 4)
    assert pipe.denoiser.config == WanConfig(**{**c.model.wan.to_dict(), "in_channels": 4, "out_channels": 4,
                                                "text_dim": 128})
    ema = load_params(result.workdir, "ema")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.denoiser_params), ema)
    prompts = ["a red circle moving left", "a blue square moving up"]
    got = pipe.generate(prompts, steps=4, guidance_scale=3.0, seed=1)
    assert got["videos"].shape == (2, 4, 16, 16, 3) and np.all(np.isfinite(got["videos"]))

    d = Diffusion(c, data_spec(c.data))
    frozen = jax.tree.map(jnp.asarray, nn.meta.unbox(d.frozen))
    encode = lambda ids: d.encode_text(ema, frozen, jnp.asarray(ids))
    apply_fn = lambda x, t, ctx: d.net.apply({"params": ema}, x, t, ctx)
    model_fn = guidance.cfg(apply_fn, encode(d.spec.tokenize(prompts)), encode(d.spec.tokenize(["", ""])), 3.0)
    noise = jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 4))
    want = samplers.sample(model_fn, schedules.flow_matching(1000, shift=wan_config.FLOW_SHIFT), noise,
                           key=jax.random.key(2), method="flow_euler", steps=4, prediction_type="flow")
    np.testing.assert_allclose(got["latents"], want, rtol=1e-5, atol=1e-5)
    frames = jnp.clip(d.latents.decode(frozen["vae"], want) / 2 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(got["videos"], frames, atol=1e-5)
    assert float(jnp.std(frames)) > 0.01

    clip = str(tmp_path / "clip.gif")
    assert sample_main(["--video", prompts[0], "--model", out, "--out", clip, "--steps", "2"]) == 0
    assert read_video(clip).shape == (4, 16, 16, 3)


def test_wan_config_errors_are_named(data_dir, tmp_path):
    def model(**fields):
        c = wan_config.get_config("tiny")
        c.model.update(fields)
        return c.model

    with pytest.raises(ValueError, match="backbone='wan' trains with flow matching: config.model.prediction_type="
                                         "'v_prediction' must be 'flow'"):
        ModelConfig.of(model(prediction_type="v_prediction", schedule="scaled_linear", flow_shift=1.0))
    with pytest.raises(ValueError, match="backbone='wan': config.model.temporal .* is for 'temporal_unet'"):
        ModelConfig.of(model(temporal={"num_frames": 4}))
    with pytest.raises(ValueError, match="config.model.wan.image_dim: the recipe trains text-to-video"):
        ModelConfig.of(model(wan={**wan_config.get_config("tiny").model.wan, "image_dim": 8}))
    bare = model()
    del bare["wan"]
    with pytest.raises(ValueError, match="backbone='wan' needs config.model.wan"):
        ModelConfig.of(bare)
    with pytest.raises(ValueError, match=r"config.model.flow_shift=0.0: need a positive time shift"):
        ModelConfig.of(model(flow_shift=0.0))
    with pytest.raises(ValueError, match="flow_shift=2.0 shifts the flow_matching schedule, not "
                                         "config.model.schedule='scaled_linear'"):
        ModelConfig.of(model(flow_shift=2.0, schedule="scaled_linear", prediction_type="epsilon"))
    assert network(ModelConfig.of(model(remat="full")), 4, 8, jnp.float32, text_width=16).remat == "full"
    c = wan_config.get_config("tiny")
    c.data.data_dir = data_dir
    c.model.wan.patch_size = (1, 3, 3)
    with pytest.raises(ValueError, match=r"config.model.wan.patch_size=\(1, 3, 3\) does not tile the latent "
                                         r"videos' 4 frames of 8x8"):
        recipes.build(c, data_spec(c.data))


def test_wan_on_a_trained_t5_exports_it_as_its_text_encoder_and_fine_tunes_from_it(data_dir, tmp_path):
    """configs/wan.py:tiny_t5 trains a T5 encoder with the transformer (no CLIP); the export writes it as
    text_encoder/ (T5EncoderModel) over the WordTokenizer, and the loaded folder reads it as Wan reads UMT5 (ids and
    mask): its states equal the recipe's on the run's EMA weights, zero past each prompt's tokens. The folder starts
    a fine-tune (init_from), as an MMDiT folder does."""
    from jaxdiff.models.t5 import T5EncoderModel
    from jaxdiff.models.text_encoders import WanEncoders

    c = wan_config.get_config("tiny_t5")
    both = c.model.copy_and_resolve_references()
    both.text_encoder = wan_config.get_config("tiny").model.text_encoder
    with pytest.raises(ValueError, match="config.model.t5 on backbone 'wan' replaces config.model.text_encoder"):
        ModelConfig.of(both)
    c.model.vae = wan_config.get_config("shapes").model.vae
    c.data.data_dir = data_dir
    c.steps, c.checkpoint_every, c.sample_every = 3, 0, 0
    result = train(c, str(tmp_path / "run"))
    out = export.export_text_to_video(result.workdir, str(tmp_path / "model"))
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"] and "text_encoder_2" not in index
    assert not os.path.exists(os.path.join(out, "clip"))
    assert "clip" not in json.load(open(os.path.join(out, "training.json")))

    pipe = TextToVideo.from_pretrained(out)
    assert isinstance(pipe.text_encoder, WanEncoders) and isinstance(pipe.text_encoder.text_encoder, T5EncoderModel)
    ema = load_params(result.workdir, "ema")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pipe.denoiser_params), ema["denoiser"])
    prompts = ["a red circle moving left", "a blue square moving up"]
    states, _ = pipe.text_encoder.apply({"params": pipe.text_params}, pipe.tokenize(prompts))
    d = Diffusion(c, data_spec(c.data))
    want = d.encode_text(ema, jax.tree.map(jnp.asarray, nn.meta.unbox(d.frozen)),
                         jnp.asarray(d.spec.tokenize(prompts)))
    np.testing.assert_allclose(states, want, rtol=1e-5, atol=1e-6)
    n = len(d.spec.tokenize(prompts[:1])[0].nonzero()[0])   # BOS, the words, EOS
    assert not np.any(np.asarray(states)[0, n:]) and np.all(np.abs(np.asarray(states)[0, :n]).sum(-1) > 0)
    assert pipe.generate(prompts[:1], steps=2, seed=0)["videos"].shape == (1, 4, 16, 16, 3)

    # the folder is the start (init_from) of a layout run: its transformer and T5 as they are, the patch embedding
    # widened by zero rows for the maps' channels; a transformer of another shape is refused
    from jaxdiff.data.layout import LAYOUT_CHANNELS

    tune = wan_config.get_config("tiny_layout")
    tune.model.vae, tune.model.init_from, tune.data.data_dir = c.model.vae, out, data_dir
    params = nn.meta.unbox(Diffusion(tune, data_spec(tune.data)).init(jax.random.key(5)))
    jax.tree.map(np.testing.assert_array_equal, params["t5"], ema["t5"])
    kernel = params["denoiser"]["patch_embedding"]["kernel"]
    assert kernel.shape[-2] == 4 + LAYOUT_CHANNELS and not np.asarray(kernel[..., 4:, :]).any()
    np.testing.assert_array_equal(kernel[..., :4, :], ema["denoiser"]["patch_embedding"]["kernel"])
    rest = lambda tree: {k: v for k, v in tree.items() if k != "patch_embedding"}
    jax.tree.map(np.testing.assert_array_equal, rest(params["denoiser"]), rest(ema["denoiser"]))
    tune.model.wan.num_layers = 3
    with pytest.raises(ValueError, match="that run's config.model.wan is .*'num_layers': 2.*fine-tuning keeps"):
        Diffusion(tune, data_spec(tune.data))


def test_layout_to_video_wan_reads_each_frame_map_and_exports_with_its_trajectory_model(data_dir, tmp_path):
    """configs/wan.py:tiny_layout: the batches carry each clip's per-frame layout maps, which the transformer reads
    after the latent's channels (4 + LAYOUT_CHANNELS in); the export carries a caption -> trajectory run of the clips'
    frame count as layout/ (a still-layout run is refused), and TextToVideo with `layouts` samples as flow Euler
    driven by hand with every frame's map, pooled to the latent grid, appended to x_t in both guidance halves."""
    from configs import layout as layout_config
    from jaxdiff.data.layout import LAYOUT_CHANNELS, downsampled, trajectory_map
    from jaxdiff.data.render import MovingObject

    c = wan_config.get_config("tiny_layout")
    c.model.vae = wan_config.get_config("shapes").model.vae   # trained frozen parts, for the export
    c.data.data_dir = data_dir
    c.steps, c.checkpoint_every, c.sample_every = 2, 0, 0
    d = Diffusion(c, data_spec(c.data))
    batch = next(shapes_batches(c.data, 2, 0))
    assert batch["layout"].shape == (2, 4, 16, 16, LAYOUT_CHANNELS)
    assert d.net.config.in_channels == 4 + LAYOUT_CHANNELS and d.net.config.video_out_channels == 4
    run = train(c, str(tmp_path / "run"))
    params, frozen = run.state.params, jax.tree.map(jnp.asarray, nn.meta.unbox(d.frozen))
    ctx = d.encode_text(params, frozen, jnp.asarray(batch["tokens"]))
    x, t = jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 4)), jnp.full((2,), 500.0)
    maps = downsampled(jnp.asarray(batch["layout"]), 2)
    np.testing.assert_allclose(d.apply(params, x, t, ctx, layout=maps), d.net.apply(
        {"params": params["denoiser"]}, jnp.concatenate([x, maps], -1), t, ctx), rtol=1e-6, atol=1e-6)

    motion = layout_config.get_config("tiny_motion")
    motion.data.num_frames = 4
    motion.steps, motion.checkpoint_every, motion.eval_examples = 4, 0, 4
    train(motion, str(tmp_path / "motion"))
    os.makedirs(tmp_path / "still")   # the refusal reads the layout run's config only
    with open(tmp_path / "still" / "config.json", "w") as f:
        json.dump(layout_config.get_config("tiny").to_dict(), f)
    with pytest.raises(ValueError, match="draws still layouts; this run reads 4-frame trajectories"):
        export.export_run(run.workdir, str(tmp_path / "bad"), layout=str(tmp_path / "still"))
    out = export.export_run(run.workdir, str(tmp_path / "model"), layout=str(tmp_path / "motion"))
    assert not os.path.exists(tmp_path / "bad")
    pipe = TextToVideo.from_pretrained(out)
    assert pipe.layout_channels == LAYOUT_CHANNELS and not pipe.wan_image_to_video
    assert pipe.layout_model.module.config.num_frames == 4
    prompts = ["a red circle moving right and a blue square moving up"]
    drawn = pipe.layout_model.draw(prompts, seed=3)[0]
    assert all(isinstance(o, MovingObject) for o in drawn)
    assert pipe.generate(prompts, steps=1, seed=3)["videos"].shape == (1, 4, 16, 16, 3)
    layouts = [[{"shape": "circle", "colour": "red", "size": "small", "x": 0.2, "y": 0.3, "direction": "right",
                 "speed": 0.1},
                MovingObject("square", "blue", "small", 0.7, 0.8, "up", 0.05)]]
    got = pipe.generate(prompts, layouts=layouts, steps=3, guidance_scale=3.0, seed=1)
    ema = load_params(run.workdir, "ema")
    maps = jnp.asarray(downsampled(trajectory_map(layouts[0], 4, 16)[None], 2))
    assert not np.array_equal(maps[0, 0], maps[0, 3])
    encode = lambda ids: d.encode_text(ema, frozen, jnp.asarray(ids))
    apply_fn = lambda x, t, ctx: d.net.apply({"params": ema["denoiser"]}, jnp.concatenate(
        [x, jnp.concatenate([maps, maps])], -1), t, ctx)
    model_fn = guidance.cfg(apply_fn, encode(d.spec.tokenize(prompts)), encode(d.spec.tokenize([""])), 3.0)
    want = samplers.sample(model_fn, schedules.flow_matching(1000, shift=wan_config.FLOW_SHIFT),
                           jax.random.normal(jax.random.key(1), (1, 4, 8, 8, 4)), key=jax.random.key(2),
                           method="flow_euler", steps=3, prediction_type="flow")
    np.testing.assert_allclose(got["latents"], want, rtol=1e-5, atol=1e-5)
    for kwargs, message in ((dict(num_frames=8), "draws trajectories of 4 frames; ask for num_frames=4 or pass"),
                            (dict(layouts=[[{**layouts[0][0], "direction": "sideways"}]]),
                             "trajectory direction 'sideways': choose one of: left, right, up, down"),
                            (dict(layouts=[[{"shape": "circle"}]]), "need a MovingObject or a dict with exactly")):
        with pytest.raises(ValueError, match=message):
            pipe.generate(prompts, steps=1, **kwargs)
