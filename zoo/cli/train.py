"""``zoo-train RECIPE [--run-dir DIR] [--resume] [key.path=value ...]``.

Multi-GPU / multi-node: ``accelerate launch -m zoo.cli.train RECIPE ...`` (same arguments).
"""

from __future__ import annotations

import argparse
import sys

from zoo.cli.common import add_quiet, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoo-train", description="Train the generator (or tokenizer) described by a recipe.",
        epilog="Overrides: section.field=value, e.g. train.max_steps=200 model.depth=4. "
               "Multi-GPU: accelerate launch -m zoo.cli.train RECIPE ...")
    parser.add_argument("recipe", nargs="?", help="recipe YAML, e.g. recipes/dit_digits.yaml")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument("--run-dir", help="where checkpoints, logs and samples go (default: runs/<recipe name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its latest checkpoint")
    parser.add_argument("--list-models", nargs="?", const="*", metavar="PATTERN",
                        help="list registered generators (and tokenizers, objectives, datasets) and exit")
    parser.add_argument("--dry-run", action="store_true", help="validate the recipe, print it resolved, and exit")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    add_quiet(parser)
    return parser


def list_registry(pattern: str) -> None:
    from zoo.registry import KINDS, get_entry, list_entries

    for kind in KINDS:
        names = list_entries(kind, pattern) if kind == "generator" else list_entries(kind)
        print(f"{kind}s:")
        for name in names:
            print(f"  {name:<16} {get_entry(kind, name).description}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)

    def body():
        if args.list_models:
            list_registry(args.list_models)
            return 0
        if not args.recipe:
            build_parser().error("a recipe is required (or --list-models)")
        import yaml

        from zoo.recipe import load_recipe
        from zoo.train.trainer import Trainer, default_run_dir

        if args.resume and not args.run_dir:
            build_parser().error("--resume needs --run-dir (the run to continue)")
        from zoo.hub.model_dir import read_hub_config

        recipe = load_recipe(args.recipe, args.overrides, fetch_config=read_hub_config)
        if args.dry_run:
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
            return 0
        run_dir = args.run_dir or default_run_dir(args.recipe)
        trainer = Trainer(recipe, run_dir, resume=args.resume, progress=not args.quiet, cpu=args.cpu)
        grid = trainer.fit()
        if trainer.accelerator.is_main_process:
            print(f"run directory: {run_dir}")
            if grid is not None:
                kind = "reconstructions (originals above)" if recipe.trains_tokenizer else "sample grid"
                print(f"{kind}: {grid}")
        return 0

    return run_cli(body, "zoo-train", quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
