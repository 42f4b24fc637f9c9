"""``zoo-convert SRC --format FORMAT --out DIR [--tokenizer SRC] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import sys

from zoo.cli.common import add_quiet, run_cli


def build_parser() -> argparse.ArgumentParser:
    from zoo.hub.convert import FORMATS

    p = argparse.ArgumentParser(
        prog="zoo-convert",
        description="Convert a checkpoint of an original implementation into a zoo model directory. The architecture "
                    "is read from tensor shapes; give what they cannot tell (e.g. num_heads) with --set. Pickles are "
                    "read with torch.load(weights_only=True).",
        epilog="Formats: dit, diffusers-dit, meanflow, var, var-sr, mar (generators); kl-vae, diffusers-vae, vqvae "
               "(tokenizers). Generators need --tokenizer unless they work on pixels. --set tokenizer.KEY=V, "
               "sample.KEY=V and data.KEY=V address those sections; tokenizer.format picks the tokenizer's format.")
    p.add_argument("src", help="checkpoint file (.pt/.pth/.ckpt/.bin/.safetensors) or diffusers folder")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--tokenizer", default=None,
                   help="the generator's tokenizer: a zoo tokenizer directory, or an official file/folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config field (YAML value), repeatable: --set num_heads=16 --set patch_nums=[1,2,4]")
    p.add_argument("--license", default=None, help="license for the model card")
    p.add_argument("--max-shard-size", default="5GB")
    add_quiet(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        from pathlib import Path

        from zoo.hub.convert import convert

        out = Path(args.out)
        convert(args.src, args.format, out, overrides=args.overrides, tokenizer=args.tokenizer,
                license=args.license, max_shard_size=args.max_shard_size)
        print(f"wrote {out} (config.json, weights, README.md)")
        print(f"try: zoo-sample {out} --num 16 --out samples.png")
        return 0

    return run_cli(body, "zoo-convert", quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
