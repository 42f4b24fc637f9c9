"""The training loop, shared by every family: it only calls ``generator.loss`` and
``tokenizer.training_inputs`` — or, for a tokenizer recipe, ``tokenizer.loss``.

Exactness of resume: the batch order is a function of (seed, step) (:class:`StepBatchSampler`) and
every step reseeds the global RNG from (seed, step, piece), so weights, EMA, optimizer state and the
step counter are all a run needs to continue as if never stopped (checkpoints also keep every
process's RNG states, for anything that draws from numpy or Python's ``random``).

Processes: a global batch is cut into ``grad_accum_steps × processes`` equal pieces in order; piece
``k = micro_batch · processes + rank`` is seeded by ``k``. One process with ``grad_accum_steps = N``
therefore draws exactly what ``N`` processes with one micro-batch each draw, and gives the same
weights up to the order of the gradient sums.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from zoo.config import ConfigError
from zoo.data.transforms import make_grid_image
from zoo.errors import NonFiniteError, WriteError
from zoo.hub.model_dir import load_state_strict, model_config_dict, save_model_dir
from zoo.hub.safe_load import read_safetensors
from zoo.io import atomic_write, atomic_write_json, atomic_write_text, save_safetensors
from zoo.optim import lr_at, make_optimizer
from zoo.pipeline import Pipeline, parse_labels
from zoo.progress import progress_bar
from zoo.recipe import Recipe
from zoo.rundir import TOKENIZER_SUBDIR
from zoo.train import checkpoint as ckpt
from zoo.train.data import StepBatchSampler
from zoo.train.ema import make_ema, update_ema
from zoo.train.memory import fix_mmap_threshold


class LossModule(nn.Module):
    """Wraps the trained model (a generator, or a tokenizer) so that Accelerate/DDP see the loss
    computation as the module's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs) -> dict[str, torch.Tensor]:
        return self.model.loss(*inputs)


class EpochIndexed(Dataset):
    """Index ``epoch · n + i`` -> item ``i`` of epoch ``epoch`` (deterministic augmentation in any worker).

    With ``keys_only`` the image is not loaded: items are ``(empty, label, i · num_variants + variant)``,
    the row of the token cache that holds this item's tokenizer output this epoch.
    """

    def __init__(self, dataset, keys_only: bool = False):
        self.dataset = dataset
        self.keys_only = keys_only

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: int):
        epoch, index = divmod(key, len(self.dataset))
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if not self.keys_only:
            return self.dataset[index]
        labels = getattr(self.dataset, "labels", None)
        label = labels[index].clone() if labels is not None else self.dataset[index][1]
        row = index * self.dataset.num_variants + self.dataset.variant_of(index)
        return torch.empty(0), label, torch.tensor(row)


class _EpochOffsetSampler(torch.utils.data.Sampler):
    def __init__(self, batches: StepBatchSampler):
        self.batches = batches

    def __iter__(self):
        n = self.batches.num_items
        step = self.batches.start_step
        for i, batch in enumerate(self.batches):
            epoch = self.batches.epoch_of(step + i // self.batches.accum)
            yield [epoch * n + index for index in batch]


def to_device(cond, device):
    """Labels, or a dict/tuple of condition tensors (super-resolution's ``{"lr", "label"}``), on ``device``."""
    if isinstance(cond, dict):
        return {key: to_device(value, device) for key, value in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(to_device(value, device) for value in cond)
    return cond.to(device)


def step_seed(seed: int, step: int, piece: int) -> int:
    """The seed of piece ``piece`` (``micro_batch · processes + rank``) of optimizer step ``step``."""
    return (seed * 1_000_003 + step * 1_009 + piece * 101) % (2**63 - 1)


def default_run_dir(recipe_path: str) -> Path:
    """``runs/<recipe name>``, or ``runs/<recipe name>-N`` if that already holds a run."""
    stem = Path(recipe_path).stem
    candidate = Path("runs") / stem
    n = 1
    while candidate.exists() and any(candidate.iterdir()):
        candidate = Path("runs") / f"{stem}-{n}"
        n += 1
    return candidate


TOKEN_CACHE = "token_cache.npy"  # train.cache_tokens: the rows, memory-mapped; token_cache.json holds its fingerprint


class Trainer:
    """Builds everything from a validated recipe and trains it; see :meth:`fit`.

    A generator recipe trains its generator on the frozen tokenizer's ``training_inputs``; a
    tokenizer recipe (no ``model`` section) trains the tokenizer on images. ``self.model`` is what
    is trained in either case.
    """

    def __init__(self, recipe: Recipe, run_dir: str | os.PathLike, *, resume: bool = False,
                 progress: bool = True, cpu: bool = False):
        self.recipe = recipe
        self.cfg = recipe.train
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.cpu = cpu
        if not resume and ckpt.checkpoint_root(self.run_dir).exists() and ckpt.latest_checkpoint(self.run_dir):
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose "
                              f"another --run-dir")
        # A tokenizer named by recipe is trained (or finished, or reused) before anything else.
        tokenizer_dir = self._tokenizer_dir()
        # Wall time of the steps a checkpoint holds (train_seconds in its trainer_state.json): this
        # session's, from here on, plus what the checkpoint resumed from had; work a kill lost is not counted.
        self._clock_start, self._seconds_before = time.perf_counter(), 0.0
        if self.cfg.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
            raise ConfigError(f"{recipe.where('train.mixed_precision')}: fp16 is not supported on a CPU (PyTorch "
                              f"has no fp16 autocast with loss scaling there); use 'bf16' or 'no'")
        self.accelerator = Accelerator(
            mixed_precision=self.cfg.mixed_precision,
            log_with="tensorboard" if self.cfg.tensorboard else None,
            project_dir=str(self.run_dir),
            # Without a GPU, Accelerate joins the processes of a launch only when told it runs on the CPU.
            cpu=cpu or not torch.cuda.is_available(),
        )
        acc = self.accelerator
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != acc.num_processes:
            raise ConfigError(f"this process was launched as one of {launched}, but Accelerate runs "
                              f"{acc.num_processes}; each would train alone into {self.run_dir}. Check the "
                              f"accelerate launch flags (docs/imagenet.md)")
        torch.backends.cuda.matmul.allow_tf32 = self.cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.cfg.allow_tf32
        # torch, numpy and Python's random from the seed, so that a run's RNG states are reproducible
        # (a fresh process seeds numpy from the OS); the torch state is what it always was.
        set_seed(self.cfg.seed)

        # Data first: a missing folder or a class-count mismatch fails before models are built.
        try:
            self.dataset = recipe.data.build()
        except (ConfigError, FileNotFoundError) as err:
            text = str(err)
            raise ConfigError(text if text.startswith(recipe.source) else f"{recipe.source}: {text}") from None
        if len(self.dataset) < self.cfg.batch_size:
            raise ConfigError(f"{recipe.where('train.batch_size')}: {self.cfg.batch_size} is more than the "
                              f"{len(self.dataset)} items of dataset {recipe.data.name!r}; a step needs a whole batch, "
                              f"so lower train.batch_size")
        self.token_cache = None
        if recipe.trains_tokenizer:
            if self.cfg.cache_tokens:
                raise ConfigError(f"{recipe.where('train.cache_tokens')}: a tokenizer recipe trains its tokenizer; "
                                  f"there is no frozen tokenizer output to cache")
            self.tokenizer = None
            self.objective = None
            self.model = recipe.tokenizer.build().train().requires_grad_(True)
        else:
            classes = getattr(self.dataset, "num_classes", None)
            model_classes = getattr(recipe.model.config, "num_classes", None)
            if classes is not None and model_classes is not None and classes != model_classes:
                raise ConfigError(f"{recipe.where('model.num_classes')}: {model_classes}, but the dataset has "
                                  f"{classes} classes; set model.num_classes={classes}")
            self.tokenizer = self._build_tokenizer(tokenizer_dir).to(acc.device).eval().requires_grad_(False)
            self.token_cache = self._token_cache() if self.cfg.cache_tokens else None
            self.objective = recipe.objective.build() if recipe.objective is not None else None
            self.model = recipe.model.build(objective=self.objective)
        if self.cfg.checkpoint_activations:
            if not hasattr(self.model, "checkpoint_activations"):
                raise ConfigError(f"{recipe.where('train.checkpoint_activations')}: {type(self.model).__name__} does "
                                  f"not support activation checkpointing (DiT, MeanFlow-DiT, VAR and MAR do)")
            self.model.checkpoint_activations = True
        if self.cfg.return_freed_memory and acc.device.type == "cpu":
            fix_mmap_threshold()  # see zoo/train/memory.py
        self.ema = make_ema(self.model)
        self.model.to(acc.device)  # the fused optimizer is built for the parameters' device
        self.optimizer, _ = make_optimizer(self.model, self.cfg)
        if self.cfg.compile != "none":
            self.model.compile(mode=self.cfg.compile)
        self.loss_module, self.optimizer = acc.prepare(LossModule(self.model), self.optimizer)
        self.ema.to(acc.device)
        self.step = 0
        self.skipped_steps = 0  # non-finite steps skipped (train.nonfinite: skip), over the whole run
        self.skips_in_a_row = 0
        self._log_failed = False
        if resume:
            self._resume()

    @property
    def generator(self) -> nn.Module:
        """The trained generator (raw weights); for a tokenizer recipe, the trained tokenizer."""
        return self.model

    # ------------------------------------------------------------------------------ tokenizer source

    def _tokenizer_dir(self) -> Path | None:
        """The directory holding the weights of the recipe's tokenizer (training it first if its
        source is a tokenizer recipe); None when the tokenizer is built from its config alone."""
        source = self.recipe.tokenizer_source
        if source is None:
            return None
        if source.kind == "recipe":
            return self._train_tokenizer(source)
        from zoo.hub.model_dir import resolve_model_dir

        return resolve_model_dir(source.path, where=self.recipe.where("tokenizer.from"))

    def _train_tokenizer(self, source) -> Path:
        sub_dir = self.run_dir / TOKENIZER_SUBDIR
        sub = source.recipe
        latest = ckpt.latest_checkpoint(sub_dir) if ckpt.checkpoint_root(sub_dir).exists() else None
        if latest is not None:
            saved = sub_dir / "recipe.yaml"
            if saved.is_file() and _what_trains(yaml.safe_load(saved.read_text())) != _what_trains(_comparable(sub)):
                raise ConfigError(f"{sub_dir} holds a tokenizer trained from a different recipe than "
                                  f"{source.path}; delete that folder to retrain it, or choose another --run-dir")
            if ckpt.read_state(latest)["step"] >= sub.train.max_steps:
                print(f"tokenizer: reusing {sub_dir} (trained from {source.path})")
                return sub_dir
        print(f"tokenizer: training {source.path} into {sub_dir} first")
        Trainer(sub, sub_dir, resume=latest is not None, progress=self.progress, cpu=self.cpu).fit()
        return sub_dir

    def _build_tokenizer(self, tokenizer_dir: Path | None) -> nn.Module:
        from zoo.hub.model_dir import load_tokenizer_dir

        if tokenizer_dir is not None:
            return load_tokenizer_dir(tokenizer_dir)
        tokenizer = self.recipe.tokenizer.build()
        pretrained = getattr(self.recipe.tokenizer.config, "pretrained", "")
        has_weights = any(True for _ in tokenizer.parameters())
        if getattr(type(tokenizer), "trainable", False) and not pretrained and has_weights:
            print(f"warning: {self.recipe.where('tokenizer')}: {self.recipe.tokenizer.name!r} is built with random "
                  f"weights; name trained ones with tokenizer.from (a tokenizer recipe, run directory or Hub repo)",
                  file=sys.stderr)
        return tokenizer

    # ------------------------------------------------------------------------------ token cache

    def _token_cache(self) -> torch.Tensor:
        """Every item's ``tokenizer.cache_inputs`` in every augmentation variant (row
        ``index · num_variants + variant``), computed once into RUN_DIR/token_cache.npy and read
        memory-mapped, so a cache larger than the memory (ImageNet's KL moments) still works: a step
        reads only its batch's rows."""
        where = self.recipe.where("train.cache_tokens")
        if not getattr(self.tokenizer, "cacheable", False):
            raise ConfigError(f"{where}: tokenizer {self.recipe.tokenizer.name!r} cannot cache its training inputs "
                              f"(they are not a fixed function of the image)")
        variants = getattr(self.dataset, "num_variants", None)
        if variants is None:
            raise ConfigError(f"{where}: dataset {self.recipe.data.name!r} has continuous augmentation, so its "
                              f"images cannot be encoded ahead of time")
        acc = self.accelerator
        path = self.run_dir / TOKEN_CACHE
        fingerprint = json.dumps({"tokenizer": self.recipe.tokenizer.to_dict(), "data": self.recipe.data.to_dict(),
                                  "source": str(getattr(self.recipe.tokenizer_source, "path", None)),
                                  "rows": len(self.dataset) * variants}, sort_keys=True)
        with acc.main_process_first():
            cached = self._read_token_cache(path, fingerprint)
            if cached is None and acc.is_main_process:
                self._encode_dataset(variants, path, fingerprint)
                cached = self._read_token_cache(path, fingerprint)
            if cached is None:
                raise RuntimeError(f"{path}: the main process did not write the token cache")
        return cached

    @staticmethod
    def _read_token_cache(path: Path, fingerprint: str) -> torch.Tensor | None:
        """The cache as a tensor over a read-only memory map, or None when it is missing or was made
        for another tokenizer/dataset (its fingerprint sits beside it in a .json written last)."""
        meta = path.with_suffix(".json")
        if not (path.is_file() and meta.is_file()):
            return None
        if json.loads(meta.read_text()).get("fingerprint") != fingerprint:
            return None
        import warnings

        import numpy as np

        array = np.load(path, mmap_mode="r")
        with warnings.catch_warnings():  # rows are only ever read (indexing copies them)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)

    @torch.no_grad()
    def _encode_dataset(self, variants: int, path: Path, fingerprint: str) -> None:
        import numpy as np

        device = self.accelerator.device
        n = len(self.dataset)
        chunk = max(1, self.cfg.batch_size // self.cfg.grad_accum_steps // self.accelerator.num_processes)
        keys = [(i, v) for i in range(n) for v in range(variants)]  # row order: i * variants + v
        path.with_suffix(".json").unlink(missing_ok=True)  # a stale fingerprint must not bless a new file

        def write(tmp: str) -> None:
            out = None
            for start in progress_bar(range(0, len(keys), chunk), desc="encoding the dataset once (train.cache_tokens)",
                                      unit="batch", enabled=self.progress):
                images = torch.stack([self.dataset.get_variant(i, v)[0] for i, v in keys[start:start + chunk]])
                rows = self.tokenizer.cache_inputs(images.to(device)).cpu().numpy()
                if out is None:
                    shape = (len(keys), *rows.shape[1:])
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=rows.dtype, shape=shape)
                out[start:start + len(rows)] = rows
            out.flush()
            del out

        atomic_write(path, write)
        atomic_write_json(path.with_suffix(".json"), {"fingerprint": fingerprint})

    # ------------------------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            ckpt.clean_partial(self.run_dir)
        acc.wait_for_everyone()
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:  # killed before its first checkpoint: there is nothing to lose, start over
            acc.print(f"note: {self.run_dir} has no checkpoint yet; starting from step 0")
            return
        saved_file = self.run_dir / "recipe.yaml"
        if saved_file.is_file():
            saved, current = yaml.safe_load(saved_file.read_text()), _comparable(self.recipe)
            changed = sorted(k for k in current if saved.get(k) != current[k])
            if changed:
                acc.print(f"note: resuming with a recipe that differs in section(s) {', '.join(changed)}")
        model = acc.unwrap_model(self.loss_module).model
        try:
            state = ckpt.read_state(latest)
            if (latest / ckpt.OPTIMIZER_NAME).is_file():
                load_state_strict(model, read_safetensors(latest / ckpt.MODEL_NAME), str(latest / ckpt.MODEL_NAME))
                self.optimizer.load_state_dict(ckpt.load_optimizer(latest / ckpt.OPTIMIZER_NAME))
                states = ckpt.load_rng_states(latest / ckpt.RNG_NAME)
            else:  # a checkpoint written by zoo before 0.2 (Accelerate's save_state layout)
                acc.load_state(str(latest))
                states = None
            load_state_strict(self.ema, read_safetensors(latest / ckpt.EMA_NAME), str(latest / ckpt.EMA_NAME))
        except ConfigError as err:
            raise ConfigError(f"{err}. To resume from an earlier checkpoint, delete {latest}") from None
        except Exception as err:  # a file edited or damaged outside zoo (zoo's writes are atomic)
            raise ConfigError(f"{latest}: cannot be read ({type(err).__name__}: {err}). To resume from an earlier "
                              f"checkpoint, delete this folder") from None
        if states is not None and len(states) == acc.num_processes:
            ckpt.set_rng_state(states[acc.process_index])
        elif states is not None:
            acc.print(f"note: {latest.name} was written by {len(states)} process(es), this run has "
                      f"{acc.num_processes}: numpy/Python RNG streams start fresh (torch's is reseeded "
                      f"every step anyway)")
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.skips_in_a_row = state.get("skips_in_a_row", 0)
        self._seconds_before = float(state.get("train_seconds", 0.0))
        pieces = state.get("pieces")
        if pieces is not None and pieces != self.cfg.grad_accum_steps * acc.num_processes:
            acc.print(f"note: {latest.name} was trained with {pieces} pieces per step (grad_accum_steps × "
                      f"processes), this run uses {self.cfg.grad_accum_steps * acc.num_processes}: same batches, "
                      f"but not the same random draws as an uninterrupted run")
        acc.print(f"resumed {self.run_dir} from {latest.name} (step {self.step})")

    def train_seconds(self) -> float:
        """Wall seconds the run's steps so far took, over all its sessions (set-up included, the tokenizer
        a recipe trains first excluded: it records its own)."""
        return self._seconds_before + time.perf_counter() - self._clock_start

    def data_position(self, step: int | None = None) -> dict[str, int]:
        """Where the batch stream stands before ``step``: the epoch and the batch within it."""
        step = self.step if step is None else step
        per_epoch = len(self.dataset) // self.cfg.batch_size
        return {"epoch": step // per_epoch, "batch_in_epoch": step % per_epoch}

    def save_checkpoint(self) -> Path:
        """Write checkpoint ``self.step`` (main process only; every process takes part in gathering
        the RNG states), then refresh the run directory's model files. A step already saved is not
        written again (a resumed run that was at its end), but the model files are refreshed."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        root = ckpt.checkpoint_root(self.run_dir)
        final = root / ckpt.checkpoint_name(self.step)
        acc.wait_for_everyone()
        rng_states = gather_object([ckpt.rng_state()])
        model = acc.unwrap_model(self.loss_module).model
        failure = None
        if acc.is_main_process:
            try:
                self._write_checkpoint(final, model, rng_states)
            except WriteError as err:
                failure = err
        if self._agreed(failure is not None):  # every process stops, not only the one that failed
            raise failure or WriteError(None, f"the main process could not save checkpoint {final.name}")
        acc.wait_for_everyone()
        return final

    def _write_checkpoint(self, final: Path, model: nn.Module, rng_states: list[dict]) -> None:
        """The main process's part of :meth:`save_checkpoint`."""
        if ckpt.latest_checkpoint(self.run_dir) != final:
            raw, optimizer = model.state_dict(), self.optimizer.state_dict()
            files = {
                ckpt.MODEL_NAME: lambda path: save_safetensors(path, raw),
                ckpt.EMA_NAME: lambda path: save_safetensors(path, self.ema.state_dict()),
                ckpt.OPTIMIZER_NAME: lambda path: ckpt.save_optimizer(path, optimizer),
                ckpt.RNG_NAME: lambda path: ckpt.save_rng_states(path, rng_states),
            }
            pieces = self.cfg.grad_accum_steps * self.accelerator.num_processes
            state = {"step": self.step, "time": time.time(), **self.data_position(),
                     "skipped_steps": self.skipped_steps, "skips_in_a_row": self.skips_in_a_row,
                     "pieces": pieces, "processes": self.accelerator.num_processes,
                     "train_seconds": self.train_seconds()}
            ckpt.write_checkpoint(self.run_dir, self.step, files, state, keep=self.cfg.keep_checkpoints)
        try:
            if self.recipe.trains_tokenizer:
                save_model_dir(self.run_dir, model_config_dict(self.recipe), None,
                               tokenizer_state=self.ema.state_dict(), tokenizer_raw_state=model.state_dict())
            else:
                save_model_dir(self.run_dir, model_config_dict(self.recipe), self.ema.state_dict(),
                               raw_state=model.state_dict(), tokenizer_state=self.tokenizer.state_dict())
        except WriteError as err:
            raise WriteError(err.errno, f"{err.strerror}; checkpoint {final.name} is saved, and each of the run "
                                        f"directory's model files is its old or its new version") from None

    # ------------------------------------------------------------------------------ sampling

    def pipeline(self) -> Pipeline:
        return Pipeline(self.ema, self.tokenizer, self.recipe.sample,
                        num_classes=getattr(self.dataset, "num_classes", None),
                        image_size=getattr(self.dataset, "image_size", None))

    def write_sample_grid(self, name: str) -> Path:
        """Sample ``sample.num`` images from the EMA model and save a grid PNG under ``samples/``;
        for a tokenizer recipe, originals beside reconstructions (and print PSNR, codebook usage)."""
        if self.recipe.trains_tokenizer:
            return self.write_reconstruction_grid(name)
        sample = self.recipe.sample
        pipe = self.pipeline()
        conditions = getattr(self.dataset, "sample_conditions", None)  # image-conditioned data (super-resolution)
        labels = conditions(sample.num) if conditions else parse_labels(sample.labels, sample.num, pipe.num_classes)
        images = pipe.generate(labels, seed=sample.seed, batch_size=sample.batch_size)
        nrow = (pipe.num_classes if sample.labels == "all" and pipe.num_classes and not conditions
                else int(math.ceil(len(images) ** 0.5)))
        side = images.shape[-1]
        grid = make_grid_image(images, nrow=nrow, upscale=max(1, 64 // side))
        path = self.run_dir / "samples" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        return path

    def write_reconstruction_grid(self, name: str) -> Path:
        from zoo.eval.reconstruction import reconstruction_report, write_pairs_grid

        images = torch.stack([self.dataset[i][0] for i in range(min(self.recipe.sample.num, len(self.dataset)))])
        report = reconstruction_report(self.ema, images, batch_size=self.recipe.sample.batch_size)
        path = self.run_dir / "samples" / f"{name}.png"
        write_pairs_grid(path, images, report.pop("reconstructions"))
        atomic_write_json(path.with_suffix(".json"), report)
        print(f"reconstruction of {len(images)} training images: " + ", ".join(
            f"{k} {v:.4g}" for k, v in report.items() if isinstance(v, float)))
        return path

    # ------------------------------------------------------------------------------ loop

    def _loader(self) -> DataLoader:
        acc = self.accelerator
        batches = StepBatchSampler(len(self.dataset), self.cfg.batch_size, seed=self.cfg.seed,
                                   accum=self.cfg.grad_accum_steps, rank=acc.process_index,
                                   world=acc.num_processes, start_step=self.step)
        return DataLoader(EpochIndexed(self.dataset, keys_only=self.token_cache is not None),
                          batch_sampler=_EpochOffsetSampler(batches),
                          num_workers=self.cfg.num_workers, pin_memory=acc.device.type == "cuda",
                          persistent_workers=False)

    def _set_lr(self) -> float:
        lr = lr_at(self.step, base_lr=self.cfg.lr, schedule=self.cfg.lr_schedule,
                   warmup_steps=self.cfg.warmup_steps, max_steps=self.cfg.max_steps, min_lr=self.cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        return lr

    def train_step(self, batch_iter) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the loss terms averaged
        over every piece of the global batch (all processes), the gradient norm and the learning rate.

        A NaN or infinite loss term or gradient is not applied: the run stops with
        :class:`~zoo.errors.NonFiniteError` (``train.nonfinite: stop``), or the step is skipped and
        counted (``skip``) until ``train.nonfinite_max_skips`` steps in a row have been skipped.
        """
        acc = self.accelerator
        cfg = self.cfg
        lr = self._set_lr()
        model = acc.unwrap_model(self.loss_module).model
        if hasattr(model, "set_step"):  # schedules inside the model (VAR's progressive training)
            model.set_step(self.step, cfg.max_steps)
        sums: dict[str, torch.Tensor] = {}
        self.loss_module.train()
        for micro in range(cfg.grad_accum_steps):
            images, labels, *rows = next(batch_iter)
            images, labels = images.to(acc.device), to_device(labels, acc.device)
            torch.manual_seed(step_seed(cfg.seed, self.step, micro * acc.num_processes + acc.process_index))
            if rows:  # train.cache_tokens
                inputs = (self.tokenizer.inputs_from_cache(self.token_cache[rows[0]].to(acc.device)), labels)
            elif self.tokenizer is None:
                inputs = (images,)
            else:
                # A generator may ask for more than the tokenizer's default inputs (VAR-SR's residuals).
                make_inputs = getattr(model, "training_inputs", None)
                with torch.no_grad():
                    tokens = (make_inputs(self.tokenizer, images) if make_inputs is not None
                              else self.tokenizer.training_inputs(images))
                inputs = (tokens, labels)
            last = micro == cfg.grad_accum_steps - 1
            sync = contextlib.nullcontext() if last else acc.no_sync(self.loss_module)
            with acc.autocast(), sync:
                terms = self.loss_module(*inputs)
                acc.backward(terms["loss"] / cfg.grad_accum_steps)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / cfg.grad_accum_steps
        # Averaged over processes (so every process takes the same decision below), then one
        # device-to-host copy for all terms (a .item() per term would sync a GPU each time).
        stacked = torch.stack(list(sums.values()))
        if acc.num_processes > 1:
            stacked = acc.reduce(stacked, reduction="mean")
        totals = dict(zip(sums, stacked.tolist()))
        parameters = [p for p in self.loss_module.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = acc.clip_grad_norm_(self.loss_module.parameters(), cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        totals["grad_norm"] = float(grad_norm)
        # Under fp16 the gradient scaler skips overflowing steps itself; only the loss is checked then.
        check_grads = acc.scaler is None
        bad_terms = sorted((k for k, v in totals.items() if k != "grad_norm" and not math.isfinite(v)),
                           key=lambda k: k == "loss")  # the term at fault first, the total after it
        if bad_terms or (check_grads and not math.isfinite(totals["grad_norm"])):
            self._nonfinite_step(totals, bad_terms, model)
            totals["skipped"] = 1.0
        else:
            self.optimizer.step()
            self.skips_in_a_row = 0
            update_ema(self.ema, model, cfg.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        totals["lr"] = lr
        return totals

    def _nonfinite_step(self, totals: dict[str, float], bad_terms: list[str], model: nn.Module) -> None:
        """Stop, or skip and count, a step whose loss or gradient is not finite (nothing is applied)."""
        cfg = self.cfg
        if bad_terms:
            what = "loss term " + ", ".join(f"{k} = {totals[k]}" for k in bad_terms)
        else:
            names = [n for n, p in model.named_parameters()
                     if p.grad is not None and not torch.isfinite(p.grad).all()]
            what = (f"gradient (norm {totals['grad_norm']}; first non-finite: "
                    f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''})")
        number = self.step + 1  # counted as in metrics.jsonl and checkpoint names: steps done after it
        latest = ckpt.latest_checkpoint(self.run_dir)
        kept = (f"{latest} (step {ckpt.read_state(latest)['step']}) is still the latest checkpoint" if latest
                else "No checkpoint had been written yet")
        if cfg.nonfinite == "skip" and self.skips_in_a_row < cfg.nonfinite_max_skips:
            self.skipped_steps += 1
            self.skips_in_a_row += 1
            self.accelerator.print(f"warning: step {number}: non-finite {what}; step skipped "
                                   f"({self.skipped_steps} so far, {self.skips_in_a_row} in a row)", file=sys.stderr)
            return
        if cfg.nonfinite == "skip":
            raise NonFiniteError(f"step {number}: non-finite {what}, and {self.skips_in_a_row} steps in a row were "
                                 f"already skipped (train.nonfinite_max_skips); the run stopped. {kept}. Lower "
                                 f"train.lr or set train.grad_clip")
        raise NonFiniteError(f"step {number}: non-finite {what}; the step was not applied and the run stopped. "
                             f"{kept}. Lower train.lr, set train.grad_clip, or set train.nonfinite=skip to skip "
                             f"such steps")

    def fit(self, stop_at: int | None = None) -> Path | None:
        """Train to ``train.max_steps``, writing logs, grids and checkpoints; returns the final grid's path.

        ``stop_at`` ends the session early after checkpointing that step (an interruption on
        purpose: the run continues with ``--resume`` exactly as if it had not stopped). A first
        Ctrl-C does the same at the end of the current step; a second one stops at once.
        """
        acc = self.accelerator
        cfg = self.cfg
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.recipe.save(self.run_dir / "recipe.yaml")
        if cfg.tensorboard:
            acc.init_trackers("logs")
        log_file = self.run_dir / "metrics.jsonl"
        if acc.is_main_process:
            _truncate_log(log_file, self.step)
        batch_iter = iter(self._loader())
        bar = progress_bar(total=cfg.max_steps, initial=self.step, desc=self.run_dir.name, unit="step",
                           enabled=self.progress and acc.is_main_process)
        end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        with _stop_on_interrupt() as interrupted:
            self._loop(end, batch_iter, bar, log_file, interrupted)
        bar.close()
        self.save_checkpoint()
        if self.step < cfg.max_steps:
            acc.print(f"stopped at step {self.step}; continue with --run-dir {self.run_dir} --resume")
            acc.end_training()
            return None
        grid = self.write_sample_grid("final") if acc.is_main_process else None
        acc.end_training()
        return grid

    def _agreed(self, stop: bool) -> bool:
        """True if any process was asked to stop, so that all stop after the same step."""
        if self.accelerator.num_processes == 1:
            return stop
        flag = torch.tensor([float(stop)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _log(self, log_file: Path, terms: dict[str, float]) -> None:
        """Append to metrics.jsonl (and TensorBoard). A failing log (disk full, a broken tracker) is
        reported once and training goes on: the checkpoints, not the logs, hold the run."""
        acc = self.accelerator
        if not acc.is_main_process:
            return
        try:
            acc.log({f"train/{k}": v for k, v in terms.items()}, step=self.step)
            with open(log_file, "a") as handle:
                handle.write(json.dumps({"step": self.step, **terms}) + "\n")
        except (OSError, RuntimeError, ValueError) as err:
            if not self._log_failed:
                print(f"warning: step {self.step}: could not write the training log ({type(err).__name__}: {err}); "
                      f"training goes on, checkpoints are unaffected (further log failures are not reported)",
                      file=sys.stderr)
            self._log_failed = True

    def _loop(self, end: int, batch_iter, bar, log_file: Path, interrupted) -> None:
        acc = self.accelerator
        cfg = self.cfg
        window_start, window_images = time.perf_counter(), 0
        while self.step < end and not self._agreed(interrupted()):
            terms = self.train_step(batch_iter)
            window_images += cfg.batch_size
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                terms["images_per_s"] = window_images / max(elapsed, 1e-9)
                window_start, window_images = time.perf_counter(), 0
                self._log(log_file, terms)
            bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{terms['lr']:.2e}", refresh=False)
            bar.update(1)
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
            if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.max_steps:
                if acc.is_main_process:
                    self.write_sample_grid(f"step-{self.step:07d}")


@contextlib.contextmanager
def _stop_on_interrupt():
    """Within the block, the first SIGINT only raises a flag (read by calling the yielded function)
    so the loop can finish its step and checkpoint; a second SIGINT interrupts at once."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["stop"]
    finally:
        signal.signal(signal.SIGINT, previous)


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a run resumes from) and any line a
    kill cut short."""
    if not log_file.is_file():
        return
    lines = log_file.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or not ours
            continue
    if len(kept) != len(lines):
        atomic_write_text(log_file, "".join(line + "\n" for line in kept))


def _comparable(recipe: Recipe) -> dict:
    """The recipe as it reads back from its saved YAML (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _what_trains(recipe_dict: dict) -> dict:
    """A saved recipe without its ``sample`` section: sampling defaults do not change trained weights,
    so a finished tokenizer stays reusable when only they differ (or when zoo gains a sampling option)."""
    return {key: value for key, value in recipe_dict.items() if key != "sample"}


def train(recipe: Recipe, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True) -> Path:
    """Train ``recipe`` into ``run_dir``; returns the path of the final sample (or reconstruction) grid."""
    return Trainer(recipe, run_dir, resume=resume, progress=progress).fit()
