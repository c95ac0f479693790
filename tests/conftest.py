import os

import pytest

# Tests run on CPU in float32. Most of their time is XLA compiling small programs, so compile
# with LLVM's optimisations off (about 40% less test time; numerics stay within the golden
# tolerances). Subprocesses started by tests inherit both settings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

@pytest.fixture(autouse=True)
def compilation_cache_of_this_session(tmp_path_factory, monkeypatch):
    """A CLI test turns JAX's persistent compilation cache on in its process (`jaxdiff.compilation_cache.enable`),
    and with it jaxdiff.trace_cache's stored programs and param shapes: it is off again after every test, and a test
    that turns it on writes into a folder of this session, not the user's cache."""
    import jax

    monkeypatch.setenv("JAXDIFF_CACHE", str(tmp_path_factory.getbasetemp() / "xla"))
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


# The tfds config the trained-run fixture uses: 32 training images of 16x16 shapes.
SHAPES = "shapes/16px-32-4-8-seed0"


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Tiny CLIP and VAE runs on 16px shapes, and a latent diffusion run on top of both (once per test worker)."""
    from configs import clip as clip_config
    from configs import latent_diffusion as ld_config
    from configs import vae as vae_config
    from jaxdiff.training import train
    from tfds_fixtures import prepare_tfds

    root = tmp_path_factory.mktemp("runs")
    data_dir = prepare_tfds(tmp_path_factory, SHAPES)

    def on_shapes(c, steps=2):
        c.data.update(source="shapes", name=SHAPES, data_dir=data_dir, image_size=16, max_length=16)
        c.steps, c.checkpoint_every, c.sample_every, c.eval_examples = steps, 0, 0, 8
        return c

    workdirs = {name: str(root / name) for name in ("clip", "vae", "ld")}
    train(on_shapes(clip_config.get_config("tiny")), workdirs["clip"])
    train(on_shapes(vae_config.get_config("tiny")), workdirs["vae"])
    c = on_shapes(ld_config.get_config("tiny"))
    c.model.vae.update(checkpoint=workdirs["vae"], scaling_factor=0.5)
    c.model.text_encoder.checkpoint = workdirs["clip"]
    train(c, workdirs["ld"])
    return {**workdirs, "data_dir": data_dir}
