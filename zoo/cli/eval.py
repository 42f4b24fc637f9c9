"""``zoo-eval MODEL_DIR [--num N] [--metrics ...] [--ref REF] [--inception-weights PATH] [--out JSON]``:
sample a model (batched, seeded, resumable) and write its quality metrics as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoo.cli.common import add_quiet, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo-eval",
        description="Sample a run or model directory and score the samples (digits agreement and feature "
                    "Fréchet distance; FID, Inception Score, precision/recall with local Inception weights); "
                    "for a tokenizer's directory, PSNR/SSIM of its reconstructions; for a super-resolution model, "
                    "PSNR/SSIM of its upscaled images beside bicubic.")
    p.add_argument("model_dir", help="a run directory written by zoo-train, or a model directory")
    p.add_argument("--num", type=int, default=500, help="number of samples (default 500)")
    p.add_argument("--metrics", default="auto",
                   help="comma list of agreement, fd_digits, fid, isc, prc, psnr, ssim (default auto: every "
                        "metric that applies to the model and the files given)")
    p.add_argument("--ref", default=None,
                   help="reference .npz: ADM statistics (mu, sigma) for fid, and/or images (arr_0, uint8 NHWC) for "
                        "fid/prc, or originals to reconstruct for psnr/ssim (default for digits: the real digits); "
                        "for a super-resolution model, a folder of HR images (default: the photos validation "
                        "photographs)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth, needed by fid, isc and prc "
                        "(never downloaded)")
    p.add_argument("--labels", default="all", help="'all' (cycle through the classes) or e.g. 0,3,7")
    p.add_argument("--batch-size", type=int, default=None, help="sampling batch (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    p.add_argument("--work-dir", default=None,
                   help="keep finished sample batches here and resume from them (default: OUT without .json + "
                        ".work/ when --out is given)")
    p.add_argument("--save-npz", default=None, metavar="PATH.npz",
                   help="also write the samples as ADM arrays (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    add_quiet(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        import torch

        from zoo.eval.evaluate import evaluate_model_dir, json_ready
        from zoo.io import atomic_write_text

        out = Path(args.out) if args.out else None
        if out is not None and out.suffix != ".json":
            raise ValueError(f"--out {out}: the report is JSON; name a .json file")
        work_dir = args.work_dir or (out.with_suffix(".work") if out is not None else None)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        report = evaluate_model_dir(
            args.model_dir, weights=args.weights, device=device,
            metrics=args.metrics, work_dir=work_dir, num=args.num, labels=args.labels, seed=args.seed,
            batch_size=args.batch_size, ref=args.ref, inception_weights=args.inception_weights,
            save_npz=args.save_npz, progress=not args.quiet)
        text = json.dumps(json_ready(report), indent=2)
        if out is not None:
            atomic_write_text(out, text + "\n")
        print(text)
        return 0

    return run_cli(body, "zoo-eval", quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
