"""``zoo-compare``'s library side: put model/run directories of any families side by side.

Everything goes through the generator interface (:class:`~zoo.pipeline.Pipeline`, ``generator.loss``,
``tokenizer.training_inputs``) and generic torch tools (forward hooks, ``FlopCounterMode``), so a new
family is compared without changes here. Every model gets the same labels, seed and budget.

Output folder::

    grid.png        a row per model, a column per label (same seed and labels)
    losses.png      training-loss curves of the runs (from RUN_DIR/metrics.jsonl)
    table.md        the table in Markdown, table.json the same numbers unrounded
    report.html     all of it on one page (images embedded)
    samples/NAME.npz  the evaluation samples (ADM layout); samples/NAME.work/ the resumable batches
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from zoo.eval.evaluate import (
    default_metrics,
    evaluate_pipeline,
    json_ready,
    parse_metrics,
    refuse_image_conditioned,
    sample_identity,
)
from zoo.eval.measure import measure_isolated, measure_model
from zoo.eval.report import comparison_grid, html_report, loss_plot, markdown_table, read_loss_log
from zoo.io import atomic_write, atomic_write_json, atomic_write_text
from zoo.progress import progress_bar
from zoo.rundir import TOKENIZER_SUBDIR, recorded_train_seconds

__all__ = ["compare", "COLUMNS"]

COLUMNS = [
    ("name", "model"), ("generator", "generator"), ("sampling_summary", "sampling"), ("params_M", "params (M)"),
    ("tokenizer_params_M", "tokenizer (M)"),
    ("nfe_per_image", "NFE / image"), ("gflops_per_nfe", "GFLOPs / NFE"), ("gflops_per_image", "GFLOPs / image"),
    ("sample_images_per_s", "sampling img/s"), ("train_images_per_s", "training img/s"),
    ("train_batch", "train batch"), ("sample_peak_mb", "sampling peak MB"), ("train_peak_mb", "training peak MB"),
    ("final_loss", "final train loss"), ("train_steps_logged", "steps trained"),
    ("train_minutes", "train min"),
]
METRIC_COLUMNS = [("agreement", "agreement"), ("fd_digits", "FD (digits clf)"),
                  ("fd_digits_floor", "FD floor (real halves)"), ("fid", "FID"), ("isc", "IS"),
                  ("precision", "precision"), ("recall", "recall")]


def _unique_names(models: list[str], names: list[str] | None) -> list[str]:
    if names:
        if len(names) != len(models):
            raise ValueError(f"--names: {len(names)} names for {len(models)} models")
        return list(names)
    out, seen = [], {}
    for model in models:
        base = Path(model).resolve().name or str(model)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def _column_labels(labels: str, num_classes: int | None, where: str) -> torch.Tensor:
    """One label per grid column: every class for ``"all"``, else the listed ones (checked against the model)."""
    from zoo.pipeline import parse_labels

    count = num_classes if labels == "all" else len([v for v in str(labels).split(",") if v.strip()])
    try:
        return parse_labels(labels, count or 0, num_classes)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def compare(models: list[str | os.PathLike], *, out: str | os.PathLike = "compare", names: list[str] | None = None,
            labels: str = "all", seed: int = 0, num: int = 200, batch_size: int = 64, metrics=None, ref=None,
            inception_weights=None, train_steps: int = 3, train_batch: int | None = None,
            device: str | None = None, weights: str = "ema",
            isolate: bool = True, progress: bool = True) -> dict:
    """Compare ``models`` (model or run directories); writes the folder described in the module docstring
    and returns ``{"rows": [...], "files": {...}}``.

    ``num`` images per model are sampled for the quality metrics (0: none), ``batch_size`` at a
    time, the same batch also timing sampling; ``train_steps`` timed optimizer steps (0: no
    training speed) of ``train_batch`` images (default: each run's recipe batch); ``isolate``
    measures costs in a fresh process per model (fair peak memory).
    """
    from zoo.hub.model_dir import load_model_dir, read_model_config

    if not models:
        raise ValueError("zoo-compare needs at least one model or run directory")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names([str(m) for m in models], names)
    requested = parse_metrics(metrics)
    configs = [read_model_config(m) for m in models]
    for model, config in zip(models, configs):
        if "generator" not in config:
            raise ValueError(f"{model}: a tokenizer's directory; zoo-compare compares generators (score a tokenizer "
                             f"with zoo-eval --metrics psnr,ssim)")
        refuse_image_conditioned(config, str(model))

    rows, grid_rows, curves, notes, sample_files = [], [], {}, [], []
    column_labels = None
    for model, name, config in progress_bar(list(zip(models, names, configs)), desc="comparing", unit="model",
                                            enabled=progress):
        started = time.perf_counter()
        pipe = load_model_dir(model, weights=weights, device=device)
        grid_labels = _column_labels(labels, pipe.num_classes, where=str(model))
        if column_labels is not None and grid_labels.tolist() != column_labels:
            raise ValueError(f"{model}: --labels {labels} gives it the columns {grid_labels.tolist()}, but "
                             f"{models[0]} {column_labels}; name the labels, e.g. --labels 0,1,2")
        column_labels = grid_labels.tolist()
        grid_rows.append(pipe.generate(grid_labels, seed=seed, batch_size=len(grid_labels)))
        sampling = {k: v for k, v in pipe.sampling_kwargs().items() if k not in ("progress", "noise")}
        row = {"name": name, "model_dir": str(model), "generator": config["generator"].get("name"),
               "sampling": sampling, "sampling_summary": ", ".join(f"{k}={v}" for k, v in sampling.items())}
        wanted = requested if requested is not None else default_metrics(config, ref=ref,
                                                                          inception_weights=inception_weights)
        if num > 0 and wanted:
            report = evaluate_pipeline(
                pipe, config, num=num, labels=labels, seed=seed, batch_size=batch_size, metrics=wanted, ref=ref,
                inception_weights=inception_weights, work_dir=out / "samples" / f"{_safe(name)}.work",
                save_npz=out / "samples" / f"{_safe(name)}.npz", progress=progress, device=device,
                identity=sample_identity(model, weights), where=str(model))
            row.update(report["metrics"])
            sample_files.append(Path(report["samples"]))
            row["quality_num"] = num
        del pipe
        options = dict(labels=column_labels, seed=seed, sample_batch=batch_size, train_steps=train_steps,
                       train_batch=train_batch, device=device, weights=weights)
        costs = measure_isolated(model, threads=torch.get_num_threads(), **options) if isolate else \
            measure_model(model, **options)
        row.update(costs)
        row["params_M"] = costs["params"] / 1e6
        row["tokenizer_params_M"] = costs["tokenizer_params"] / 1e6
        log = read_loss_log(model)
        if log:
            curves[name] = log
            row["final_loss"] = log[-1][1]
            row["train_steps_logged"] = log[-1][0]
        row.update(_train_minutes(model))
        row["seconds"] = time.perf_counter() - started
        rows.append(row)

    metric_columns = [c for c in METRIC_COLUMNS if any(c[0] in r for r in rows)]
    columns = COLUMNS[:-3] + metric_columns + COLUMNS[-3:]
    files = {}
    grid, _ = comparison_grid(grid_rows, names, [str(v) for v in column_labels])
    files["grid"] = out / "grid.png"
    atomic_write(files["grid"], lambda tmp: grid.save(tmp, format="PNG"))
    images = [(f"Samples: a row per model, a column per label (seed {seed})", files["grid"])]
    if curves:
        files["losses"] = loss_plot(curves, out / "losses.png")
        images.append(("Training loss (each family's own objective: compare shapes, not values)", files["losses"]))
    missing = [r["name"] for r in rows if r["name"] not in curves]
    if missing:
        notes.append(f"No training log (metrics.jsonl) for {', '.join(missing)}: not a run directory.")
    notes += _method_notes(rows, num=num, batch_size=batch_size, train_steps=train_steps, seed=seed, isolate=isolate)
    files["table_md"] = out / "table.md"
    atomic_write_text(files["table_md"], markdown_table(rows, columns) + "\n" + "".join(f"- {n}\n" for n in notes))
    files["table_json"] = out / "table.json"
    atomic_write_json(files["table_json"], json_ready({"rows": rows, "labels": column_labels, "seed": seed,
                                                       "notes": notes}))
    links = [files["table_md"], files["table_json"], files["grid"], *([files["losses"]] if curves else []),
             *sample_files]
    files["html"] = html_report(out / "report.html", title="zoo: model comparison", rows=rows, columns=columns,
                                images=images, notes=notes, links=links)
    return {"rows": rows, "files": {k: str(v) for k, v in files.items()}}


def _train_minutes(model: str | os.PathLike) -> dict:
    """``train_minutes``: the wall time a run directory's checkpoints record, plus that of the tokenizer
    the run trained first into RUN_DIR/tokenizer (``tokenizer_train_minutes``); nothing for a model directory."""
    generator = recorded_train_seconds(model)
    if generator is None:
        return {}
    tokenizer = recorded_train_seconds(Path(model) / TOKENIZER_SUBDIR)
    out = {"train_minutes": (generator + (tokenizer or 0.0)) / 60}
    if tokenizer is not None:
        out["tokenizer_train_minutes"] = tokenizer / 60
    return out


def _method_notes(rows, *, num: int, batch_size: int, train_steps: int, seed: int, isolate: bool) -> list[str]:
    device = rows[0].get("device", "cpu")
    threads = rows[0].get("threads")
    notes = [
        f"Device {device}" + (f", {threads} torch threads" if threads else "") + "; every model measured the same "
        "way, one after the other (timings vary between runs, more so on a shared machine: compare numbers "
        "from one call).",
        "NFE / image: forward calls of the weights that make up most of the generator during one sample call "
        "(parameter-weighted median of per-module call counts; a guided step on a doubled batch counts once).",
        "GFLOPs: torch.utils.flop_counter over one sample call, per image (guidance's doubled batch included), "
        "tokenizer decode excluded; GFLOPs / NFE = GFLOPs / image ÷ NFE.",
        f"Sampling img/s: one Pipeline.generate call on {batch_size} images (decode included) after a warm-up.",
        f"Training img/s: mean of {train_steps} optimizer steps (tokenizer inputs, loss, backward, AdamW) on random "
        "images, with the run's train section (batch, clipping, precision) where recipe.yaml exists.",
        "Peak memory: " + (rows[0].get("memory_method") or "") + ", above the level when the measurement "
        "began" + (", each model in a fresh process." if isolate else " (all models in one process: a later model "
                   "may reuse memory an earlier one freed, so its peak can read low)."),
    ]
    if any("train_minutes" in r for r in rows):
        notes.append("Train min: the wall time the run's latest checkpoint records for its steps (all sessions, set-up "
                     "included, work lost to a kill not), plus the tokenizer the run trained first, as it was "
                     "measured on the machine that trained it.")
    if num:
        notes.append(f"Quality: {num} samples per model (labels cycled, seed {seed}); the digits classifier's "
                     f"Fréchet distance depends on the sample count, so compare only at equal counts.")
    return notes
