"""What a generator costs, measured the same way for every family through the generator interface.

- **parameters**: of the generator and of its tokenizer, counted apart;
- **network evaluations per image** (NFE): during one ``generator.sample`` call, a forward pre-hook
  on every submodule that owns parameters counts its calls; the NFE is the parameter-weighted
  median of those counts, i.e. how many times the weights that make up most of the network run.
  That is 50 for DiT with 50 DDIM steps (a guided step runs the network once on a doubled batch),
  1 for MeanFlow, one per scale for VAR and one per unmasking iteration for MAR (whose small
  per-token diffusion head runs many more times; its cost is in the FLOPs). Independent of the batch;
- **GFLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over the same ``sample`` call, per image
  (guidance's doubled batch included), and per network evaluation (that divided by the NFE); the
  tokenizer's ``decode`` is counted apart;
- **sampling images/s**: one timed :meth:`Pipeline.generate` call (decode included) on a batch,
  after a two-image warm-up;
- **training images/s**: timed optimizer steps as the trainer takes them (``tokenizer.training_inputs``
  or, with ``train.cache_tokens``, ``inputs_from_cache``; ``generator.loss``; backward; clipping;
  AdamW) on random images of the model's data shape, with the run's ``train`` section (batch size,
  optimizer, clipping, mixed precision) when the directory holds ``recipe.yaml``; a generator with
  ``set_step`` is set to its last step (VAR: every scale trained);
- **peak memory** (:class:`PeakMemory`): on a GPU ``torch.cuda.max_memory_allocated`` above what was
  allocated when the measurement began; on a CPU the process's resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set when it began. Freed
  memory a process keeps would hide a later model's needs, so :func:`measure_isolated` runs each
  model's measurements in a fresh Python process (what ``zoo-compare`` does).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

__all__ = ["PeakMemory", "count_parameters", "sampling_cost", "sampling_speed", "training_speed", "measure_model",
           "measure_isolated"]


# ------------------------------------------------------------------------------------- memory

def _proc_status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb``: the most memory the block added (see the module
    docstring). Without ``/proc`` (not Linux) a thread polls the RSS every millisecond through psutil instead."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._poller = None
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
            self._base = _proc_status_kib("VmRSS") * 1024
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
        except (OSError, TypeError):
            import psutil

            process = psutil.Process()
            self._base = process.memory_info().rss
            self._max = self._base
            self._stop = threading.Event()

            def poll():
                while not self._stop.wait(0.001):
                    self._max = max(self._max, process.memory_info().rss)

            self._poller = threading.Thread(target=poll, daemon=True)
            self._poller.start()
            self.method = "psutil RSS polled every 1 ms"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._poller is not None:
            self._stop.set()
            self._poller.join()
            peak = self._max - self._base
        else:
            peak = _proc_status_kib("VmHWM") * 1024 - self._base
        self.peak_mb = max(peak, 0) / 2**20


# ------------------------------------------------------------------------------------- counts

def count_parameters(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(pipe) -> torch.device:
    return next(pipe.generator.parameters()).device


def _sample_latents(pipe, labels: torch.Tensor, seed: int, **sampling) -> torch.Tensor:
    """``generator.sample`` exactly as :meth:`Pipeline.generate` calls it, without the decode."""
    kwargs = pipe.sampling_kwargs(**sampling)
    if "tokenizer" in inspect.signature(pipe.generator.sample).parameters:
        kwargs["tokenizer"] = pipe.tokenizer
    device = _device_of(pipe)
    generator = torch.Generator(device=device).manual_seed(seed)
    return pipe.generator.sample(labels.to(device), generator=generator, **kwargs)


@contextlib.contextmanager
def _call_counts(module: torch.nn.Module):
    """Counts forward calls of every submodule of ``module`` that owns parameters; yields {module: calls}."""
    counts: dict[torch.nn.Module, int] = {}
    handles = []
    for sub in module.modules():
        if any(True for _ in sub.parameters(recurse=False)):
            counts[sub] = 0

            def hook(mod, args):
                counts[mod] += 1

            handles.append(sub.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def weighted_median_calls(counts: dict[torch.nn.Module, int]) -> int:
    """The call count that the majority (by parameter count) of the called modules' weights reach."""
    called = sorted((calls, sum(p.numel() for p in m.parameters(recurse=False))) for m, calls in counts.items()
                    if calls > 0)
    if not called:
        return 0
    total = sum(weight for _, weight in called)
    running = 0
    for calls, weight in called:
        running += weight
        if running * 2 >= total:
            return calls
    return called[-1][0]


@torch.no_grad()
def sampling_cost(pipe, labels: torch.Tensor, *, seed: int = 0, **sampling) -> dict:
    """NFE and GFLOPs of sampling ``labels`` (a small batch is enough; both are per image)."""
    from torch.utils.flop_counter import FlopCounterMode

    n = len(labels)
    with _call_counts(pipe.generator) as counts, FlopCounterMode(display=False) as flops:
        latents = _sample_latents(pipe, labels, seed, **sampling)
    sample_flops = flops.get_total_flops()
    with FlopCounterMode(display=False) as decode_flops:
        pipe.tokenizer.decode(latents)
    nfe = weighted_median_calls(counts)
    per_image = sample_flops / n / 1e9
    return {"nfe_per_image": nfe, "gflops_per_image": per_image,
            "gflops_per_nfe": per_image / nfe if nfe else None,
            "decode_gflops_per_image": decode_flops.get_total_flops() / n / 1e9}


@torch.no_grad()
def sampling_speed(pipe, labels: torch.Tensor, *, seed: int = 0, **sampling) -> dict:
    """Images/s of one :meth:`Pipeline.generate` call on ``labels`` (decode included) and its peak memory."""
    device = _device_of(pipe)
    pipe.generate(labels[:2], seed=seed, batch_size=2, **sampling)  # warm-up: kernels, allocator, caches
    _sync(device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        pipe.generate(labels, seed=seed, batch_size=len(labels), **sampling)
        _sync(device)
        seconds = time.perf_counter() - start
    return {"sample_batch": len(labels), "sample_seconds": seconds, "sample_images_per_s": len(labels) / seconds,
            "sample_peak_mb": memory.peak_mb, "memory_method": memory.method}


def _train_config(model_dir: Path | None):
    """The run's ``train`` section (from its ``recipe.yaml``), or TrainConfig's defaults."""
    import yaml

    from zoo.config import build_config
    from zoo.recipe import TrainConfig

    recipe_file = model_dir / "recipe.yaml" if model_dir is not None else None
    if recipe_file is not None and recipe_file.is_file():
        section = (yaml.safe_load(recipe_file.read_text()) or {}).get("train") or {}
        return build_config(TrainConfig, section, where=f"{recipe_file}: train"), True
    return TrainConfig(), False


def training_speed(pipe, *, image_shape: tuple[int, int, int], num_classes: int | None, train_config=None,
                   batch_size: int | None = None, steps: int = 3, warmup: int = 1, seed: int = 0) -> dict:
    """Images/s of optimizer steps as the trainer takes them (see the module docstring) and their peak memory.

    Trains ``pipe.generator`` in place: measure it last, or on a copy.
    """
    from zoo.optim import make_optimizer
    from zoo.recipe import TrainConfig

    cfg = train_config if train_config is not None else TrainConfig()
    batch = int(batch_size or cfg.batch_size)
    generator, tokenizer = pipe.generator, pipe.tokenizer
    device = _device_of(pipe)
    rng = torch.Generator().manual_seed(seed)
    images = (torch.rand(batch, *image_shape, generator=rng) * 2 - 1).to(device)
    labels = torch.randint(0, max(1, num_classes or 1), (batch,), generator=rng).to(device)
    cached = None
    if cfg.cache_tokens and hasattr(tokenizer, "cache_inputs"):
        with torch.no_grad():
            cached = tokenizer.cache_inputs(images)
    if hasattr(generator, "set_step"):
        generator.set_step(cfg.max_steps - 1, cfg.max_steps)
    generator.train().requires_grad_(True)
    optimizer, _ = make_optimizer(generator, cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16,
                              enabled=cfg.mixed_precision != "no")

    def step():
        with torch.no_grad():
            inputs = tokenizer.inputs_from_cache(cached) if cached is not None else tokenizer.training_inputs(images)
        with autocast:
            loss = generator.loss(inputs, labels)["loss"]
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(generator.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        seconds = (time.perf_counter() - start) / steps
    generator.eval()
    return {"train_batch": batch, "train_seconds_per_step": seconds, "train_images_per_s": batch / seconds,
            "train_peak_mb": memory.peak_mb}


# ------------------------------------------------------------------------------------- one model

def measure_model(model_dir: str | os.PathLike, *, labels: list[int] | None = None, seed: int = 0,
                  sample_batch: int = 64, train_steps: int = 3, train_batch: int | None = None,
                  cost_batch: int = 2, device: str = "cpu", weights: str = "ema", **sampling) -> dict:
    """Every cost of :mod:`zoo.eval.measure` for one model directory, in this process."""
    from zoo.hub.model_dir import load_model_dir, read_model_config
    from zoo.pipeline import parse_labels

    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    pipe = load_model_dir(model_dir, weights=weights, device=device)
    spec = ",".join(map(str, labels)) if labels else "all"
    batch_labels = parse_labels(spec, sample_batch, pipe.num_classes)
    result = {"params": count_parameters(pipe.generator), "tokenizer_params": count_parameters(pipe.tokenizer),
              "device": str(device), "threads": torch.get_num_threads()}
    result.update(sampling_cost(pipe, batch_labels[:cost_batch], seed=seed, **sampling))
    result.update(sampling_speed(pipe, batch_labels, seed=seed, **sampling))
    if train_steps > 0:
        data = config.get("data", {})
        channels = data.get("channels") or getattr(getattr(pipe.tokenizer, "config", None), "image_channels", 3)
        size = data.get("image_size")
        if not size:
            raise ValueError(f"{model_dir}/config.json: data.image_size is missing; training speed needs the image "
                             f"shape (or pass train_steps=0)")
        train_config, from_recipe = _train_config(model_dir)
        result.update(training_speed(pipe, image_shape=(channels, size, size), num_classes=pipe.num_classes,
                                     train_config=train_config, batch_size=train_batch, steps=train_steps,
                                     seed=seed))
        result["train_settings"] = "recipe.yaml" if from_recipe else "TrainConfig defaults (no recipe.yaml)"
    return result


def measure_isolated(model_dir: str | os.PathLike, **options) -> dict:
    """:func:`measure_model` in a fresh Python process (so that peak memory is this model's alone)."""
    command = [sys.executable, "-m", "zoo.eval.measure", str(model_dir), json.dumps(options)]
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"measuring {model_dir} failed in its subprocess: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> int:
    model_dir, options = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    threads = options.pop("threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    print(json.dumps(measure_model(model_dir, **options)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
