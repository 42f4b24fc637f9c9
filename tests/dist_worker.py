"""One process of a multi-process training run, started by ``accelerate launch`` from test_distributed.py.

    accelerate launch --cpu --num_processes 2 tests/dist_worker.py RECIPE RUN_DIR REPORT_DIR
        [--stop-at N] [--resume] [key.path=value ...]

It trains through the ordinary :class:`zoo.train.Trainer` and, beside it, records for the test what
this process did: the dataset items it loaded at each step, and (audit hooks, on processes other than
the main one) every file it created, replaced, renamed or removed under the run directory. The report
goes to REPORT_DIR/rank<R>.json, outside the run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("run_dir")
    parser.add_argument("report_dir")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    run_dir = Path(args.run_dir).resolve()
    rank = int(os.environ.get("RANK", "0"))
    writes: list[str] = []

    def audit(event, event_args):
        if event == "open" and event_args[1] is not None:
            path, mode, flags = event_args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writing else []
        elif event in ("os.rename", "os.replace"):
            paths = list(event_args[:2])
        elif event in ("os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"):
            paths = [event_args[0]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)) and str(Path(os.fsdecode(path)).resolve()).startswith(
                    str(run_dir)):
                writes.append(f"{event} {os.fsdecode(path)}")

    if rank != 0:
        sys.addaudithook(audit)

    import torch

    torch.set_num_threads(1)
    from zoo.recipe import load_recipe
    from zoo.train import Trainer
    from zoo.train import trainer as trainer_module

    loaded: dict[int, list[int]] = {}
    current = {"step": None}
    get_item = trainer_module.EpochIndexed.__getitem__

    def recording_get_item(self, key):
        loaded.setdefault(current["step"], []).append(int(key))
        return get_item(self, key)

    trainer_module.EpochIndexed.__getitem__ = recording_get_item
    trainer = Trainer(load_recipe(args.recipe, args.overrides), run_dir, resume=args.resume, progress=False,
                      cpu=True)
    train_step = trainer.train_step

    def recording_step(batches):
        current["step"] = trainer.step
        return train_step(batches)

    trainer.train_step = recording_step
    trainer.fit(stop_at=args.stop_at)
    report = {"rank": rank, "world": trainer.accelerator.num_processes,
              "loaded": {str(k): v for k, v in loaded.items() if k is not None}, "writes": writes}
    Path(args.report_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.report_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
