"""python -m sample on the tiny diffusers pipeline folder: outputs, metadata and bad input."""
import os

import numpy as np
import pytest
from PIL import Image

from sample.__main__ import main

MODEL = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline_sd")


def run(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_single_prompt_png_with_metadata(tmp_path):
    out = tmp_path / "x.png"
    assert main(["a red circle", "--model", MODEL, "--out", str(out), "--steps", "3", "--seed", "4",
                 "--sampler", "dpmpp_2m"]) == 0
    img = Image.open(out)
    assert img.size == (16, 16) and img.mode == "RGB"
    assert img.text["prompt"] == "a red circle" and img.text["seed"] == "4" and img.text["sampler"] == "dpmpp_2m"
    # the same request through the pipeline gives the same pixels
    from jaxdiff.pipelines import TextToImage
    ref = TextToImage.from_pretrained(MODEL)(["a red circle"], [""], steps=3, seed=4, method="dpmpp_2m")
    np.testing.assert_array_equal(np.asarray(img), np.round(np.asarray(ref[0]) * 255).astype(np.uint8))


def test_prompts_file_writes_numbered_pngs(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle\n")
    out = tmp_path / "imgs"
    assert main(["--prompts-file", str(prompts), "--model", MODEL, "--out", str(out), "--steps", "2",
                 "--batch", "2"]) == 0
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "0002.png"]
    assert Image.open(out / "0002.png").text["prompt"] == "a green triangle"


def test_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    existing = tmp_path / "e.png"
    existing.write_bytes(b"keep me")
    assert "exists" in run(["a", "--model", MODEL, "--out", str(existing)], capsys)
    assert existing.read_bytes() == b"keep me"
    assert "cannot load the model" in run(["a", "--model", str(tmp_path), "--out", str(tmp_path / "o.png")], capsys)
    assert "invalid choice: 'dpm'" in run(["a", "--model", MODEL, "--sampler", "dpm"], capsys)
    assert "--steps must be >= 1" in run(["a", "--model", MODEL, "--steps", "0"], capsys)
    assert "cannot write to folder" in run(["a", "--model", MODEL, "--out", "/proc/nope/x.png"], capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "holds no prompts" in run(["--prompts-file", str(empty), "--model", MODEL, "--out", str(tmp_path)],
                                     capsys)
    assert "the prompt is empty" in run(["  ", "--model", MODEL], capsys)


def test_default_model_is_the_shipped_one(tmp_path, capsys, monkeypatch):
    import jaxdiff.pipelines

    monkeypatch.setattr(jaxdiff.pipelines, "SHAPES_MODEL", str(tmp_path / "absent"))
    monkeypatch.setattr(jaxdiff.pipelines, "SHAPES_VIDEO_MODEL", str(tmp_path / "absent_video"))
    assert "shipped shapes model is missing" in run(["a red circle", "--out", str(tmp_path / "o.png")], capsys)
    assert "shipped shapes video model is missing" in run(["--video", "a red circle moving left", "--out",
                                                           str(tmp_path / "o.gif")], capsys)
    monkeypatch.setattr(jaxdiff.pipelines, "SHAPES_MODEL", MODEL)
    out = tmp_path / "o.png"
    assert main(["a red circle", "--out", str(out), "--steps", "2"]) == 0
    assert Image.open(out).text["model"] == os.path.abspath(MODEL)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:8]).save(d / "small_mask.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8)).save(d / "rgba.png")
    return d


@pytest.mark.parametrize("mode,extra,size", [
    ("img2img", ["--strength", "0.5"], (16, 16)),
    ("inpaint", ["--mask", "MASK"], (16, 16)),
    ("outpaint", ["--outpaint", "0,4,4,4"], (24, 20)),
    ("edit", ["--edit", "a blue circle"], (16, 16)),
])
def test_editing_modes(rgb, tmp_path, mode, extra, size):
    out = tmp_path / f"{mode}.png"
    extra = [str(rgb / "mask.png") if e == "MASK" else e for e in extra]
    assert main(["a red circle", "--model", MODEL, "--init-image", str(rgb / "in.png"), "--out", str(out),
                 "--steps", "3", *extra]) == 0
    img = Image.open(out)
    assert img.size == size and img.text["mode"] == mode
    original = np.asarray(Image.open(rgb / "in.png"))
    if mode == "inpaint":  # the kept (black) half is the input, pixel for pixel
        np.testing.assert_array_equal(np.asarray(img)[:, 8:], original[:, 8:])
    if mode == "outpaint":
        np.testing.assert_array_equal(np.asarray(img)[0:16, 4:20], original)


def test_grid_and_trajectory(tmp_path):
    grid = tmp_path / "grid.png"
    assert main(["a red circle", "--model", MODEL, "--out", str(grid), "--steps", "2", "--grid-seeds", "2",
                 "--grid-guidance", "1,4,7"]) == 0
    assert Image.open(grid).size == (3 * 16 + 2 * 2, 2 * 16 + 2)
    strip = tmp_path / "strip.png"
    assert main(["a red circle", "--model", MODEL, "--out", str(strip), "--steps", "4", "--trajectory"]) == 0
    assert Image.open(strip).size == (4 * 16 + 3 * 2, 2 * 16 + 2)


def test_bad_images_and_masks(rgb, tmp_path, capsys):
    base = ["a", "--model", MODEL, "--out", str(tmp_path / "o.png"), "--init-image"]
    assert "has mode RGBA" in run([*base, str(rgb / "rgba.png")], capsys)
    assert "--mask is 16x8 but --init-image is 16x16" in run([*base, str(rgb / "in.png"), "--mask",
                                                             str(rgb / "small_mask.png")], capsys)
    assert "cannot read --init-image" in run([*base, str(tmp_path / "missing.png")], capsys)
    assert "--mask needs --init-image" in run(["a", "--model", MODEL, "--mask", str(rgb / "mask.png")], capsys)
    assert "--outpaint needs 4 non-negative multiples of 4" in run([*base, str(rgb / "in.png"), "--outpaint",
                                                                   "1,2,2,2"], capsys)


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    """A whole text-to-video folder: pipeline_t2v's UNet3D and scheduler with pipeline_sd's other parts."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("t2v")
    t2v = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers_video", "pipeline_t2v")
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(os.path.join(MODEL, part), folder / part)
    for part in ("unet", "scheduler"):
        shutil.copytree(os.path.join(t2v, part), folder / part)
    index = json.load(open(os.path.join(MODEL, "model_index.json")))
    index.update(_class_name="TextToVideoSDPipeline", unet=["diffusers", "UNet3DConditionModel"])
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def test_video_gif_and_prompts_file(tmp_path, video_model):
    VIDEO_MODEL = video_model
    from jaxdiff.video_io import read_video

    out = tmp_path / "clip.gif"
    assert main(["--video", "a red circle moving left", "--model", VIDEO_MODEL, "--out", str(out), "--frames", "3",
                 "--steps", "2", "--progress"]) == 0
    assert read_video(out).shape == (3, 16, 16, 3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    folder = tmp_path / "vids"
    assert main(["--video", "--prompts-file", str(prompts), "--model", VIDEO_MODEL, "--out", str(folder),
                 "--frames", "3", "--steps", "2"]) == 0
    assert sorted(os.listdir(folder)) == ["0000.gif", "0001.gif"]


def test_video_bad_input(tmp_path, capsys, video_model):
    VIDEO_MODEL = video_model
    assert "must end in .gif or .mp4" in run(["--video", "a", "--model", VIDEO_MODEL, "--out",
                                               str(tmp_path / "x.png")], capsys)
    assert "cannot load a video model" in run(["--video", "a", "--model", MODEL, "--out",
                                                str(tmp_path / "x.gif")], capsys)
    assert "--frames must be >= 1" in run(["--video", "a", "--model", VIDEO_MODEL, "--frames", "0"], capsys)



def test_video_wan_folder(tmp_path):
    """A diffusers WanPipeline folder through --video (its numbers: tests/test_pipeline_wan.py): one frame, which
    the causal VAE codes alone."""
    from jaxdiff.video_io import read_video

    wan = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline_wan")
    out = tmp_path / "wan.gif"
    assert main(["--video", "a red circle moving left", "--model", wan, "--out", str(out), "--frames", "1",
                 "--height", "32", "--width", "48", "--steps", "2"]) == 0
    assert read_video(out).shape == (1, 32, 48, 3)
