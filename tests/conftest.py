import os

import pytest
import torch

# Two cores: keep intra-op threads from oversubscribing when pytest runs beside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_dit_overrides():
    """A DiT small enough for CPU tests, on 8×8 one-channel inputs with 10 classes."""
    return dict(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=True, cfg_channels="all")


TINY_RECIPE = {
    "model": {"name": "dit-s/2", "input_size": 8, "in_channels": 1, "hidden_size": 32, "depth": 2,
              "num_heads": 2, "num_classes": 10, "learn_sigma": True, "cfg_channels": "all"},
    "tokenizer": {"name": "pixel", "channels": 1},
    "objective": {"name": "gaussian", "learn_sigma": True},
    "data": {"name": "digits", "image_size": 8},
    "train": {"batch_size": 32, "max_steps": 6, "lr": 1e-3, "log_every": 2, "tensorboard": False,
              "ema_decay": 0.9},
    "sample": {"sampler": "ddim", "steps": 5, "cfg_scale": 2.0, "num": 10, "batch_size": 10},
}


@pytest.fixture
def tiny_recipe_dict():
    import copy

    return copy.deepcopy(TINY_RECIPE)


@pytest.fixture
def tiny_recipe_file(tmp_path, tiny_recipe_dict):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict))
    return path
