"""Every failure of `python -m sample` and `python -m jaxdiff.pipelines.shapes_eval` is one line on stderr
naming the bad value, a non-zero exit and no traceback (unless --debug / JAXDIFF_DEBUG=1), and writes nothing.

One real command per failure class, run as subprocesses (a few at a time); variants of a class run the
same `main` in-process through `cli.run`.
"""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from jaxdiff import cli
from jaxdiff.convert.common import write_checksums
from sample.__main__ import PROG, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests", "fixtures", "pipeline_sd")
UNET_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def model_copy(root, name: str, change) -> str:
    """A copy of the tiny pipeline folder whose U-Net tensors go through change(tensors, folder)."""
    folder = str(root / name)
    shutil.copytree(MODEL, folder)
    tensors = load_file(os.path.join(folder, UNET_WEIGHTS))
    change({k: v.copy() for k, v in tensors.items()}, folder)
    return folder


def with_nan(tensors, folder):
    tensors["conv_in.weight"].flat[0] = np.nan
    save_file(tensors, os.path.join(folder, UNET_WEIGHTS))


def with_huge_output(tensors, folder):
    """Finite weights whose output overflows: the batch comes out NaN/inf."""
    tensors["conv_out.weight"][:] = 3e38
    save_file(tensors, os.path.join(folder, UNET_WEIGHTS))


def with_stale_checksum(tensors, folder):
    write_checksums(folder)
    tensors["conv_in.bias"][0] += 1.0
    save_file(tensors, os.path.join(folder, UNET_WEIGHTS))


def with_escaping_index(tensors, folder):
    """unet/'s weights moved two levels up, named by a sharded index as '../../elsewhere.safetensors'."""
    os.remove(os.path.join(folder, UNET_WEIGHTS))
    save_file(tensors, os.path.join(folder, "unet", "..", "..", "elsewhere.safetensors"))
    index = {"metadata": {}, "weight_map": {k: "../../elsewhere.safetensors" for k in tensors}}
    with open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad") / "inputs"
    d.mkdir()
    (d / "latin1.txt").write_bytes("a red circle\nun cercle rouge à gauche\n".encode("latin-1"))
    (d / "nul.txt").write_bytes(b"a red circle\x00\x01\x02\n")
    (d / "three.txt").write_text("a\nb\nc\n")
    Image.new("RGB", (1000, 1000)).save(d / "big.png")
    Image.new("RGB", (16, 16)).save(d / "small.png")
    root = d.parent
    return {"dir": d, **{name: model_copy(root, name, change) for name, change in (
        ("nan", with_nan), ("huge", with_huge_output), ("stale", with_stale_checksum),
        ("escaping", with_escaping_index))}}


def command(args, env=None):
    """Runs a command line; returns (exit status, stderr)."""
    env = {**{k: v for k, v in os.environ.items() if k != "JAXDIFF_DEBUG"}, "JAX_PLATFORMS": "cpu", **(env or {})}
    p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stderr


def assert_one_line(status, err, expected, want_status=2):
    assert status == want_status, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expected in err, err


def test_each_failure_class_is_one_line(files, tmp_path):
    d, out = files["dir"], str(tmp_path / "o.png")
    sample = ["sample", "a red circle", "--model", MODEL, "--out", out]
    cases = [  # (command, what stderr names, exit status)
        (sample + ["--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'", 2),
        (sample + ["--seed", str(2**32)], "--seed must be an integer in 0..4294967295, got 4294967296", 2),
        (["sample", "--prompts-file", str(d / "latin1.txt"), "--model", MODEL, "--out", str(tmp_path / "p")],
         "is not UTF-8 text (byte 0xe0 at offset 29); save it as UTF-8", 2),
        (sample[:-1] + ["/proc/o.png"], "cannot write to folder '/proc'", 2),
        (sample + ["--init-image", str(d / "big.png")],
         "--init-image is 1000x1000; this model takes positive multiples of 4", 2),
        (sample[:3] + [files["nan"]] + sample[4:], "unet/: checkpoint does not fit the module (1 problems): "
                                                    "tensor 'conv_in.weight' holds NaN or inf", 2),
        (sample[:3] + [files["huge"]] + sample[4:] + ["--steps", "1"],
         "the generated batch holds NaN or inf (1 of 1 examples), so nothing is returned", 2),
        (sample[:3] + [files["escaping"]] + sample[4:],
         "unet/: diffusion_pytorch_model.safetensors.index.json's weight_map names '../../elsewhere.safetensors', "
         "which is outside the folder", 2),
        (["jaxdiff.pipelines.shapes_eval", "--write_prompts", "/proc/none/p.txt"],
         "cannot write --write_prompts '/proc/none/p.txt'", 2),
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: command(case[0]), cases))
    for (args, expected, status), (got_status, err) in zip(cases, results):
        assert_one_line(got_status, err, expected, status)
    assert not os.listdir(tmp_path)  # nothing written, not even the NaN batch


def test_debug_shows_the_traceback(tmp_path, capsys):
    status, err = command(["sample", "--prompts-file", str(tmp_path / "absent.txt"), "--out", str(tmp_path)],
                          {"JAXDIFF_DEBUG": "1"})
    assert status == 1 and "Traceback" in err and "FileNotFoundError" in err, err
    with pytest.raises(FileNotFoundError):
        cli.run(main, ["--prompts-file", str(tmp_path / "absent.txt"), "--out", str(tmp_path), "--debug"], prog=PROG)


@pytest.mark.parametrize("args,expected", [
    (["--guidance", "inf"], "argument --guidance: must be a finite number, got 'inf'"),
    (["--guidance=-inf"], "argument --guidance: must be a finite number, got '-inf'"),
    (["--guidance", "seven"], "argument --guidance: must be a number, got 'seven'"),
    (["--guidance-rescale", "nan"], "argument --guidance-rescale: must be a finite number, got 'nan'"),
    (["--strength", "nan", "--init-image", "SMALL"], "argument --strength: must be a finite number, got 'nan'"),
    (["--grid-seeds", "2", "--grid-guidance", "1,nan"], "--grid-guidance must be comma-separated finite numbers"),
    (["--seed", "-1"], "--seed must be an integer in 0..4294967295, got -1"),
    (["--seed", str(2**64)], "--seed must be an integer in 0..4294967295, got 18446744073709551616"),
    (["--seed", "4294967295", "--grid-seeds", "2", "--grid-guidance", "1"],
     "--seed must be an integer in 0..4294967294 (this run also uses --seed + 1 .. --seed + 1), got 4294967295"),
    (["--height", "0"], "--height must be >= 1, got 0"),
    (["--out", "MISSING/o.png"], "missing': it does not exist (or is not a folder)"),
    (["--model", "STALE"], "'unet/diffusion_pytorch_model.safetensors' in 'STALE' does not match the sha256 recorded"),
])
def test_variants_in_process(files, tmp_path, capsys, args, expected):
    names = {"SMALL": str(files["dir"] / "small.png"), "MISSING": str(tmp_path / "missing"), "STALE": files["stale"]}

    def fill(text):
        for placeholder, value in names.items():
            text = text.replace(placeholder, value)
        return text

    with pytest.raises(SystemExit) as e:
        cli.run(main, ["a red circle", "--model", MODEL, "--out", str(tmp_path / "o.png"), *map(fill, args)], prog=PROG)
    assert_one_line(e.value.code, capsys.readouterr().err, fill(expected))


@pytest.mark.parametrize("name,args,expected", [
    ("nul.txt", [], "holds NUL bytes: a binary file"),
    ("three.txt", ["--seed", "4294967294", "--batch", "2"],
     "--seed must be an integer in 0..4294967293 (this run also uses --seed + 1 .. --seed + 2)"),
    ("three.txt", ["--out", "/proc/images"], "cannot create folder --out '/proc/images'"),
])
def test_prompts_file_variants(files, tmp_path, capsys, name, args, expected):
    with pytest.raises(SystemExit) as e:
        cli.run(main, ["--prompts-file", str(files["dir"] / name), "--model", MODEL, "--out", str(tmp_path / "p"),
                       *args], prog=PROG)
    assert_one_line(e.value.code, capsys.readouterr().err, expected)


def test_unexpected_failure_is_one_line_exit_1(capsys, monkeypatch):
    def broken(argv):
        raise RuntimeError("the device went away\nand more detail")

    monkeypatch.delenv("JAXDIFF_DEBUG", raising=False)
    assert cli.run(broken, [], prog="tool") == 1
    assert capsys.readouterr().err == ("tool: error: RuntimeError: the device went away; and more detail (rerun with "
                                       "--debug for the traceback)\n")
    with pytest.raises(RuntimeError):
        cli.run(broken, ["--debug"], prog="tool")


@pytest.mark.parametrize("args,expected", [
    (["--guidance", "inf"], "argument --guidance: must be a finite number, got 'inf'"),
    (["--guidance_rescale", "nan"], "argument --guidance_rescale: must be a finite number, got 'nan'"),
    (["--seed", "-5"], "--seed must be an integer in 0..4294967295, got -5"),
])
def test_shapes_eval_variants_in_process(capsys, args, expected):
    from jaxdiff.pipelines import shapes_eval

    with pytest.raises(SystemExit) as e:
        cli.run(shapes_eval.main, ["--model", MODEL, *args], prog=shapes_eval.PROG)
    assert_one_line(e.value.code, capsys.readouterr().err, expected)
