"""``zoo-pull ORG/REPO [--revision REV] [--to DIR]``, ``zoo-pull official:NAME [--to DIR]``,
``zoo-pull --list-official``."""

from __future__ import annotations

import argparse
import sys

from zoo.cli.common import add_quiet, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo-pull",
        description="Download a zoo model directory from the Hugging Face Hub (into the HF cache, and with --to into "
                    "DIR), or fetch official:NAME weights and convert them into a zoo model directory. Honours "
                    "HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME.")
    p.add_argument("ref", nargs="?", help="ORG/REPO, or official:NAME (see --list-official)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (Hub repos)")
    p.add_argument("--to", default=None, help="copy the model directory here (a new or empty directory); default: "
                                              "the HF cache, or $HF_HOME/zoo/official/NAME for official weights")
    p.add_argument("--list-official", action="store_true", help="list the known official weights and exit")
    p.add_argument("--force", action="store_true", help="official:NAME: convert again even if already converted")
    add_quiet(p)
    return p


def print_official() -> None:
    from zoo.hub.official import list_official

    rows = list_official()
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        tokenizer = f"; tokenizer official:{row['tokenizer']}" if row["tokenizer"] else ""
        print(f"official:{row['name']:<{width}}  {row['kind']:<9}  --format {row['format']:<13}  {row['description']}")
        print(f"          {'':<{width}}  from {row['source']} ({row['license']}){tokenizer}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body():
        if args.list_official:
            print_official()
            return 0
        if not args.ref:
            parser.error("give ORG/REPO or official:NAME (or --list-official)")
        if args.ref.startswith("official:"):
            from zoo.hub.official import pull_official

            if args.revision:
                raise ValueError("--revision applies to Hub repos, not to official:NAME")
            path = pull_official(args.ref, to=args.to, force=args.force)
        else:
            from zoo.hub.api import is_repo_id, pull

            if not is_repo_id(args.ref):
                raise ValueError(f"{args.ref!r}: expected ORG/REPO or official:NAME")
            try:
                path = pull(args.ref, revision=args.revision, to=args.to)
            except FileExistsError as err:
                raise ValueError(str(err)) from None
        print(f"model directory: {path}")
        print(f"try: zoo-sample {path} --num 16 --out samples.png")
        return 0

    return run_cli(body, "zoo-pull", quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
