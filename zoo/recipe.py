"""Recipes: YAML files that pick a generator, tokenizer, objective and dataset, and set training.

A recipe has the sections ``model``, ``tokenizer``, ``objective``, ``data`` (each with a ``name``
from the registry plus that component's config fields), ``train`` (:class:`TrainConfig`) and
``sample`` (:class:`SampleConfig`). ``key.path=value`` overrides apply on top. Everything is
validated before any work starts; errors name the file, the key path and what is allowed.

Two further shapes:

- a **tokenizer recipe** has no ``model`` (and no ``objective``): ``zoo-train`` trains the
  tokenizer itself (it must be trainable, e.g. ``msvq``);
- a generator recipe's ``tokenizer`` section may be ``{from: REF}`` instead of a name: REF is a
  tokenizer recipe (``*.yaml``, trained first into ``RUN_DIR/tokenizer`` or reused from there), a
  model or run directory, or a Hugging Face Hub repo id whose ``config.json`` has a tokenizer.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from zoo.config import ConfigError, build_config, config_to_dict, suggest
from zoo.fit import Fit, FitError
from zoo.io import read_model_config
from zoo.registry import Entry, get_entry

COMPONENT_SECTIONS = {"model": "generator", "tokenizer": "tokenizer", "objective": "objective", "data": "dataset"}
SECTIONS = (*COMPONENT_SECTIONS, "train", "sample")


@dataclasses.dataclass
class TrainConfig:
    """The ``train`` section."""

    seed: int = 0
    batch_size: int = 256  # global batch, summed over processes and accumulation steps
    grad_accum_steps: int = 1
    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.0  # never applied to norms, biases, embeddings or position tables
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # Learning-rate multipliers by parameter-name pattern, first match wins, e.g. {"y_embedder.*": 0.1}.
    lr_scale: dict[str, float] = dataclasses.field(default_factory=dict)
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    # A NaN/inf loss term or gradient: "stop" the run (the last checkpoint stays the latest), or "skip"
    # the step (nothing applied, counted in metrics.jsonl and the checkpoint) until this many in a row.
    nonfinite: str = "stop"
    nonfinite_max_skips: int = 10
    ema_decay: float = 0.9999
    mixed_precision: str = "no"
    compile: str = "none"  # torch.compile mode of the generator
    # Recompute each transformer block's activations in the backward pass (torch.utils.checkpoint):
    # the same gradients for about one more forward pass, and the memory of one block's activations.
    checkpoint_activations: bool = False
    # On a CPU (glibc): large freed blocks go back to the system at once instead of into a heap that
    # only grows, so the resident memory follows the live tensors (MeanFlow at the seed's MNIST size,
    # checkpointed: peak 4.6 -> 2.3 GB) at the cost of re-faulting them (that step 1.5x slower).
    return_freed_memory: bool = False
    allow_tf32: bool = True  # TF32 matmuls on NVIDIA GPUs, as DiT's train.py sets; no effect on a CPU
    num_workers: int = 0
    # Encode the dataset once (each item in each augmentation variant) with the frozen tokenizer and
    # train from RUN_DIR/token_cache.npy (memory-mapped) instead of encoding every step (same inputs).
    cache_tokens: bool = False
    log_every: int = 50
    sample_every: int = 0  # steps between sample grids; 0: only at the end
    ckpt_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    tensorboard: bool = True

    CHOICES = {
        "lr_schedule": ("constant", "cosine"),
        "mixed_precision": ("no", "fp16", "bf16"),
        "compile": ("none", "default", "reduce-overhead", "max-autotune"),
        "nonfinite": ("stop", "skip"),
    }

    def __post_init__(self):
        positive = ("batch_size", "grad_accum_steps", "max_steps", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "ckpt_every", "num_workers", "nonfinite_max_skips"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by "
                              f"grad_accum_steps {self.grad_accum_steps}")


@dataclasses.dataclass
class SampleConfig:
    """The ``sample`` section: defaults for sample grids during training and for ``zoo-sample``."""

    sampler: str = "ddpm"
    steps: int = 250
    cfg_scale: float = 4.0
    eta: float = 0.0  # DDIM noise
    clip_denoised: bool = False
    num: int = 100  # images in the end-of-training grid
    labels: str = "all"  # "all" cycles through the classes, or a comma list "0,3,7"
    seed: int = 0
    batch_size: int = 64
    top_k: int = 0  # VAR: keep the k most likely tokens (0 = all)
    top_p: float = 0.0  # VAR: keep the smallest set of tokens with this much probability (0 = all)
    more_smooth: bool = False  # VAR: Gumbel-softmax blending of embeddings (smoother, less faithful)
    mean_tokens: bool = False  # VAR-SR: add each scale's expected code vector (posterior mean: best PSNR)
    refine: bool = True  # VAR-SR: run the diffusion refiner (when the model has one)
    tile_overlap: int | None = None  # VAR-SR (zoo-upscale): LR tile overlap in pixels; None: a quarter tile
    self_ensemble: int = 1  # VAR-SR (zoo-upscale): average over 1, 2, 4 or 8 flipped/rotated copies
    back_projection: int = 0  # VAR-SR (zoo-upscale): steps of back-projection onto the LR image (0 = off)
    num_iter: int = 64  # MAR: unmasking iterations
    cfg_schedule: str = "linear"  # MAR: guidance rising with the unmasked fraction, or constant
    temperature: float = 1.0  # MAR, VAR-SR's refiner: noise scale of the per-token diffusion sampler

    CHOICES = {"cfg_schedule": ("linear", "constant")}

    def __post_init__(self):
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in [0, 1] (0 disables it), got {self.top_p}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0: a diffusion head's or refiner's noise-free path), "
                              f"got {self.temperature}")
        if self.self_ensemble not in (1, 2, 4, 8):
            raise ConfigError(f"self_ensemble must be 1, 2, 4 or 8 (flips, then rotations), got {self.self_ensemble}")
        if self.back_projection < 0:
            raise ConfigError(f"back_projection must be >= 0 steps (0 = off), got {self.back_projection}")
        if self.tile_overlap is not None and self.tile_overlap < 0:
            raise ConfigError(f"tile_overlap must be >= 0 (or null for a quarter tile), got {self.tile_overlap}")
        for name in ("steps", "num", "batch_size", "num_iter"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass
class Component:
    """A resolved ``model``/``tokenizer``/``objective``/``data`` section."""

    name: str
    entry: Entry
    config: Any

    def build(self, **extra):
        return self.entry.build(self.config, **extra)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **config_to_dict(self.config)}


@dataclasses.dataclass
class TokenizerSource:
    """Where a generator recipe's tokenizer weights come from (``tokenizer: {from: REF}``)."""

    ref: str  # as written in the recipe
    kind: str  # "recipe" (train it first), "model_dir" (a local directory) or "hub" (a repo id)
    path: str  # the resolved recipe file or directory; the repo id for "hub"
    recipe: Recipe | None = None  # the tokenizer recipe, for kind "recipe"


@dataclasses.dataclass
class Recipe:
    source: str  # file the recipe came from, for messages
    model: Component | None  # None: a tokenizer recipe (the tokenizer is what gets trained)
    tokenizer: Component
    objective: Component | None  # None: the generator uses no objective (VAR), or a tokenizer recipe
    data: Component
    train: TrainConfig
    sample: SampleConfig
    tokenizer_source: TokenizerSource | None = None

    @property
    def trains_tokenizer(self) -> bool:
        return self.model is None

    def where(self, key: str) -> str:
        return f"{self.source}: {key}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.model is not None:
            out["model"] = self.model.to_dict()
        if self.tokenizer_source is not None:
            # The resolved path, so the saved recipe reads back from any working directory.
            ref = self.tokenizer_source.path
            out["tokenizer"] = {"from": ref if self.tokenizer_source.kind == "hub" else str(Path(ref).resolve())}
        else:
            out["tokenizer"] = self.tokenizer.to_dict()
        if self.objective is not None:
            out["objective"] = self.objective.to_dict()
        out["data"] = self.data.to_dict()
        out["train"] = config_to_dict(self.train)
        out["sample"] = config_to_dict(self.sample)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the fully resolved recipe (every default spelled out) atomically."""
        from zoo.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value is read as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. train.lr=3e-4")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"override {text!r}: the key must name a section and a field, e.g. train.lr")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections {list(SECTIONS)}")
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where, what, and what it was parsing."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    during = f" ({context} started at line {context_mark.line + 1})" if context and context_mark else ""
    return f"{where}{problem}{during}"


def _component(kind: str, section: str, values: dict[str, Any], source: str) -> Component:
    values = dict(values)
    name = str(values.pop("name"))
    entry = get_entry(kind, name, where=f"{source}: {section}.name")
    return Component(name, entry, entry.make_config(values, where=f"{source}: {section}"))


def _section(raw: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    values = raw.get(section)
    if not isinstance(values, dict) or "name" not in values:
        raise ConfigError(f"{source}: {section}.name: missing; every recipe names its "
                          f"{COMPONENT_SECTIONS[section]} (see `zoo-train --list-models`)")
    return values


FetchConfig = Callable[[str], dict[str, Any]]  # Hub repo id -> its config.json (zoo.hub.read_hub_config)


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>", *, fetch_config: FetchConfig | None = None,
                     _seen: tuple[str, ...] = ()) -> Recipe:
    """Validate a recipe mapping and resolve every section to its typed config.

    ``fetch_config`` reads the ``config.json`` of a Hub repo named by ``tokenizer.from`` (this layer
    knows nothing of the Hub; ``zoo-train`` passes :func:`zoo.hub.read_hub_config`)."""
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{source}: {section}: unknown section{suggest(section, SECTIONS)} "
                              f"(allowed: {', '.join(SECTIONS)})")
    model = None
    if raw.get("model") is not None:
        model = _component("generator", "model", _section(raw, "model", source), source)
    tokenizer_values = raw.get("tokenizer")
    tokenizer_source = None
    if isinstance(tokenizer_values, dict) and "from" in tokenizer_values:
        if model is None:
            raise ConfigError(f"{source}: tokenizer.from: a tokenizer recipe trains its tokenizer and cannot take "
                              f"it from elsewhere; name it (tokenizer.name) and give its fields")
        extra = sorted(k for k in tokenizer_values if k != "from")
        if extra:
            raise ConfigError(f"{source}: tokenizer: with 'from' the tokenizer's name and fields come from "
                              f"{tokenizer_values['from']!r}; remove {extra}")
        tokenizer_source, tokenizer_values = resolve_tokenizer_source(str(tokenizer_values["from"]), source, _seen,
                                                                      fetch_config)
    tokenizer = _component("tokenizer", "tokenizer", _section({"tokenizer": tokenizer_values}, "tokenizer", source),
                           source)
    objective = None
    objectives = getattr(model.entry.builder, "OBJECTIVES", None) if model is not None else ()
    if raw.get("objective") is not None:
        if objectives == ():
            what = f"generator {model.name!r} uses" if model is not None else "a tokenizer recipe has"
            raise ConfigError(f"{source}: objective: {what} no objective; remove the section")
        objective = _component("objective", "objective", _section(raw, "objective", source), source)
    elif objectives != ():
        default = getattr(model.entry.builder, "DEFAULT_OBJECTIVE", {"name": "gaussian"})
        objective = _component("objective", "objective", dict(default), source)
    data = _component("dataset", "data", _section(raw, "data", source), source)
    for section in ("train", "sample"):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: {section}: expected a mapping of fields")
    train = build_config(TrainConfig, raw.get("train"), where=f"{source}: train")
    sample = build_config(SampleConfig, raw.get("sample"), where=f"{source}: sample")
    recipe = Recipe(source, model, tokenizer, objective, data, train, sample, tokenizer_source)
    validate_combination(recipe)
    return recipe


def resolve_tokenizer_source(ref: str, source: str, seen: tuple[str, ...] = (),
                             fetch_config: FetchConfig | None = None):
    """``tokenizer.from`` -> (TokenizerSource, the tokenizer section ``{name, fields}``) without building it."""
    where = f"{source}: tokenizer.from"
    candidates = [Path(ref)] if Path(ref).is_absolute() else [Path(source).parent / ref, Path(ref)]
    local = next((c for c in candidates if c.exists()), None)
    if ref.endswith((".yaml", ".yml")):
        if local is None or not local.is_file():
            raise ConfigError(f"{where}: tokenizer recipe {ref!r} not found (looked in "
                              f"{', '.join(str(c) for c in candidates)})")
        key = str(local.resolve())
        if key in seen:
            raise ConfigError(f"{where}: {ref!r} refers back to itself")
        sub = recipe_from_dict(read_yaml(local), source=str(local), fetch_config=fetch_config, _seen=(*seen, key))
        if not sub.trains_tokenizer:
            raise ConfigError(f"{where}: {local} is a generator recipe; 'from' takes a tokenizer recipe (one "
                              f"without a model section), a model directory or a Hub repo id")
        return TokenizerSource(ref, "recipe", str(local), sub), sub.tokenizer.to_dict()
    if local is not None:
        if not local.is_dir():
            raise ConfigError(f"{where}: {local} is a file; give a tokenizer recipe (.yaml) or a model directory")
        config = read_model_config(local)
        kind = "model_dir"
        path = str(local)
    elif ref.count("/") == 1 and not ref.startswith((".", "/")):
        if fetch_config is None:
            raise ConfigError(f"{where}: {ref!r} is a Hub repo id, and this recipe was loaded without a way to "
                              f"fetch its config.json: load it with fetch_config=zoo.hub.read_hub_config (as "
                              f"zoo-train does)")
        try:
            config = fetch_config(ref)
        except (ConfigError, FileNotFoundError) as err:
            raise ConfigError(f"{where}: {err}") from None
        kind = "hub"
        path = ref
    else:
        raise ConfigError(f"{where}: {ref!r} is neither a tokenizer recipe (.yaml), an existing directory nor a "
                          f"Hub repo id (org/name)")
    section = config.get("tokenizer")
    if not isinstance(section, dict) or "name" not in section:
        raise ConfigError(f"{where}: the config.json of {ref!r} describes no tokenizer")
    return TokenizerSource(ref, kind, path), section


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, *,
                fetch_config: FetchConfig | None = None) -> Recipe:
    """Read, override and validate the recipe at ``path``; raises :class:`ConfigError`. An error in a
    value set by an override says so (the key is not in the file). ``fetch_config``: see
    :func:`recipe_from_dict`."""
    overrides = list(overrides or [])
    raw = apply_overrides(read_yaml(path), overrides)
    try:
        return recipe_from_dict(raw, source=str(path), fetch_config=fetch_config)
    except ConfigError as err:
        culprit = next((o for o in overrides if f": {o.split('=', 1)[0].strip()}" in str(err)), None)
        if culprit is None:
            raise
        raise ConfigError(f"{err} (set on the command line by {culprit!r})") from None


def validate_combination(recipe: Recipe) -> None:
    """Check that the chosen components fit together: generic rules, then the generator's own
    ``check_fit(config, fit)`` on a plain description of the rest (:class:`zoo.fit.Fit`)."""
    if recipe.model is None:
        tokenizer_cls = recipe.tokenizer.entry.builder
        if not getattr(tokenizer_cls, "trainable", False):
            raise ConfigError(f"{recipe.where('tokenizer.name')}: a recipe without a model section trains its "
                              f"tokenizer, but {recipe.tokenizer.name!r} cannot be trained by zoo-train")
        data, tok = data_info(recipe), tokenizer_info(recipe)
        if "channels" in data and tok.get("image_channels") not in (None, data["channels"]):
            raise ConfigError(f"{recipe.where('tokenizer.image_channels')}: {tok['image_channels']}, but the "
                              f"dataset gives {data['channels']}-channel images")
        return
    generator_cls = recipe.model.entry.builder
    objectives = getattr(generator_cls, "OBJECTIVES", None)
    if objectives and recipe.objective.name not in objectives:
        raise ConfigError(f"{recipe.where('objective.name')}: {recipe.objective.name!r} does not work with "
                          f"generator {recipe.model.name!r}; allowed: {', '.join(objectives)}")
    tokenizer_cls = recipe.tokenizer.entry.builder
    wanted_kind = getattr(generator_cls, "TOKENIZER_KIND", "continuous")
    if getattr(tokenizer_cls, "kind", "continuous") != wanted_kind:
        raise ConfigError(f"{recipe.where('tokenizer.name')}: {recipe.tokenizer.name!r} gives "
                          f"{tokenizer_cls.kind} tokens but {recipe.model.name!r} needs a {wanted_kind} tokenizer")
    samplers = getattr(recipe.objective.entry.builder, "SAMPLERS", None) if recipe.objective else None
    takes_sampler = "sampler" in inspect.signature(generator_cls.sample).parameters
    if samplers and takes_sampler and recipe.sample.sampler not in samplers:
        raise ConfigError(f"{recipe.where('sample.sampler')}: {recipe.sample.sampler!r} does not work with objective "
                          f"{recipe.objective.name!r}; allowed: {', '.join(samplers)}")
    check = getattr(generator_cls, "check_fit", None)
    if check is not None:
        try:
            check(recipe.model.config, describe_fit(recipe))
        except FitError as err:
            raise ConfigError(f"{recipe.where(err.key)}: {err.message}") from None


def describe_fit(recipe: Recipe) -> Fit:
    """What the generator of ``recipe`` must fit, as plain values (nothing is built or loaded)."""
    objective = recipe.objective
    return Fit(tokenizer_name=recipe.tokenizer.name, tokenizer=tokenizer_info(recipe),
               tokenizer_config=recipe.tokenizer.config, data_name=recipe.data.name, data=data_info(recipe),
               objective_name=objective.name if objective else None,
               objective_config=objective.config if objective else None,
               objective_predicts_variance=getattr(objective.entry.builder, "predicts_variance", None)
               if objective else None,
               cache_tokens=recipe.train.cache_tokens)


def data_info(recipe: Recipe) -> dict[str, Any]:
    """What the dataset section promises without loading data: image_size, channels, num_classes (None if unknown)."""
    describe = getattr(recipe.data.entry.builder, "describe", None)
    return describe(recipe.data.config) if describe is not None else {}


def tokenizer_info(recipe: Recipe) -> dict[str, Any]:
    """latent_channels and downsample of the tokenizer section, without building it."""
    return recipe.tokenizer.entry.builder.describe(recipe.tokenizer.config)
