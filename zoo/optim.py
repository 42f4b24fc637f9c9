"""AdamW parameter groups (no decay on norms/biases/embeddings; per-pattern LR scales) and LR schedules."""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

# Parameter names containing one of these never get weight decay, whatever their shape.
NO_DECAY_NAME_PARTS = ("embed", "pos_", "norm", "bias", "token", "level_emb", "fake_latent")


def wants_decay(name: str, param: torch.Tensor, no_decay: set[str] | None = None) -> bool:
    """Matrices and kernels decay; 1-D tensors (norm scales, biases) do not, nor do the names in
    ``no_decay`` when the model lists them (timm's ``no_weight_decay()`` hook, which VAR uses to
    follow its release) or, otherwise, embeddings and position tables."""
    if param.ndim < 2:
        return False
    if no_decay is not None:
        return name not in no_decay
    return not any(part in name for part in NO_DECAY_NAME_PARTS)


def lr_scale_for(name: str, lr_scale: dict[str, float]) -> float:
    for pattern, scale in lr_scale.items():
        if fnmatch.fnmatch(name, pattern):
            return float(scale)
    return 1.0


def param_groups(model: nn.Module, weight_decay: float, lr_scale: dict[str, float]) -> list[dict]:
    """Trainable parameters grouped by (weight decay on/off, LR scale); each group records its ``lr_scale``."""
    unused = [p for p in lr_scale if not any(fnmatch.fnmatch(n, p) for n, _ in model.named_parameters())]
    if unused:
        raise ValueError(f"train.lr_scale: pattern {unused[0]!r} matches no parameter name "
                         f"(names look like {next(iter(dict(model.named_parameters())))!r})")
    groups: dict[tuple[bool, float], dict] = {}
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = wants_decay(name, param, no_decay)
        scale = lr_scale_for(name, lr_scale)
        group = groups.setdefault((decay, scale), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def make_optimizer(model: nn.Module, cfg) -> tuple[torch.optim.AdamW, list[dict]]:
    """AdamW over :func:`param_groups` of ``model`` with the ``train`` section's settings.

    Uses PyTorch's fused AdamW kernel (CPU and CUDA): one pass over each tensor instead of a
    dozen elementwise ops per parameter, with the same update rule.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.lr_scale)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"}
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused)
    return optimizer, groups


def lr_at(step: int, *, base_lr: float, schedule: str, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine to ``min_lr``."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
