"""Training: the Accelerate loop, EMA, optimiser groups, LR schedules, data order and checkpoints."""

from zoo.train.trainer import Trainer, train

__all__ = ["Trainer", "train"]
