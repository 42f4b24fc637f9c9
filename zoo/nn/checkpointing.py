"""Activation checkpointing of transformer blocks: memory for one more forward pass.

``train.checkpoint_activations`` sets a generator's ``checkpoint_activations``; its forward then
runs each block through :func:`call_block`, which under autograd keeps only the block's inputs and
recomputes its activations in the backward pass (``torch.utils.checkpoint``, non-reentrant, RNG
state preserved so that dropout draws the same masks). The gradients are the same; without grad
(sampling, MeanFlow's forward-mode JVP) nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def call_block(block: Callable, *args, checkpointing: bool = False, **kwargs):
    """``block(*args, **kwargs)``, checkpointed when ``checkpointing`` and autograd is recording."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)
