"""Train a recipe: python -m train --config configs/<recipe>.py[:variant] --workdir DIR [--resume]
[--config.field=value ...] (any config field, e.g. --config.optim.lr=1e-4 --config.mesh.fsdp=2)."""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "recipe config file, e.g. configs/clip.py or configs/clip.py:tiny",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "folder for checkpoints, metrics.jsonl, tensorboard/ and samples/")
flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in --workdir")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax logs every file it writes through absl at INFO; keep warnings and our own messages.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxdiff").setLevel(logging.INFO)
    from jaxdiff import compilation_cache

    compilation_cache.enable()  # compiled train steps are reused between runs of the same config
    from jaxdiff.training import NonFiniteLossError, train

    try:
        result = train(FLAGS.config, FLAGS.workdir, resume=FLAGS.resume)
    except (NonFiniteLossError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: step {int(result.state.step)}, final loss {result.losses[-1] if result.losses else float('nan'):.4f}; "
          f"checkpoints in {os.path.join(result.workdir, 'checkpoints')}")
    return 0


if __name__ == "__main__":
    app.run(main)
