"""``zoo-sample RUN_OR_MODEL_DIR|ORG/REPO [--revision REV] --num N --labels all|0,3,7 --out PATH.png|PATH.npz``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from zoo.cli.common import add_quiet, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo-sample",
        description="Sample images from a run or model directory, or from a Hub repo (through the Hugging Face "
                    "cache; honours HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME).")
    p.add_argument("model_dir", help="a run directory written by zoo-train, a model directory, or a Hub repo ORG/NAME "
                                     "(an existing local path wins)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (Hub repos)")
    p.add_argument("--num", type=int, default=None, help="number of images (default: the recipe's sample.num)")
    p.add_argument("--labels", default=None, help="'all' (cycle through the classes) or e.g. 0,3,7")
    p.add_argument("--sampler", default=None,
                   help="gaussian objective: ddpm | ddim | dpm++2m | unipc (the last two: fast ODE solvers, good "
                        "in 10-25 steps; for MAR and VAR-SR they drive the per-token head); flow: euler | heun")
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise (0 = deterministic)")
    p.add_argument("--top-k", type=int, default=None, help="VAR: sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="VAR: nucleus sampling mass (0 = off)")
    p.add_argument("--more-smooth", action="store_true", default=None,
                   help="VAR: Gumbel-softmax blending of token embeddings")
    p.add_argument("--num-iter", type=int, default=None,
                   help="MAR: unmasking iterations (--steps means the same for a generator without diffusion steps)")
    p.add_argument("--diffusion-steps", default=None,
                   help="MAR: steps of the per-token diffusion sampler, e.g. 100 or ddim25 (default: the model's)")
    p.add_argument("--cfg-schedule", choices=("linear", "constant"), default=None, help="MAR: guidance schedule")
    p.add_argument("--temperature", type=float, default=None, help="MAR: diffusion sampling temperature")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--out", required=True, help="PATH.png (a grid) or PATH.npz (ADM: arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")
    add_quiet(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        import numpy as np
        import torch

        from zoo.data.transforms import make_grid_image, to_uint8
        from zoo.hub.api import resolve_pretrained
        from zoo.hub.model_dir import load_model_dir, read_model_config
        from zoo.io import atomic_write
        from zoo.pipeline import parse_labels

        out = Path(args.out)
        if out.suffix not in (".png", ".npz"):
            raise ValueError(f"--out {out}: the file must end in .png (grid) or .npz (arrays)")
        model_dir = resolve_pretrained(args.model_dir, revision=args.revision)
        if "generator" not in read_model_config(model_dir):  # a tokenizer's run: show reconstructions
            from zoo.cli.reconstruct import main as reconstruct

            if out.suffix != ".png":
                raise ValueError(f"--out {out}: {args.model_dir} holds a tokenizer; its check writes a .png")
            return reconstruct([str(model_dir), "--out", str(out), "--weights", args.weights,
                                *(["--num", str(args.num)] if args.num else []),
                                *(["--device", args.device] if args.device else [])])
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_model_dir(model_dir, weights=args.weights, device=device)
        defaults = pipe.sample_config
        num = args.num or defaults.num
        if num < 1:
            raise ValueError(f"--num must be >= 1, got {num}")
        labels_spec = args.labels or defaults.labels
        labels = parse_labels(labels_spec, num, pipe.num_classes)
        # --steps counts a generator's own iterations: diffusion steps, or MAR's unmasking iterations.
        options = pipe.sampling_options()
        steps = {"steps": args.steps, "num_iter": args.num_iter}
        if args.steps is not None and "steps" not in options and "num_iter" in options:
            if args.num_iter is not None and args.num_iter != args.steps:
                raise ValueError(f"--steps {args.steps} and --num-iter {args.num_iter} disagree; give one")
            steps = {"num_iter": args.steps}
        images = pipe.generate(
            labels, seed=defaults.seed if args.seed is None else args.seed,
            batch_size=args.batch_size or defaults.batch_size, progress=not args.quiet,
            sampler=args.sampler, cfg_scale=args.cfg_scale, eta=args.eta,
            top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
            num_sampling_steps=args.diffusion_steps, **steps,
            cfg_schedule=args.cfg_schedule, temperature=args.temperature)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npz":
            arrays = {"arr_0": to_uint8(images), "arr_1": labels.numpy().astype(np.int64)}

            def write(tmp):
                with open(tmp, "wb") as handle:
                    np.savez(handle, **arrays)
        else:
            nrow = args.nrow or (pipe.num_classes if labels_spec == "all" and pipe.num_classes
                                 else int(math.ceil(num ** 0.5)))
            grid = make_grid_image(images, nrow=nrow, upscale=max(1, 64 // images.shape[-1]))

            def write(tmp):
                grid.save(tmp, format="PNG")
        atomic_write(out, write)
        print(f"wrote {num} samples to {out}")
        return 0

    return run_cli(body, "zoo-sample", quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
