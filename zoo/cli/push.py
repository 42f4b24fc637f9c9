"""``zoo-push RUN_OR_MODEL_DIR ORG/REPO [--private] [--revision BRANCH] [--message TEXT]``."""

from __future__ import annotations

import argparse
import sys

from zoo.cli.common import add_quiet, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo-push",
        description="Upload a run or model directory to the Hugging Face Hub as a zoo model directory: config.json, "
                    "EMA weights (sharded above --max-shard-size), recipe.yaml, metrics and a README.md model card. "
                    "Checkpoints, logs and sample grids stay local. Uses HF_TOKEN (or your saved login) and "
                    "HF_ENDPOINT.")
    p.add_argument("model_dir", help="a run directory written by zoo-train, or a model directory")
    p.add_argument("repo_id", help="the Hub repo, ORG/NAME (created if it does not exist)")
    p.add_argument("--private", action="store_true", help="create the repo private (no effect on an existing repo)")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--license", default=None, help="license in the model card when the directory has no README.md "
                                                   "(default: other)")
    p.add_argument("--tag", action="append", default=[], help="extra model-card tag (repeatable)")
    p.add_argument("--max-shard-size", default="5GB", help="shard weights above this size (default 5GB)")
    add_quiet(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        from zoo.hub.api import push_to_hub

        try:
            url = push_to_hub(args.model_dir, args.repo_id, private=args.private or None, revision=args.revision,
                              commit_message=args.message, max_shard_size=args.max_shard_size,
                              license=args.license, tags=args.tag)
        except ConnectionError as err:
            raise ValueError(str(err)) from None
        print(f"pushed {args.model_dir} to {args.repo_id}" + (f" (branch {args.revision})" if args.revision else ""))
        print(f"commit: {url}")
        return 0

    return run_cli(body, "zoo-push", quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
