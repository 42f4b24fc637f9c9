"""Sample a digits model and report how many samples a classifier trained on the real digits reads as
the requested class (the quality check of the digits recipes).

    python tools/digits_agreement.py RUN_DIR [--num 500] [--steps N] [--cfg-scale S] [--sampler ddim]
                                             [--top-k K] [--top-p P]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zoo.eval.digits_classifier import agreement
from zoo.hub.model_dir import load_model_dir
from zoo.pipeline import parse_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--weights", default="ema", choices=("ema", "raw"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_model_dir(args.model_dir, weights=args.weights, device=device)
    labels = parse_labels("all", args.num, pipe.num_classes)
    options = dict(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, top_k=args.top_k,
                   top_p=args.top_p)
    options = {k: v for k, v in options.items() if v is not None}
    start = time.perf_counter()
    images = pipe.generate(labels, seed=args.seed, batch_size=args.batch_size, **options)
    seconds = time.perf_counter() - start
    score = agreement(images, labels, image_size=images.shape[-1])
    print(json.dumps({"model_dir": args.model_dir, "num": args.num, "agreement": round(score, 4),
                      "sampling_seconds": round(seconds, 1),
                      "sampling": pipe.sampling_kwargs(**options)}))


if __name__ == "__main__":
    main()
