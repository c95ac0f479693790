"""Training: train state, optimizer, EMA, the sharded train step, orbax checkpoints, the loop and recipes.

    from jaxdiff.training import train
    result = train(config, "runs/clip", resume=True)   # config from configs/<recipe>.py
"""
from jaxdiff.training.checkpoint import CheckpointError, Checkpoints, load_params
from jaxdiff.training.config import base_config, validate
from jaxdiff.training.ema import ema_update
from jaxdiff.training.loop import NonFiniteLossError, TrainResult, train
from jaxdiff.training.optim import lr_schedule, make_optimizer
from jaxdiff.training.state import TrainState
from jaxdiff.training.steps import accumulate_grads, make_train_step
from jaxdiff.training.task import Task
