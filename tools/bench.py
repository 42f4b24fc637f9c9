"""Training and sampling speed (and peak memory) of a recipe's generator: a benchmark, not a test.

    python tools/bench.py RECIPE [key.path=value ...] [--batch-size 8] [--steps 5] [--what train,sample,cfg]
    python tools/bench.py --compare RECIPE 'RECIPE key=value' ... [--rounds 3] [--what train]   # speed ratios
    python tools/bench.py RECIPE --against ~/src/DiT [--what train,sample] [--variants official,zoo]

It times what the trainer and sampler do, on random latents of the generator's input shape (for a
generator on a discrete tokenizer, VAR, on random images through the recipe's tokenizer, whose
weights do not change its speed):

- train: one optimizer step = loss (noise, forward, loss terms) + backward (+ clipping if the
  recipe clips) + AdamW, as in training,
  also expressed in network forward passes at the same batch; for VAR the step starts from images
  (``tokenizer.training_inputs``: VQ-VAE encoder, quantiser, teacher-forcing input) as the official
  trainer does, and the tokenizer's share is reported;
- cfg: one guided network evaluation (``forward_with_cfg``) on ``--cfg-batch`` inputs, where the
  generator has one (DiT);
- sample: a full ``generator.sample`` call with the recipe's sampling settings (VAR: KV-cached,
  then the tokenizer's decoder, timed apart).

Each measurement runs in a fresh subprocess so that its peak memory (RSS on a CPU, allocated
memory on a GPU) is its own. These machines are noisy: compare only runs made back to back.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time

import torch


def build(recipe_path: str, overrides: list[str]):
    from zoo.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if recipe.model is None:
        raise SystemExit(f"{recipe_path}: a tokenizer recipe; tools/bench.py measures generators")
    objective = recipe.objective.build() if recipe.objective is not None else None
    generator = recipe.model.build(objective=objective)
    return recipe, generator


def discrete(generator) -> bool:
    return getattr(generator, "TOKENIZER_KIND", "continuous") == "discrete"


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args) -> dict:
    from zoo.optim import make_optimizer

    torch.manual_seed(0)
    recipe, generator = build(args.recipe, args.overrides)
    device = args.device
    generator.to(device)
    if recipe.train.checkpoint_activations:  # as the trainer sets it
        generator.checkpoint_activations = True
    if recipe.train.return_freed_memory and device == "cpu":
        from zoo.train.memory import fix_mmap_threshold

        fix_mmap_threshold()
    if args.compile != "none":
        generator.compile(mode=args.compile)
    tokenizer = None
    if discrete(generator):
        from zoo.recipe import data_info

        tokenizer = recipe.tokenizer.build().to(device).eval().requires_grad_(False)
        side = data_info(recipe)["image_size"]
        shape = (tokenizer.config.image_channels, side, side)  # images in, as the trainer feeds them
    else:
        shape = generator.latent_shape
    num_classes = getattr(generator, "num_classes", 1)
    result = {"what": args.child, "model": recipe.model.name, "latent_shape": list(shape),
              "params_M": round(sum(p.numel() for p in generator.parameters()) / 1e6, 2),
              "threads": torch.get_num_threads(), "device": device, "compile": args.compile,
              "checkpoint_activations": recipe.train.checkpoint_activations,
              "return_freed_memory": recipe.train.return_freed_memory}

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if args.child == "train":
        batch = args.batch_size or recipe.train.batch_size
        generator.train()
        optimizer, _ = make_optimizer(generator, recipe.train)
        latents = torch.randn(batch, *shape, device=device)
        if tokenizer is not None:
            latents = latents.clamp(-1, 1)
        labels = torch.randint(0, num_classes, (batch,), device=device)
        tokenizer_seconds = []
        cached = None
        if tokenizer is not None and args.cache_tokens:
            with torch.no_grad():
                cached = tokenizer.cache_inputs(latents)
            result["cache_tokens"] = True

        def step():
            inputs = latents
            if tokenizer is not None:
                sync()
                start = time.perf_counter()
                with torch.no_grad():
                    inputs = (tokenizer.training_inputs(latents) if cached is None
                              else tokenizer.inputs_from_cache(cached))
                sync()
                tokenizer_seconds.append(time.perf_counter() - start)
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
                loss = generator.loss(inputs, labels)["loss"]
            loss.backward()
            if recipe.train.grad_clip > 0:  # as the trainer does
                torch.nn.utils.clip_grad_norm_(generator.parameters(), recipe.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        sync()
        tokenizer_seconds.clear()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds = (time.perf_counter() - start) / args.steps
        result.update(batch=batch, seconds_per_step=round(seconds, 4), images_per_s=round(batch / seconds, 2))
        if tokenizer_seconds:
            result["tokenizer_seconds_per_step"] = round(sum(tokenizer_seconds) / len(tokenizer_seconds), 4)
        params = inspect.signature(generator.sample).parameters
        if "steps" in params:
            # One network evaluation at the same batch (a 1-step, unguided sample), to express the
            # step's cost in forward passes (a MeanFlow step pays for a JVP and a guided target).
            generator.eval()
            one_step = {k: v for k, v in {"steps": 1, "cfg_scale": 1.0}.items() if k in params}
            with torch.no_grad():
                generator.sample(labels, **one_step)
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    generator.sample(labels, **one_step)
                sync()
            forward = (time.perf_counter() - start) / args.steps
            result.update(seconds_per_forward=round(forward, 4), step_in_forward_passes=round(seconds / forward, 2))
    elif args.child == "cfg":
        if not hasattr(generator, "forward_with_cfg"):
            return {**result, "skipped": "generator has no forward_with_cfg"}
        batch = args.cfg_batch
        generator.eval()
        x = torch.randn(batch, *shape, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        y = torch.cat([torch.randint(0, num_classes, (batch // 2,)), torch.full((batch - batch // 2,), num_classes)])
        with torch.no_grad():
            for _ in range(args.warmup):
                generator.forward_with_cfg(x, t, y.to(device), 4.0)
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                generator.forward_with_cfg(x, t, y.to(device), 4.0)
            sync()
        seconds = (time.perf_counter() - start) / args.steps
        result.update(batch=batch, seconds_per_call=round(seconds, 4))
    elif args.child == "sample":
        from zoo.pipeline import Pipeline

        batch = args.sample_batch or recipe.sample.batch_size
        generator.eval()
        pipe = Pipeline(generator, torch.nn.Identity(), recipe.sample, num_classes=num_classes, image_size=None)
        pipe.tokenizer.decode = lambda z: z
        kwargs = pipe.sampling_kwargs()
        if tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        labels = torch.arange(batch) % max(1, num_classes)
        gen = torch.Generator(device=device).manual_seed(0)
        warm = {**kwargs, "steps": 2} if "steps" in kwargs else kwargs
        with torch.no_grad():
            generator.sample(labels[:2].to(device), generator=gen, **warm)  # warm-up
            sync()
            start = time.perf_counter()
            latents = generator.sample(labels.to(device), generator=gen, **kwargs)
            sync()
            seconds = time.perf_counter() - start
            decode = None
            if tokenizer is not None:
                start = time.perf_counter()
                tokenizer.decode(latents)
                sync()
                decode = time.perf_counter() - start
        kwargs.pop("tokenizer", None)
        result.update(batch=batch, sampling=kwargs, seconds_per_batch=round(seconds, 3),
                      images_per_s=round(batch / seconds, 3))
        if decode is not None:
            result.update(decode_seconds=round(decode, 3), seconds_per_batch_with_decode=round(seconds + decode, 3))
    result["peak_memory_MB"] = round(peak_memory_mb(device), 1)
    return result


def measure_sr(args) -> dict:
    """VAR-SR (``--sr``): ``train`` times one optimizer step from HR images and LR conditions (the
    generator's ``training_inputs`` through the tokenizer, loss with the refiner, backward, AdamW);
    ``sample`` times ``zoo.upscale.SRModel.upscale`` (what zoo-upscale runs: tiles, blending and the
    self-ensemble) on a random ``--sr-side``-pixel LR image with the recipe's sampling settings and
    reports seconds per megapixel of output."""
    from zoo.optim import make_optimizer

    recipe, generator = build(args.recipe, args.overrides)
    device = args.device
    tokenizer = recipe.tokenizer.build().to(device).eval()
    generator.to(device).attach_tokenizer(tokenizer)
    data = recipe.data.config
    side, scale = data.image_size, data.scale
    torch.manual_seed(0)
    timings = []
    if args.child == "train":
        batch = args.batch_size or recipe.train.batch_size
        optimizer, _ = make_optimizer(generator, recipe.train)
        images = torch.rand(batch, data.channels, side, side, device=device) * 2 - 1
        cond = {"lr": torch.rand(batch, data.channels, side // scale, side // scale, device=device) * 2 - 1,
                "label": torch.zeros(batch, dtype=torch.long, device=device)}
        generator.train()
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            with torch.no_grad():
                inputs = generator.training_inputs(tokenizer, images)
            generator.loss(inputs, cond)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= args.warmup:
                timings.append(time.perf_counter() - start)
        per_step = sorted(timings)[len(timings) // 2]
        return {"what": "sr-train", "batch": batch, "s_per_step": per_step, "images_per_s": batch / per_step,
                "peak_mb": peak_memory_mb(device)}
    generator.eval()
    from zoo.pipeline import Pipeline
    from zoo.upscale import SRModel

    pipe = Pipeline(generator, tokenizer, recipe.sample, num_classes=None, image_size=side)
    model = SRModel(pipe, scale, side // scale, data.channels)
    lr = torch.rand(data.channels, args.sr_side, args.sr_side) * 2 - 1
    sampling = {k: getattr(recipe.sample, k) for k in ("cfg_scale", "top_k", "top_p", "temperature", "mean_tokens",
                                                        "refine", "tile_overlap", "self_ensemble", "back_projection")}
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        out = model.upscale(lr, seed=0, batch_size=args.sample_batch or 64)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= args.warmup:
            timings.append(time.perf_counter() - start)
    per_image = sorted(timings)[len(timings) // 2]
    megapixels = out.shape[-1] * out.shape[-2] / 1e6
    return {"what": "sr-sample", "lr_side": args.sr_side, "out": list(out.shape[-2:]), "s_per_image": per_image,
            "s_per_megapixel": per_image / megapixels, "sampling": sampling, "peak_mb": peak_memory_mb(device)}


TIME_KEYS = ("seconds_per_step", "seconds_per_call", "seconds_per_batch", "s_per_step", "s_per_image")


def compare_recipes(args) -> list[dict]:
    """``--compare``: the same measurement for several recipes in this one process, alternating.

    Each ``--compare`` item is ``"RECIPE [key=value ...]"`` (quoted; its own overrides), after the
    positional RECIPE if one is given (the baseline; the positional overrides apply to every item).
    For each of ``--what``, ``--rounds`` rounds measure every recipe once, the order rotated each
    round so that a machine growing busier or quieter does not favour one; the median per recipe is
    printed with its speed relative to the first (> 1: faster). One process shares one allocator and
    RSS high-water mark, so no peak memory is reported here (the plain mode measures it).
    """
    import copy
    import shlex
    import statistics

    specs = ([[args.recipe]] if args.recipe else []) + [shlex.split(item) for item in args.compare]
    if len(specs) < 2:
        raise SystemExit("--compare needs at least two recipes (RECIPE --compare OTHER, or --compare A B)")
    results = []
    for what in args.what.split(","):
        times: list[list[float]] = [[] for _ in specs]
        reports: list[dict] = [{} for _ in specs]
        for round_index in range(args.rounds):
            for offset in range(len(specs)):
                i = (round_index + offset) % len(specs)
                run = copy.copy(args)
                run.recipe, run.overrides, run.child = specs[i][0], [*args.overrides, *specs[i][1:]], what
                report = measure_sr(run) if args.sr else measure(run)
                key = next((k for k in TIME_KEYS if k in report), None)
                if key is None:  # e.g. cfg for a generator without forward_with_cfg
                    reports[i] = report
                    continue
                times[i].append(report[key])
                reports[i] = {**report, "time_key": key}
        base = statistics.median(times[0]) if times[0] else None
        for spec, spec_times, report in zip(specs, times, reports):
            row = {"what": what, "recipe": " ".join(spec), "rounds": len(spec_times)}
            if not spec_times:
                row["skipped"] = report.get("skipped", "no timing")
            else:
                median = statistics.median(spec_times)
                row.update({report["time_key"]: round(median, 4), "spread": round(max(spec_times) - min(spec_times), 4),
                            "speed_vs_first": round(base / median, 3) if base else None})
                if "batch" in report:
                    row["images_per_s"] = round(report["batch"] / median, 2)
            results.append(row)
            print(json.dumps(row))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark a recipe's generator (training and sampling speed).")
    parser.add_argument("recipe", nargs="?", help="the recipe (with --compare: the baseline, optional)")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--what", default="train,cfg,sample", help="comma list of train, cfg, sample")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: the recipe's)")
    parser.add_argument("--cfg-batch", type=int, default=16)
    parser.add_argument("--sample-batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", default="none", choices=("none", "default", "reduce-overhead", "max-autotune"))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the training step")
    parser.add_argument("--cache-tokens", action="store_true",
                        help="VAR: train from cached token indices (train.cache_tokens) instead of encoding images")
    parser.add_argument("--sr", action="store_true",
                        help="VAR-SR recipes: time training steps and tiled upscaling (--what train,sample)")
    parser.add_argument("--sr-side", type=int, default=64, help="--sr: side of the random LR image to upscale")
    parser.add_argument("--compare", nargs="+", default=None, metavar="RECIPE",
                        help="measure these recipes too, in one process, alternating, and print speed ratios; "
                             "an item may carry its own overrides: 'recipes/a.yaml train.batch_size=32'")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: measurements per recipe (median)")
    parser.add_argument("--against", metavar="DIR",
                        help="a local checkout of facebookresearch/DiT, LTH14/mar or FoundationVision/VAR: time it "
                             "beside zoo in one process on the same weights and batch (tools/against.py)")
    parser.add_argument("--variants", default=None,
                        help="--against: comma list of official, zoo, zoo-bf16, zoo-bf16-compile "
                             "(default: all that the device allows)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.against:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import against

        if not args.recipe:
            parser.error("--against needs the RECIPE whose generator to build on both sides")
        against.run(args, *build(args.recipe, args.overrides))
        return
    if args.compare:
        if args.recipe and "=" in args.recipe and not os.path.isfile(args.recipe):
            args.recipe, args.overrides = None, [args.recipe, *args.overrides]  # only overrides were given
        compare_recipes(args)
        return
    if not args.recipe:
        parser.error("a RECIPE is needed (or --compare RECIPE RECIPE ...)")
    if args.child:
        print(json.dumps(measure_sr(args) if args.sr else measure(args)))
        return
    for what in args.what.split(","):
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", what]
        proc = subprocess.run(argv, capture_output=True, text=True, env=os.environ)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            sys.exit(proc.returncode)
        print(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
