"""The Python API refuses non-finite scalars, out-of-range seeds and oversized images before any work,
and a generated batch that holds NaN or inf is an error, not images."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.pipelines import TextToImage, edit, img2img, inpaint, invert, outpaint
from jaxdiff.pipelines.runner import NonFiniteOutputError

MODEL = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline_sd")
NAN, INF = float("nan"), float("inf")
IMG = np.full((16, 16, 3), 0.5, np.float32)


@pytest.fixture(scope="module")
def pipe():
    return TextToImage.from_pretrained(MODEL)


@pytest.mark.parametrize("kwargs,match", [
    ({"guidance_scale": NAN}, "guidance_scale must be a finite number, got nan"),
    ({"guidance_scale": INF}, "guidance_scale must be a finite number, got inf"),
    ({"guidance_rescale": NAN}, r"guidance_rescale must be in \[0, 1\], got nan"),
    ({"seed": -1}, r"seed must be an integer in 0..4294967295, got -1"),
    ({"seed": 2**32}, r"seed must be an integer in 0..4294967295, got 4294967296"),
    ({"seed": 1.5}, r"seed must be an integer"),
    ({"height": 1000, "width": 1000}, r"height x width is 1000x1000; this model takes positive multiples of 4 .* "
                                      r"up to 32x32 \(2x its working size 16\)"),
    ({"strength": NAN, "init_latents": jnp.zeros((1, 2, 2, 4))}, r"strength must be in \[0, 1\], got nan"),
    ({"eta": NAN}, "eta must be a finite number, got nan"),
])
def test_generate_refuses(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.generate(["a red circle"], steps=2, **kwargs)


@pytest.mark.parametrize("call,match", [
    (lambda p: img2img(p, ["a"], IMG, strength=NAN), r"strength must be in \[0, 1\], got nan"),
    (lambda p: img2img(p, ["a"], np.where(IMG > 0, NAN, IMG)), r"images must be uint8 or floats in \[0, 1\], with no NaN or inf"),
    (lambda p: img2img(p, ["a"], np.zeros((1000, 1000, 3), np.uint8)), r"the image is 1000x1000; .* up to 32x32"),
    (lambda p: inpaint(p, ["a"], IMG, np.full((16, 16), NAN)), "mask holds NaN or inf"),
    (lambda p: outpaint(p, ["a"], IMG, (0, 4, 0, 4), fill=INF), r"fill must be in \[0, 1\], got inf"),
    (lambda p: outpaint(p, ["a"], IMG, (0, 0, 40, 0)), r"the outpainted canvas is 16x56; .* up to 32x32"),
    (lambda p: invert(p, ["a"], IMG, guidance_scale=NAN), "guidance_scale must be a finite number, got nan"),
    (lambda p: edit(p, ["a"], IMG, ["b"], inversion_guidance=INF), "inversion_guidance must be a finite number"),
    (lambda p: img2img(p, ["a"], IMG, seed=2**40), r"seed must be an integer in 0..4294967295, got 1099511627776"),
    (lambda p: inpaint(p, ["a"], IMG, np.ones((16, 16)), guidance_rescale=INF), r"guidance_rescale must be in"),
    (lambda p: edit(p, ["a"], IMG, ["b"], guidance_scale=NAN), "guidance_scale must be a finite number, got nan"),
])
def test_editing_refuses(pipe, call, match):
    with pytest.raises(ValueError, match=match):
        call(pipe)


def test_non_finite_batch_is_an_error(pipe):
    """NaN in the inputs (here the initial noise) makes the batch NaN: an error that names the causes."""
    noise = jnp.zeros((2, 8, 8, 4)).at[1, 0, 0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteOutputError, match=r"holds NaN or inf \(1 of 2 examples\), so nothing is returned: "
                                                   r"the model's weights or the inputs"):
        pipe.generate(["a", "b"], steps=1, noise=noise)
