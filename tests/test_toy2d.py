"""The 2-D toy end to end: a trained MLP denoiser, DDPM with and without noise re-injection."""
import numpy as np
import pytest
from PIL import Image

import jaxdiff as jd
from jaxdiff import toy2d

MODES = 2.0 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)


@pytest.fixture(scope="module")
def trained():
    schedule = jd.schedules.get("linear")
    data = toy2d.make_dataset("gaussians8", 20000, seed=0)
    model, params, losses = toy2d.train(data, schedule, steps=1500, batch=512, lr=3e-3, seed=0)
    return schedule, model, params, losses


def test_dataset_is_deterministic_and_validated():
    np.testing.assert_array_equal(toy2d.make_dataset("moons", 100, 3), toy2d.make_dataset("moons", 100, 3))
    with pytest.raises(ValueError, match="choose one of: gaussians8, moons, spiral"):
        toy2d.make_dataset("circles", 10)


def test_ddpm_reproduces_the_modes_and_collapses_without_noise(trained):
    schedule, model, params, losses = trained
    assert losses[-100:].mean() < 0.6 * losses[:20].mean()
    x, _ = toy2d.ddpm_samples(model, params, schedule, 2000, 100, seed=1)
    x = np.asarray(x)
    d = np.linalg.norm(x[:, None] - MODES[None], axis=-1)
    near = d.min(1) < 0.5
    assert near.mean() > 0.8
    counts = np.bincount(d.argmin(1)[near], minlength=8) / near.sum()
    assert counts.min() > 0.06 and counts.max() < 0.2, counts  # every mode, none dominant
    collapsed, _ = toy2d.ddpm_samples(model, params, schedule, 2000, 100, seed=1, with_noise=False)
    spread = lambda p: np.sqrt(np.trace(np.cov(np.asarray(p).T)))
    assert spread(collapsed) < 0.7 * spread(x)


def test_cli_writes_png_and_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "toy.png"
    assert toy2d.main(["--train-steps", "30", "--sample-steps", "10", "--samples", "200", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.size[0] > 1000 and img.size[1] > 200
    with pytest.raises(SystemExit):
        toy2d.main(["--out", str(out)])
    assert "exists; pass --overwrite" in capsys.readouterr().err
