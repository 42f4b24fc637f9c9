"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` in eval mode, to be updated with :func:`update_ema`."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for floating parameters; buffers are copied."""
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[name], p.detach()) for name, p in model.named_parameters()]
    targets = [target for target, _ in pairs]
    sources = [source.to(target.dtype) for target, source in pairs]
    torch._foreach_lerp_(targets, sources, 1.0 - decay)
    for buffer, ema_buffer in zip(model.buffers(), ema.buffers()):
        ema_buffer.copy_(buffer)
