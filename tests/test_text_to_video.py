"""TextToVideo against diffusers' TextToVideoSDPipeline (golden files), image-to-video keeping the
first frame, no recompiles for new prompts / seeds / scales, and video files (GIF, MP4)."""
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.models import inflate
from scripts.sharded_generate import video_pipe
from jaxdiff.video_io import read_video, write_video

FIXTURES = Path(__file__).parent / "fixtures"
T2V = FIXTURES / "diffusers_video" / "pipeline_t2v"


@pytest.fixture(scope="module")
def sd():
    return jd.convert.load_pipeline(str(FIXTURES / "pipeline_sd"))


def test_videos_sharded_over_the_data_axis_match_one_device(sd, tmp_path):
    from scripts.sharded_generate import PROMPTS, VIDEO_REQUEST, first_frames, run_on_8_devices

    sharded = run_on_8_devices("video", tmp_path)
    single = video_pipe(sd).generate(PROMPTS, init_image=first_frames(), **VIDEO_REQUEST)["videos"]
    assert sharded.shape == (8, 3, 16, 16, 3)
    np.testing.assert_allclose(sharded, single, atol=2e-6)


def test_matches_diffusers_pipeline_and_does_not_recompile(sd):
    golden = np.load(T2V / "outputs.npz")
    case = json.loads(str(golden["meta"]))
    pipe = video_pipe(sd)
    videos, latents = pipe(case["prompts"], case["negative"], num_frames=case["frames"], steps=case["steps"],
                           guidance_scale=case["guidance_scale"], noise=jnp.asarray(golden["latents_nthwc"]),
                           return_latents=True)
    rel = np.linalg.norm(np.asarray(latents) - golden["final_latents_nthwc"]) / np.linalg.norm(
        golden["final_latents_nthwc"])
    print(f"text-to-video final latents vs diffusers: relative error {rel:.1e}")
    assert rel <= 1e-4
    assert videos.shape == golden["video"].shape == (2, 4, 16, 16, 3)
    np.testing.assert_allclose(videos, golden["video"], atol=1e-4)
    # New prompts, seed and guidance scale run the same compiled program.
    other = pipe(["two green triangles", "a red circle"], num_frames=4, steps=case["steps"], guidance_scale=2.0,
                 seed=3)
    programs = list(pipe.runner.programs.values())
    assert len(programs) == 1 and programs[0].cache_size() == 1
    assert not np.allclose(other, videos)


def test_image_to_video_keeps_the_first_frame(sd):
    # An image U-Net inflated into a video U-Net with image-conditioning channels (the route from the
    # shipped image model); its conditioning weights start at zero, so the first frame is kept by the
    # per-step frame-0 blend alone.
    unet, params = inflate(sd.denoiser, sd.denoiser_params, jax.random.key(0), conditioning_frame_channels=5)
    pipe = video_pipe(sd, unet, params)
    image = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    videos = pipe(["a red circle moving left", "a blue square"], init_image=image, num_frames=3, steps=4,
                  guidance_scale=4.0, seed=0)
    round_trip = pipe.decode(sd.vae_params, pipe.encode_image(sd.vae_params, image))
    err = float(jnp.max(jnp.abs(videos[:, 0] - round_trip)))
    print(f"image-to-video: max |frame 0 - VAE round trip of the image| = {err:.1e}")
    assert err <= 1e-5
    assert float(jnp.max(jnp.abs(videos[:, 1] - round_trip))) > 1e-2   # the other frames are generated


def test_frame_correlated_noise_is_the_starting_noise_and_the_step_noise(sd):
    """frame_noise_correlation (the pipeline's default or per call): the initial latents are
    frame_correlated_noise of the seed's key, and the stochastic samplers draw their steps with it."""
    pipe = video_pipe(sd)
    request = dict(num_frames=3, steps=3, guidance_scale=4.0, seed=2)
    shape = pipe.video_latent_shape(2, 3, 16, 16)
    given = jd.diffusion.frame_correlated_noise(jax.random.key(2), shape, 0.6)
    prompts = ["a red circle moving left", "a blue square"]
    want = pipe(prompts, noise=given, **request)
    np.testing.assert_allclose(pipe(prompts, frame_noise_correlation=0.6, **request), want, atol=1e-6)
    pipe.frame_noise_correlation = 0.6    # as from_pretrained sets it from the folder's training.json
    np.testing.assert_allclose(pipe(prompts, **request), want, atol=1e-6)
    assert not np.allclose(pipe(prompts, frame_noise_correlation=0.0, **request), want, atol=1e-3)
    # a stochastic sampler: the same starting noise, different step noise
    ancestral = dict(request, method="euler_ancestral")
    assert not np.allclose(pipe(prompts, noise=given, **ancestral),
                           pipe(prompts, noise=given, frame_noise_correlation=0.0, **ancestral), atol=1e-3)
    with pytest.raises(ValueError, match=r"frame_noise_correlation must be in \[0, 1\), got 1.5"):
        pipe(prompts, frame_noise_correlation=1.5)


def test_bad_requests(sd):
    pipe = video_pipe(sd)
    with pytest.raises(ValueError, match="no prompts given"):
        pipe([])
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        pipe(["a"], num_frames=0)
    with pytest.raises(ValueError, match=r"init_image has shape \(1, 8, 8, 3\), expected \(1, 16, 16, 3\)"):
        pipe(["a"], init_image=np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"noise has shape \(1, 4, 8, 8, 4\), expected \(1, 2, 8, 8, 4\)"):
        pipe(["a"], num_frames=2, noise=jnp.zeros((1, 4, 8, 8, 4)))


def test_gif_round_trip_keeps_every_frame(tmp_path):
    assert jd.video_io.write_video is write_video      # reachable from the package, as jd.video_io
    frames = np.zeros((5, 9, 12, 3), np.uint8)
    for t in range(5):
        frames[t, 2:6, 2 * t:2 * t + 4] = (255, 40, 0)
    frames[3] = frames[2]                       # Pillow merges identical frames; reading undoes it
    path = write_video(tmp_path / "v.gif", frames, fps=10)
    np.testing.assert_array_equal(read_video(path), frames)
    np.testing.assert_array_equal(read_video(write_video(tmp_path / "f.gif", frames / 255.0, fps=10)), frames)
    assert sorted(os.listdir(tmp_path)) == ["f.gif", "v.gif"]   # no temporary files left


def test_mp4_round_trip(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    frames = np.zeros((6, 15, 16, 3), np.uint8)
    for t in range(6):
        frames[t, 4:10, t:t + 6] = (220, 30, 30)
    back = read_video(write_video(tmp_path / "v.mp4", frames, fps=8))
    assert back.shape == (6, 16, 16, 3)         # odd height padded for yuv420p
    assert np.abs(back[:, :15].astype(int) - frames).mean() < 8   # lossy H.264


def test_video_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown video extension '.avi'.*choose one of: .gif, .mp4"):
        write_video(tmp_path / "v.avi", np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"must be \[T, H, W, 3\]"):
        write_video(tmp_path / "v.gif", np.zeros((2, 4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="fps must be positive"):
        write_video(tmp_path / "v.gif", np.zeros((2, 4, 4, 3), np.uint8), fps=0)
    assert not os.listdir(tmp_path)
