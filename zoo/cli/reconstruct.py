"""``zoo-reconstruct MODEL_DIR|ORG/REPO [--revision REV] [--num N] [--images DIR] [--out PATH.png]``: how
well a tokenizer reconstructs images — originals beside reconstructions, PSNR and codebook usage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoo.cli.common import add_quiet, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo-reconstruct",
        description="Encode and decode images with the tokenizer of a run or model directory; print PSNR and "
                    "codebook usage and write originals beside reconstructions. A Hub repo comes through the "
                    "Hugging Face cache (HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME apply).")
    p.add_argument("model_dir", help="a tokenizer's run directory, any run/model directory with a tokenizer, or a "
                                     "Hub repo ORG/NAME holding one (an existing local path wins)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (Hub repos)")
    p.add_argument("--num", type=int, default=50, help="number of images (default 50)")
    p.add_argument("--images", default=None,
                   help="a folder of images (default: the run's dataset, its validation split where it has one)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    p.add_argument("--out", default=None, help="PNG to write (default: MODEL_DIR/reconstructions.png; required for "
                                               "a Hub repo); a .json with the numbers is written beside it")
    add_quiet(p)
    return p


def reference_images(model_dir: Path, images_dir: str | None, num: int, image_size: int | None, channels: int):
    """Images to reconstruct: from ``images_dir`` (center-cropped to ``image_size``) or the run's dataset."""
    import torch
    import yaml

    from zoo.config import ConfigError
    from zoo.registry import get_entry

    if images_dir is not None:
        if not image_size:
            raise ConfigError(f"{model_dir}: config.json gives no data.image_size to crop {images_dir} to")
        entry = get_entry("dataset", "imagefolder")
        dataset = entry.build(entry.make_config({"root": images_dir, "image_size": image_size, "channels": channels,
                                                 "random_flip": False}, where="--images"))
    else:
        recipe_file = model_dir / "recipe.yaml"
        if not recipe_file.is_file():
            raise FileNotFoundError(f"{recipe_file}: missing, so the run's dataset is unknown; pass --images DIR")
        data = dict(yaml.safe_load(recipe_file.read_text())["data"])
        entry = get_entry("dataset", data.pop("name"), where=f"{recipe_file}: data.name")
        if "split" in {f for f in entry.config_cls.__dataclass_fields__}:
            data["split"] = "val"  # images the tokenizer did not train on
        dataset = entry.build(entry.make_config(data, where=f"{recipe_file}: data"))
    count = min(num, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        import torch

        from zoo.eval.reconstruction import reconstruction_report, write_pairs_grid
        from zoo.hub.api import is_repo_id, resolve_pretrained
        from zoo.hub.model_dir import load_tokenizer_dir, read_model_config
        from zoo.io import atomic_write_json

        if args.num < 1:
            raise ValueError(f"--num must be >= 1, got {args.num}")
        if args.out is None and is_repo_id(args.model_dir):  # the default beside the model would be in the HF cache
            raise ValueError(f"{args.model_dir} is a Hub repo; give --out PATH.png for the reconstructions")
        model_dir = resolve_pretrained(args.model_dir, revision=args.revision)
        config = read_model_config(model_dir)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = load_tokenizer_dir(model_dir, weights=args.weights, device=device)
        data = config.get("data", {})
        channels = data.get("channels") or getattr(tokenizer.config, "image_channels", 3)
        images = reference_images(model_dir, args.images, args.num, data.get("image_size"), channels)
        report = reconstruction_report(tokenizer, images, batch_size=args.batch_size)
        out = Path(args.out) if args.out else model_dir / "reconstructions.png"
        write_pairs_grid(out, images, report.pop("reconstructions"))
        atomic_write_json(out.with_suffix(".json"), report)
        print(json.dumps(report))
        print(f"PSNR {report['psnr']:.2f} dB over {report['num_images']} images"
              + (f", codebook usage {100 * report['codebook_usage']:.1f}%" if "codebook_usage" in report else ""))
        print(f"wrote {out} (rows: originals, then reconstructions)")
        return 0

    return run_cli(body, "zoo-reconstruct", quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
