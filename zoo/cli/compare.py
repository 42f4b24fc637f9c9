"""``zoo-compare MODEL_OR_RUN ... [--labels] [--seed] [--num] [--out DIR]``: models of any families side by side."""

from __future__ import annotations

import argparse
import sys

from zoo.cli.common import add_quiet, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo-compare",
        description="Compare run or model directories of any families on the same labels, seed and budget: a "
                    "side-by-side grid, a table of size, cost, speed, memory and quality, loss curves, and one "
                    "HTML report.")
    p.add_argument("models", nargs="+", help="run or model directories")
    p.add_argument("--names", default=None, help="comma list of row names (default: the directories' names)")
    p.add_argument("--labels", default="all", help="grid columns and evaluation labels: 'all' or e.g. 0,3,7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=200,
                   help="samples per model for the quality metrics (default 200; 0 skips them)")
    p.add_argument("--batch-size", type=int, default=64, help="sampling batch for every model (default 64)")
    p.add_argument("--metrics", default="auto", help="as zoo-eval's --metrics (default auto)")
    p.add_argument("--ref", default=None, help="as zoo-eval's --ref")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help="as zoo-eval's --inception-weights")
    p.add_argument("--train-steps", type=int, default=3,
                   help="timed optimizer steps per model for training speed (default 3; 0 skips it)")
    p.add_argument("--train-batch", type=int, default=None,
                   help="images per timed training step (default: each run's recipe batch; 256 without recipe.yaml)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    p.add_argument("--in-process", action="store_true",
                   help="measure every model in this process (faster; peak memory of later models may read low)")
    p.add_argument("--out", default="compare", help="output folder (default: compare/)")
    add_quiet(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        from zoo.eval.compare import compare

        result = compare(args.models, out=args.out, names=args.names.split(",") if args.names else None,
                         labels=args.labels, seed=args.seed, num=args.num, batch_size=args.batch_size,
                         metrics=args.metrics, ref=args.ref, inception_weights=args.inception_weights,
                         train_steps=args.train_steps, train_batch=args.train_batch, device=args.device,
                         weights=args.weights,
                         isolate=not args.in_process, progress=not args.quiet)
        with open(result["files"]["table_md"]) as handle:
            print(handle.read())
        print(f"wrote {result['files']['html']}")
        return 0

    return run_cli(body, "zoo-compare", quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
