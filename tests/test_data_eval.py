"""ShapesEval: the analyser agrees with the renderer, is near chance on shuffled pairs,
tolerates imperfect images, tracks motion, and its command (`jaxdiff.pipelines.shapes_eval`) prints a
per-family table."""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import jaxdiff.data.pipeline  # noqa: F401  registers the builders
from jaxdiff.data import eval as ev
from jaxdiff.data import render
from jaxdiff.pipelines import shapes_eval
from tfds_fixtures import prepare_tfds

PER_FAMILY = 40
SHAPES = f"shapes/64px-8-4-{4 * PER_FAMILY}-seed0"  # the test split holds 40 per family
VIDEOS = "moving_shapes/64px-16f-4-2-40-seed0"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tfds(tmp_path_factory, SHAPES, VIDEOS)


@pytest.fixture(scope="module")
def test_split(data_dir):
    ds = tfds.data_source(SHAPES, data_dir=data_dir, split="test")
    records = list(ds)
    return [r["caption"].decode() for r in records], [r["image"] for r in records]


def test_own_test_images_score_at_least_99_percent_per_family(test_split):
    captions, images = test_split
    result = ev.evaluate(captions, images)
    assert list(result["count"].items()) == [(f, PER_FAMILY) for f in render.FAMILIES]
    for family in render.FAMILIES:
        assert result[family] >= 0.99, (family, result)


def test_shuffled_pairs_near_chance(test_split):
    captions, images = test_split
    perm = np.random.default_rng(0).permutation(len(captions))
    result = ev.evaluate([captions[i] for i in perm], images)
    # Chance: a random colour-shape binding matches 1 in 18; relation and attribution
    # need two bindings (and the relation) at once.
    assert result["overall"] <= 0.1, result
    assert result["relation"] <= 0.05 and result["attribution"] <= 0.05


def test_detections_match_the_scene():
    for i in range(40):
        scene = render.scene_at(3, 0, i)
        found = ev.analyse(render.render(scene.objects, 64))
        assert sorted((d.colour, d.shape, d.size) for d in found) == sorted(
            (o.colour, o.shape, o.size) for o in scene.objects)
        for o in scene.objects:
            d = min(found, key=lambda d: abs(d.x - o.x) + abs(d.y - o.y))
            assert abs(d.x - o.x) <= 1 / 64 and abs(d.y - o.y) <= 1 / 64


def test_each_requirement_is_checked():
    red_left = render.SceneObject("circle", "red", "small", 0.2, 0.5)
    blue_right = render.SceneObject("square", "blue", "large", 0.75, 0.5)
    image = render.render([red_left, blue_right])
    assert ev.score("a red circle", image)
    assert ev.score("a small red circle on the left", image)
    assert not ev.score("a large red circle", image)  # size
    assert not ev.score("a red circle on the right", image)  # place
    assert not ev.score("a red square", image)  # shape
    assert not ev.score("a green circle", image)  # colour
    assert ev.score("a red circle to the left of a blue square", image)
    assert not ev.score("a red circle to the right of a blue square", image)
    assert not ev.score("a red circle above a blue square", image)  # wrong axis
    assert ev.score("a blue square and a red circle", image)
    assert not ev.score("a blue circle and a red square", image)  # swapped bindings
    assert not ev.score("two red circles", image)
    three = render.render([render.SceneObject("triangle", "green", "small", x, 0.5) for x in (0.15, 0.5, 0.85)])
    assert ev.score("three green triangles", three)
    assert not ev.score("two green triangles", three) and not ev.score("four green triangles", three)


def test_tolerates_noise_and_specks():
    rng = np.random.default_rng(0)
    scenes = [render.scene_at(0, 2, i) for i in range(80)]
    noisy = []
    for s in scenes:
        image = render.render(s.objects).astype(np.float64) + rng.normal(0, 15, (64, 64, 3))
        image[rng.integers(64, size=5), rng.integers(64, size=5)] = render.PALETTE["red"]  # specks
        noisy.append(np.clip(image, 0, 255).astype(np.uint8))
    assert ev.evaluate([s.caption for s in scenes], noisy)["overall"] >= 0.97


def test_parse_prompt_errors_name_the_grammar():
    req = ev.parse_prompt("A  large Red circle at the top")
    assert req.objects[0] == ev.ObjectSpec("circle", "red", "large", "at the top")
    assert ev.parse_prompt("four cyan squares").count == 4
    with pytest.raises(ValueError, match="not in the ShapesEval grammar; families: single"):
        ev.parse_prompt("a photo of a cat")


def test_video_analyser_recovers_direction(data_dir):
    ds = tfds.data_source(VIDEOS, data_dir=data_dir, split="test")
    flip = {"left": "right", "right": "left", "up": "down", "down": "up"}
    hits = wrong = 0
    for r in ds:
        caption, video = r["caption"].decode(), r["image"]
        assert ev.constant_objects(video)
        hits += ev.score_video(caption, video)
        flipped = " ".join(flip.get(w, w) for w in caption.split())
        wrong += ev.score_video(flipped, video)
        # Reversed in time, the same clip shows the opposite motion.
        assert ev.score_video(flipped, video[::-1]) == ev.score_video(caption, video)
    assert hits == len(ds) and wrong == 0
    # Identity: an object that changes shape mid-clip is not tracked.
    obj = render.MovingObject("circle", "red", "small", 0.2, 0.5, "right", 2 / 64)
    video = render.render_video([obj], 16)
    video[8:] = render.render_video([render.MovingObject("square", "red", "small", 0.2, 0.5, "right", 2 / 64)], 16)[8:]
    assert ev.score_video("a red circle moving right", render.render_video([obj], 16))
    assert not ev.score_video("a red circle moving right", video)
    assert not ev.constant_objects(video)
    # Colour and shape constancy reads the video alone: a recoloured half, or nothing, is not constant.
    recoloured = render.render_video([obj], 16)
    recoloured[8:] = render.render_video([render.MovingObject("circle", "blue", "small", 0.2, 0.5, "right", 2 / 64)],
                                         16)[8:]
    assert not ev.constant_objects(recoloured)
    assert not ev.constant_objects(np.zeros_like(video))
    assert ev.constant_objects(render.render_video([obj], 16)[::-1])


def test_heldout_prompts_are_the_test_split_captions(test_split):
    captions, _ = test_split
    prompts = ev.heldout_prompts(PER_FAMILY)
    assert prompts == ev.heldout_prompts(PER_FAMILY)  # fixed
    assert sorted(prompts) == sorted(captions)
    assert [ev.parse_prompt(p).family for p in prompts[:4]] == list(render.FAMILIES)


def test_heldout_video_prompts_are_the_test_split_captions_of_that_many_frames(data_dir, tmp_path, capsys):
    records = tfds.data_source(VIDEOS, data_dir=data_dir, split="test")
    captions = sorted(r["caption"].decode() for r in records)
    assert sorted(ev.heldout_video_prompts(40, num_frames=16)) == captions
    assert sorted(ev.heldout_video_prompts(40, num_frames=4)) != captions   # speeds and placements depend on T
    prompts = tmp_path / "videos.txt"
    assert shapes_eval.main(["--write_prompts", str(prompts), "--videos", "--frames", "4", "--per_family", "5"]) == 0
    assert prompts.read_text().splitlines() == ev.heldout_video_prompts(5, num_frames=4)
    with pytest.raises(SystemExit):
        shapes_eval.main(["--write_prompts", str(prompts), "--frames", "4"])
    assert "--frames goes with --videos" in capsys.readouterr().err


def test_default_frames_from_a_model_folder(tmp_path):
    """Video frames for `--model --videos`: the run's moving_shapes data name, else model.num_frames;
    the frame noise correlation the run trained with."""
    from jaxdiff.pipelines.latent import training_config
    from jaxdiff.pipelines.text_to_video import (DEFAULT_FRAMES, default_frames, trained_frames,
                                                  trained_noise_correlation)

    def folder(name, config):   # a model folder with this training.json config, read back as the loader reads it
        (tmp_path / name).mkdir()
        if config is not None:
            (tmp_path / name / "training.json").write_text(json.dumps({"diffusion": {"step": 1, "config": config}}))
        return training_config(str(tmp_path / name))

    model = {"backbone": "temporal_unet", "num_frames": 6}
    assert trained_frames(folder("data", {"data": {"name": "moving_shapes/32px-8f"}, "model": model})) == 8
    assert trained_frames(folder("preview", {"data": {"name": "shapes/32px"}, "model": model})) == 6
    assert trained_frames(folder("image", {"data": {"name": "shapes/32px"}, "model": {}})) is None
    assert trained_frames(folder("bare", None)) is None
    assert default_frames(str(tmp_path / "preview")) == 6 and default_frames(str(tmp_path / "bare")) == DEFAULT_FRAMES
    assert trained_noise_correlation(folder("pyoco", {"model": {**model, "frame_noise_correlation": 0.8}})) == 0.8
    bare = training_config(str(tmp_path / "bare"))
    assert trained_noise_correlation(training_config(str(tmp_path / "image"))) == trained_noise_correlation(bare) == 0


def test_evaluate_model_with_an_oracle_and_a_constant_generator():
    def oracle(prompts):
        lookup = {render.scene_at(0, 2, i).caption: render.scene_at(0, 2, i) for i in range(40)}
        return np.stack([render.render(lookup[p].objects) for p in prompts])

    assert ev.evaluate_model(oracle, per_family=10, batch_size=7)["overall"] == 1.0
    blank = ev.evaluate_model(lambda ps: np.full((len(ps), 64, 64, 3), 0.92, np.float32), per_family=10)
    assert blank["overall"] == 0.0


def test_command_on_a_folder(tmp_path, capsys):
    scenes = [render.scene_at(0, 2, i) for i in range(8)]
    # Half the prompts in PNG metadata (as `python -m sample` writes), half in sidecars.
    for i, s in enumerate(scenes):
        path = tmp_path / f"{i:04d}.png"
        if i % 2:
            info = PngInfo()
            info.add_text("prompt", s.caption)
            Image.fromarray(render.render(s.objects)).save(path, pnginfo=info)
        else:
            Image.fromarray(render.render(scenes[(i + 2) % 8].objects)).save(path)  # a wrong image
            (tmp_path / f"{i:04d}.txt").write_text(s.caption)
    assert shapes_eval.main(["--images", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| family | n | accuracy |" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["count"] == {"single": 2, "relation": 2, "counting": 2, "attribution": 2}
    assert result["overall"] == pytest.approx(0.5)
    prompts = tmp_path / "prompts.txt"
    assert shapes_eval.main(["--write_prompts", str(prompts), "--per_family", "3"]) == 0
    assert prompts.read_text().splitlines() == ev.heldout_prompts(3)
    # Videos as .npy with a prompts.txt, one line per file in sorted order.
    videos = tmp_path / "videos"
    videos.mkdir()
    clips = [render.motion_at(0, 2, i, 8) for i in range(2)]
    for i, clip in enumerate(clips):
        np.save(videos / f"{i}.npy", render.render_video(clip.objects, 8, 64))
    (videos / "prompts.txt").write_text("\n".join(c.caption for c in clips) + "\n")
    assert shapes_eval.main(["--images", str(videos)]) == 0
    out = capsys.readouterr().out
    assert "| constant colour and shape (videos) | 2 | 1.000 |" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["motion"] == 1.0 and result["constant"] == 1.0
    with pytest.raises(SystemExit):
        shapes_eval.main(["--images", str(tmp_path / "missing")])
    assert "no folder" in capsys.readouterr().err


def test_the_analyser_does_not_depend_on_the_pipelines():
    """Layering: jaxdiff.data.eval imports no pipeline (the command that generates lives in jaxdiff.pipelines)."""
    import subprocess
    import sys

    code = ("import sys, jaxdiff.data.eval; "
            "print(sorted(m for m in sys.modules if m.startswith(('jaxdiff.pipelines', 'jaxdiff.models'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_evaluates_a_model_folder(capsys):
    """--model generates the held-out prompts with the model and scores them (a random tiny model: ~0)."""
    import os

    model = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline_sd")
    assert shapes_eval.main(["--model", model, "--per_family", "1", "--steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(result["count"].values()) == 4 and 0.0 <= result["overall"] <= 0.25


def test_guidance_rescale_reaches_the_pipeline(capsys):
    """--guidance_rescale: model_generator's images are the pipeline's with that rescale (and differ from
    rescale 0), by default with the folder's sampler and guidance, else the chosen ones; rescales outside [0, 1]
    are refused by name."""
    import os

    from jaxdiff.pipelines import TextToImage

    model = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline_sd")
    prompts = ["a red circle"]
    images = shapes_eval.model_generator(model, steps=2, guidance_rescale=0.7)(prompts)
    pipe = TextToImage.from_pretrained(model)
    direct = pipe(prompts, steps=2, guidance_rescale=0.7, seed=0)          # the folder's sampler and guidance
    np.testing.assert_array_equal(np.asarray(images), np.asarray(direct))
    plain = pipe(prompts, steps=2, seed=0)
    assert np.abs(np.asarray(plain) - np.asarray(direct)).max() > 1e-4
    chosen = shapes_eval.model_generator(model, steps=2, guidance_scale=3.0, method="euler")(prompts)
    np.testing.assert_array_equal(np.asarray(chosen), np.asarray(pipe(prompts, steps=2, guidance_scale=3.0, seed=0,
                                                                     method="euler")))
    assert np.abs(np.asarray(chosen) - np.asarray(plain)).max() > 1e-4
    with pytest.raises(SystemExit):
        shapes_eval.main(["--model", model, "--guidance_rescale", "1.5"])
    assert "--guidance_rescale=1.5: must be in [0, 1]" in capsys.readouterr().err
