"""Train a recipe: python -m train --config configs/<recipe>.py[:variant] --workdir DIR [--resume[=auto]]
[--config.field=value ...] (any config field, e.g. --config.optim.lr=1e-4 --config.mesh.fsdp=2).

Without --resume a workdir that already has checkpoints is refused; --resume continues its newest intact
checkpoint and is an error when there is none; --resume=auto continues one if there is one, else starts.
A failure is one line on stderr and a non-zero exit status; --debug (or JAXDIFF_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxdiff import cli

PROG = "python -m train"
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "recipe config file, e.g. configs/clip.py or configs/clip.py:tiny",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "folder for checkpoints, metrics.jsonl, tensorboard/ and samples/")
flags.DEFINE_bool("debug", False, f"show the traceback of a failure (also: environment variable {cli.DEBUG_ENV}=1)")
flags.mark_flags_as_required(["config", "workdir"])


class _ResumeParser(flags.ArgumentParser):
    """--resume: True (a checkpoint must exist), --resume=auto: 'auto' (if there is one), absent: False."""
    VALUES = {"true": True, "1": True, "false": False, "0": False, "auto": "auto"}

    def parse(self, argument):
        value = self.VALUES.get(str(argument).lower())
        if value is None:
            raise ValueError("choose --resume (continue the run), --resume=auto (continue it if there is one) "
                             "or no --resume (a new run)")
        return value

    def flag_type(self):
        return "true, false or auto"


flags.DEFINE_flag(flags.Flag(_ResumeParser(), flags.ArgumentSerializer(), "resume", False,
                             "--resume: continue the latest intact checkpoint in --workdir (an error if there is "
                             "none); --resume=auto: continue it if there is one", boolean=True))


def _flag_value(argv, name: str) -> str | None:
    """The value of --name (as --name=value or --name value) in argv, else None."""
    for i, arg in enumerate(argv):
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith((f"--{name}=", f"-{name}=")):
            return arg.split("=", 1)[1]
    return None


def _check_config_args(argv):
    """The config file, its variant and every --config.<field> name, checked in our words before absl
    parses them (ml_collections raises these as tracebacks from inside the parsing); the config or None."""
    from jaxdiff.training.config import load_config, unknown_field

    spec = _flag_value(argv, "config")
    if spec is None:
        return None  # absl names the missing required flag
    config = load_config(spec)
    for arg in argv:
        m = re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg)
        problem = m and unknown_field(config, m.group(1))
        if problem:
            raise ValueError(f"{arg}: {problem}")
    return config


def _value_hint(error: flags.Error, config) -> str:
    """For a --config.<field> value absl could not parse: the type the field takes and the recipe's value."""
    m = re.match(r"flag --config\.([\w.]+)=", str(error))
    if config is None or m is None:
        return ""
    value = config
    for part in m.group(1).split("."):
        value = value[part]
    return f" (config.{m.group(1)} takes {type(value).__name__} values; the recipe's is {value!r})"


def _parse_flags(argv):
    config = None
    try:
        config = _check_config_args(argv[1:])
        return FLAGS(argv)
    except (flags.Error, ValueError, TypeError, OSError) as e:  # TypeError: a get_config taking no variant
        if cli.debugging(argv[1:]):
            raise
        hint = _value_hint(e, config) if isinstance(e, flags.Error) else ""
        print(f"{PROG}: error: {cli.one_line(e)}{hint}", file=sys.stderr)
        sys.exit(2)


def _main(argv):
    if len(argv) > 1:
        print(f"{PROG}: error: unexpected arguments: {' '.join(argv[1:])} (flags take values as --flag=value)",
              file=sys.stderr)
        return 2
    # orbax logs every file it writes through absl at INFO; keep warnings and our own messages.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxdiff").setLevel(logging.INFO)
    from jaxdiff import compilation_cache

    compilation_cache.enable()  # compiled train steps are reused between runs of the same config
    from jaxdiff.training import CheckpointError, NonFiniteLossError, train

    try:
        result = train(FLAGS.config, FLAGS.workdir, resume=FLAGS.resume)
    except (NonFiniteLossError, CheckpointError, ValueError, OSError) as e:
        if cli.debugging():
            raise
        print(f"{PROG}: error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    print(f"done: step {int(result.state.step)}, final loss {result.losses[-1] if result.losses else float('nan'):.4f}; "
          f"checkpoints in {os.path.join(result.workdir, 'checkpoints')}")
    return 0


def main(_argv=None) -> int:
    """Parses sys.argv (ml_collections reads the config overrides from there whatever is passed)."""
    app.run(_main, flags_parser=_parse_flags)
    return 0  # app.run exits with _main's status


if __name__ == "__main__":
    sys.exit(cli.run(main, prog=PROG))
