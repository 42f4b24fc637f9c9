"""``zoo-upscale MODEL_DIR INPUT.png --scale 4 --out OUTPUT.png [--cfg-scale] [--seed] [--tile] [--overlap]``
and ``zoo-upscale MODEL_DIR --eval HR_DIR``: super-resolution with a VAR-SR run or model directory."""

from __future__ import annotations

import argparse
import json
import sys

from zoo.cli.common import add_quiet, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo-upscale",
        description="Upscale an image of any size with a VAR-SR model (tiled with overlap), or measure PSNR/SSIM "
                    "on a folder of high-resolution images beside bicubic upsampling.")
    p.add_argument("model_dir", help="a var-sr run directory written by zoo-train, or a model directory")
    p.add_argument("input", nargs="?", default=None, help="the image to upscale (PNG, JPEG, …; grey and RGBA kept)")
    p.add_argument("--out", default=None, help="output PNG (required with INPUT)")
    p.add_argument("--scale", type=int, default=None, help="upscaling factor; must be the model's (default: it)")
    p.add_argument("--cfg-scale", type=float, default=None, help="image-based CFG strength (0 = off; default: recipe)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (1 = greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (0 = off)")
    p.add_argument("--mean-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="add each scale's expected code vector instead of a drawn token (posterior mean: the best "
                        "PSNR; default: recipe)")
    p.add_argument("--temperature", type=float, default=None, help="noise scale of the diffusion refiner")
    p.add_argument("--refiner", action=argparse.BooleanOptionalAction, default=None,
                   help="run the diffusion refiner on the last scale (sharper, lower PSNR; default: the recipe's "
                        "sample.refine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=None,
                   help="LR tile side; must be the model's patch (data.image_size / scale), the default")
    p.add_argument("--overlap", type=int, default=None,
                   help="overlap of neighbouring LR tiles in pixels (default: the recipe's sample.tile_overlap, "
                        "else a quarter tile)")
    p.add_argument("--ensemble", type=int, default=None, choices=(1, 2, 4, 8),
                   help="average over this many flipped/rotated copies (default: the recipe's sample.self_ensemble)")
    p.add_argument("--back-project", dest="back_projection", type=int, default=None, metavar="STEPS",
                   help="steps of back-projection onto the input (the result's bicubic downscale made equal to "
                        "it; right for bicubic-downscaled inputs; 0 = off; default: the recipe's "
                        "sample.back_projection)")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per model call (bounds memory)")
    p.add_argument("--eval", dest="eval_dir", default=None, metavar="HR_DIR",
                   help="print PSNR and SSIM of the model and of bicubic upsampling against the HR images of this "
                        "folder, or of the photos dataset's validation photographs with --eval photos")
    p.add_argument("--crop", type=int, default=0, help="with --eval: centre-crop each HR image to at most N x N")
    p.add_argument("--grid", default="upscale_eval.png", metavar="PNG",
                   help="with --eval: where to write the crop grid (LR, bicubic, zoo, HR of each image's most "
                        "detailed 64-px window, enlarged 3x; default upscale_eval.png; '' skips it)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    add_quiet(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        import torch

        from zoo.upscale import SRModel, crop_grid, evaluate_folder, mean_scores, upscale_file

        if args.input is None and args.eval_dir is None:
            raise ValueError("give an INPUT image (with --out) or --eval HR_DIR")
        if args.input is not None and not args.out:
            raise ValueError("--out OUTPUT.png is required with an INPUT image")
        if args.out and not args.out.lower().endswith(".png"):
            raise ValueError(f"--out {args.out}: the output is written as PNG; name it *.png")
        if args.eval_dir is not None and args.grid and not args.grid.lower().endswith(".png"):
            raise ValueError(f"--grid {args.grid}: the crop grid is written as PNG; name it *.png")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = SRModel.load(args.model_dir, weights=args.weights, device=device)
        if args.scale is not None and args.scale != model.scale:
            raise ValueError(f"--scale {args.scale}: {args.model_dir} was trained for x{model.scale}")
        if args.tile is not None and args.tile != model.tile:
            raise ValueError(f"--tile {args.tile}: the model works on {model.tile}-pixel LR patches "
                             f"(data.image_size / scale); leave --tile out or pass {model.tile}")
        sampling = {k: v for k, v in dict(cfg_scale=args.cfg_scale, top_k=args.top_k, top_p=args.top_p,
                                          mean_tokens=args.mean_tokens, temperature=args.temperature,
                                          refine=args.refiner).items() if v is not None}
        model.back_projection_steps(args.back_projection)  # a bad --back-project stops before any work
        common = dict(overlap=args.overlap, ensemble=args.ensemble, seed=args.seed, batch_size=args.batch_size,
                      back_projection=args.back_projection, **sampling)
        if args.input is not None:
            width, height = upscale_file(model, args.input, args.out, **common)
            print(f"wrote {args.out} ({width}x{height}, x{model.scale})")
        if args.eval_dir is not None:
            shown = []
            rows = evaluate_folder(model, args.eval_dir, crop=args.crop,
                                   on_image=(lambda name, arrays: shown.append((name, arrays))) if args.grid else None,
                                   **common)
            def scores(row: dict) -> str:
                text = (f"model PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.4f}  |  bicubic PSNR "
                        f"{row['bicubic_psnr']:.2f} dB  SSIM {row['bicubic_ssim']:.4f}")
                if "backprojected_psnr" in row:  # what back-projection alone does, to bicubic
                    text += (f"  |  bicubic + back-projection PSNR {row['backprojected_psnr']:.2f} dB  "
                             f"SSIM {row['backprojected_ssim']:.4f}")
                return text

            for row in rows:
                print(f"{row['image']}: {row['size'][0]}x{row['size'][1]}  {scores(row)}")
            mean = mean_scores(rows)
            print(f"mean over {len(rows)} images: {scores(mean)}")
            if args.grid:
                print(f"crop grid (LR, bicubic, zoo, HR): {crop_grid(shown, args.grid, scale=model.scale)}")
            print(json.dumps({"images": rows, "mean": mean}))
        return 0

    return run_cli(body, "zoo-upscale", quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
