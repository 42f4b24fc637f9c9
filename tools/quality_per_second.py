"""Quality reached per second of sampling: each family's default sampling beside faster settings.

    python tools/quality_per_second.py --dit runs/dit_digits --mar runs/mar_digits \\
        --meanflow runs/meanflow_digits --var runs/var_digits [--num 500] [--json out.json]

For every setting it samples ``--num`` digits (labels cycling 0-9, seed 0, batches of 100) from the
same trained model and reports the wall time, images/s, the digits agreement (the share a
classifier trained on the real digits reads as the requested digit) and the classifier-feature
Fréchet distance to the real digits (lower is better; biased by N, so compare at equal N). The real
data's own floor (two disjoint halves of the digits, ~900 images each) is printed for scale.

Settings (a model directory may be left out):

- DiT: DDPM 250 (the paper's sampler), DDIM 50 (the recipe's), DDIM 10 and 25 (first order at the
  fast solvers' cost), and DPM-Solver++(2M) and UniPC at 10, 15 and 25 steps;
- MAR: the release's 64 unmasking iterations x 100 head steps (DDPM), 16 x 50 (the recipe's before
  it moved to 8 x UniPC 15), 8 x 50 (fewer iterations alone), and fewer iterations with the fast
  solvers driving the per-token head;
- MeanFlow: 1 and 2 steps;
- VAR: its one setting (each of the recipe's scales once, KV-cached).

Speed-ups are printed against DiT's DDPM 250 and DDIM 50, and MAR's 64 x 100 and 16 x 50.
Guidance is each recipe's own (its sample.cfg_scale).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

DIT = [("DDPM 250 (paper)", dict(sampler="ddpm", steps=250)), ("DDIM 50 (recipe)", dict(sampler="ddim", steps=50))]
DIT += [(f"DDIM {n}", dict(sampler="ddim", steps=n)) for n in (10, 25)]  # the first-order baseline at equal cost
DIT += [(f"{name} {n}", dict(sampler=sampler, steps=n)) for sampler, name in (("dpm++2m", "DPM-Solver++ 2M"),
                                                                               ("unipc", "UniPC"))
        for n in (10, 15, 25)]
MAR = [("64 iter x DDPM 100 (release)", dict(num_iter=64, num_sampling_steps="100", sampler="ddpm")),
       ("16 iter x DDPM 50", dict(num_iter=16, num_sampling_steps="50", sampler="ddpm")),
       ("8 iter x DDPM 50", dict(num_iter=8, num_sampling_steps="50", sampler="ddpm"))]  # iterations alone
MAR += [(f"{it} iter x {name} {n}", dict(num_iter=it, num_sampling_steps=str(n), sampler=sampler))
        for it in (16, 8) for sampler, name in (("dpm++2m", "DPM++"), ("unipc", "UniPC")) for n in (10, 15)]
MEANFLOW = [("1 step", dict(steps=1)), ("2 steps", dict(steps=2))]
VAR = [("every scale once, KV cache (recipe)", {})]
FAMILIES = {"dit": ("DiT", DIT), "mar": ("MAR", MAR), "meanflow": ("MeanFlow", MEANFLOW), "var": ("VAR", VAR)}
BASELINES = {"dit": ("DDPM 250 (paper)", "DDIM 50 (recipe)"),
             "mar": ("64 iter x DDPM 100 (release)", "16 iter x DDPM 50")}


def measure(model_dir: str, settings, num: int, batch_size: int) -> list[dict]:
    from zoo.eval.digits_classifier import agreement, frechet_distance_to_digits
    from zoo.hub.model_dir import load_model_dir
    from zoo.pipeline import parse_labels

    pipe = load_model_dir(model_dir)
    labels = parse_labels("all", num, pipe.num_classes)
    pipe.generate(labels[:batch_size], seed=1, batch_size=batch_size, **settings[0][1])  # warm-up
    rows = []
    for name, options in settings:
        start = time.perf_counter()
        images = pipe.generate(labels, seed=0, batch_size=batch_size, **options)
        seconds = time.perf_counter() - start
        rows.append({"setting": name, "options": options, "seconds": round(seconds, 1),
                     "images_per_s": round(num / seconds, 1), "agreement": round(agreement(images, labels), 3),
                     "fd": round(frechet_distance_to_digits(images), 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, (name, _) in FAMILIES.items():
        parser.add_argument(f"--{key}", metavar="DIR", help=f"a trained {name} digits run or model directory")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"num": args.num, "threads": torch.get_num_threads(), "families": {}}
    size = None
    for key, (name, settings) in FAMILIES.items():
        model_dir = getattr(args, key)
        if model_dir:
            results["families"][key] = {"name": name, "model_dir": model_dir,
                                        "rows": measure(model_dir, settings, args.num, args.batch_size)}
            from zoo.hub.model_dir import read_model_config

            size = read_model_config(model_dir)["data"]["image_size"]
    if size is not None:
        from zoo.eval.digits_classifier import frechet_distance_floor

        results["real_floor_fd"] = round(frechet_distance_floor(size), 2)
    print()
    print(f"{args.num} samples each, {results['threads']} threads; FD floor (two halves of the real digits): "
          f"{results.get('real_floor_fd')}")
    print()
    print("| family | setting | seconds | images/s | agreement | FD | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key, family in results["families"].items():
        base = {r["setting"]: r["seconds"] for r in family["rows"]}
        for row in family["rows"]:
            ups = [f"{base[b] / row['seconds']:.1f}x vs {b.split(' (')[0]}" for b in BASELINES.get(key, ())
                   if b != row["setting"]]
            print(f"| {family['name']} | {row['setting']} | {row['seconds']} | {row['images_per_s']} | "
                  f"{row['agreement']:.3f} | {row['fd']} | {', '.join(ups)} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
