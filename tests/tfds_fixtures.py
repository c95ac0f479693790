"""Built-in tfds datasets prepared once per test module into a temporary data_dir."""
import tensorflow_datasets as tfds

import jaxdiff.data.pipeline  # noqa: F401  registers the builders


def prepare_tfds(tmp_path_factory, *names: str) -> str:
    """Prepares the named tfds configs (e.g. 'shapes/16px-32-4-8-seed0') into a new folder; returns it."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    for name in names:
        tfds.builder(name, data_dir=data_dir).download_and_prepare()
    return data_dir
