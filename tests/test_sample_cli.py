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
    empty.write_text("\n")
    assert "holds no prompts" in run(["--prompts-file", str(empty), "--model", MODEL, "--out", str(tmp_path)],
                                     capsys)
    assert "the prompt is empty" in run(["  ", "--model", MODEL], capsys)
