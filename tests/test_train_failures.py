"""The training side's failure paths: every bad command line is one line on stderr (no traceback) before
any setup, a non-finite state is never saved, a poisoned or damaged checkpoint is set aside (not deleted)
and the run resumes from the newest good one, --resume's three modes, a changed architecture is named."""
import glob
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdiff.training import CheckpointError, Checkpoints, NonFiniteLossError, load_params, train
from test_training import toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--config", "configs/toy2d.py"]


def _run(module, *args, debug=False):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXDIFF_DEBUG": "1" if debug else ""}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def one_line(process, status=None) -> str:
    """A finished command's error: one line on stderr (no traceback) and a non-zero exit status."""
    _, err = process.communicate(timeout=120)
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("WARNING:")]
    assert process.returncode != 0 and (status is None or process.returncode == status), err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_train_command_line_failures_are_one_line(tmp_path):
    """Each bad command line, run as the real command (in parallel), fails in one line before any setup."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    work = ["--workdir", str(tmp_path / "w")]
    cases = {  # arguments -> the message
        (*TOY, *work, "--config.frobnicate=3"): "--config.frobnicate=3: config has no field 'frobnicate'; its "
                                                "fields: accumulate, batch_size,",
        (*TOY, *work, "--config.optim.lrr=1e-3"): "--config.optim.lrr=1e-3: config.optim has no field 'lrr'; did "
                                                  "you mean: lr",
        (*TOY, *work, "--config.steps=abc"): "flag --config.steps=abc: invalid literal for int() with base 10: "
                                             "'abc' (config.steps takes int values; the recipe's is 3000)",
        (*TOY, *work, "--resume=maybe"): "flag --resume=maybe: choose --resume (continue the run), --resume=auto",
        (*TOY, *work, "--resume"): "nothing to resume: no checkpoint in",
        (*TOY, *work, "stray"): "unexpected arguments: stray",
        ("--config", "configs/nope.py", *work): "config file 'configs/nope.py' does not exist; configs/ has: clip.py",
        ("--config", "configs/latent_diffusion.py:huge", *work): "unknown variant 'huge' of "
                                                                 "configs/latent_diffusion.py; choose one of: ",
        ("--config", "configs/latent_diffusion.py:tiny", "--workdir", str(a_file)):
            f"workdir {str(a_file)!r} is a file; choose a folder",
    }
    running = {args: _run("train", *args) for args in cases}
    for args, message in cases.items():
        line = one_line(running[args])
        assert line.startswith("python -m train: error: ") and message in line, (args, line)


def test_debug_shows_the_traceback(tmp_path):
    _, err = _run("train", *TOY, "--workdir", str(tmp_path), "--config.frobnicate=3", debug=True).communicate()
    assert "Traceback" in err and "ValueError: --config.frobnicate=3: config has no field" in err


@pytest.mark.parametrize("args,message", [
    (["--resolution", "0"], "argument --resolution: must be an integer >= 1, got 0"),
    (["--resolution", "-3"], "argument --resolution: must be an integer >= 1, got -3"),
    (["--resolution", "1.5"], "argument --resolution: must be an integer >= 1, got '1.5'"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
])
def test_prepare_bad_sizes(tmp_path, capsys, args, message):
    from jaxdiff.data.prepare import main

    with pytest.raises(SystemExit) as e:
        main(["shapes", "--data_dir", str(tmp_path), *args])
    assert e.value.code == 2 and capsys.readouterr().err == f"python -m jaxdiff.data.prepare: error: {message}\n"


def test_export_evaluate_prepare_commands_fail_in_one_line(tmp_path):
    """The real commands; evaluate's missing checkpoint is found before the model and data load."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    running = [_run("jaxdiff.training.export", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "o")),
               _run("jaxdiff.training.evaluate", "--workdir", str(tmp_path), "--step", "7"),
               _run("jaxdiff.data.prepare", "shapes", "--data_dir", str(tmp_path), "--resolution", "0")]
    export, evaluate, prepare = (one_line(p) for p in running)
    assert export.endswith(f"error: {str(tmp_path / 'none')!r} is not a training run's folder: no config.json")
    assert evaluate == f"python -m jaxdiff.training.evaluate: error: no checkpoint in {str(tmp_path / 'checkpoints')!r}"
    assert "--resolution: must be an integer >= 1, got 0" in prepare


def test_huge_learning_rate_sets_aside_the_checkpoint_that_diverges(tmp_path):
    """lr=1e30: the step-2 state holds weights of ~1e29 (finite) and gives an infinite loss at step 3; its
    checkpoint is set aside, step 1 is kept, and resuming from it at a sane rate trains on."""
    c = toy_config(steps=30, every=1)
    c.optim.lr = 1e30
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at step 3; .* The step-2 checkpoint gave this loss; "
                                                 r"moved to .*2\.nonfinite\. The last good checkpoint is step 1 "):
        train(c, str(tmp_path))
    assert Checkpoints(str(tmp_path / "checkpoints")).all_steps() == [1]
    assert os.path.isdir(tmp_path / "checkpoints_set_aside" / "2.nonfinite")
    resumed = train(toy_config(steps=4, every=1), str(tmp_path), resume=True)
    assert len(resumed.losses) == 3 and all(np.isfinite(resumed.losses))


def test_nonfinite_state_is_never_saved(tmp_path):
    """lr=1e3: the update after a finite loss makes NaN weights; that state is not written."""
    c = toy_config(steps=30, every=1)
    c.optim.lr = 1e3
    with pytest.raises(NonFiniteLossError, match=r"params, ema, opt_state hold NaN or inf after step (\d+); "
                                                 r"stopping without saving") as e:
        train(c, str(tmp_path))
    bad = int(re.search(r"after step (\d+)", str(e.value)).group(1))
    steps = Checkpoints(str(tmp_path / "checkpoints")).all_steps()
    assert steps and max(steps) == bad - 1
    for which in ("params", "ema"):
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(load_params(str(tmp_path), which)))


def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes(tmp_path, caplog):
    train(toy_config(steps=6, every=3), str(tmp_path))
    for f in glob.glob(str(tmp_path / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d" / "*")):
        os.remove(f)
    with caplog.at_level(logging.WARNING, logger="jaxdiff"):
        resumed = train(toy_config(steps=8, every=3), str(tmp_path), resume=True)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path / "checkpoints" / "6") in warnings[0]
    assert len(resumed.losses) == 5 and int(resumed.state.step) == 8  # from step 3
    assert os.listdir(tmp_path / "checkpoints_set_aside" / "6.damaged")  # kept, not deleted


def test_resume_modes_and_a_changed_architecture(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(toy_config(steps=2), str(tmp_path), resume=True)
    assert len(train(toy_config(steps=2), str(tmp_path), resume="auto").losses) == 2  # none yet: starts
    assert len(train(toy_config(steps=3), str(tmp_path), resume="auto").losses) == 1  # continues
    with pytest.raises(FileExistsError, match="already has checkpoints"):
        train(toy_config(steps=3), str(tmp_path))
    wider = toy_config(steps=4)
    wider.model.hidden = 48
    with pytest.raises(CheckpointError, match=r"does not fit this config: params/Dense_0/bias has shape \(32,\) in "
                                              r"the checkpoint, \(48,\) here"):
        train(wider, str(tmp_path), resume=True)
    assert Checkpoints(str(tmp_path / "checkpoints")).all_steps() == [2, 3]  # untouched
