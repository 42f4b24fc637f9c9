"""Kill a training run again and again, resume it each time, and check that nothing was lost.

    python tools/kill_test.py                                   # 20 random + 10 I/O-point kills, tiny DiT
    python tools/kill_test.py --kills 200 --io-kills 100 --steps 60
    python tools/kill_test.py --recipe recipes/dit_digits.yaml --steps 40 train.batch_size=32 --exec

First one uninterrupted reference run. Then the same recipe in a fresh run directory, started with
``zoo-train ... --resume`` over and over and SIGKILLed:

- **random kills** at a uniformly random instant of the run (``--kills``);
- **I/O-point kills** just before the k-th durability call (``os.replace``, ``os.fsync``,
  ``os.rename``, ``shutil.rmtree``) of the process, k drawn over all such calls of the reference run
  (``--io-kills``): these land inside checkpoint writes, between a folder's rename and the ``latest``
  pointer, in the middle of pruning old checkpoints, and in the model-file and log writes.

After every kill the latest checkpoint must load completely (every tensor of the model, EMA,
optimizer and RNG files, and the trainer state) and its step must never go back. At the end the run
is let finish, and its final checkpoint (weights, EMA, optimizer state, RNG states, data position),
its model files, its sample grid and its logged losses must equal the reference run's exactly.

``--exec`` starts each attempt as a new ``python`` process (what a scheduler does); the default
forks each one from a server process that has already imported zoo, which is much faster and kills
just the same. The report is printed as JSON (``--json FILE`` writes it too).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

DEFAULT_RECIPE = "recipes/dit_digits.yaml"
TINY = [  # the default recipe's DiT made tiny (8x8 digits): a step and a checkpoint take milliseconds
    "model.name=dit-s/2", "model.input_size=8", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
    "data.image_size=8", "train.batch_size=32", "train.warmup_steps=3", "train.ema_decay=0.9",
    "sample.steps=5", "sample.num=10", "sample.batch_size=10",
]
EVERY_STEP = ["train.log_every=1", "train.ckpt_every=1", "train.keep_checkpoints=2", "train.tensorboard=false"]
IO_CALLS = (("os", "replace"), ("os", "fsync"), ("os", "rename"), ("shutil", "rmtree"))


# ---------------------------------------------------------------------------- the child (one attempt)


def child(train_args: list[str], kill_at_io: int, io_log: str, threads: int) -> int:
    """Run ``zoo-train train_args`` in this process; with ``kill_at_io`` > 0, SIGKILL this process just
    before its ``kill_at_io``-th durability call, after writing the call's stack to ``io_log``.
    With ``kill_at_io`` < 0, only count the calls: ``io_log`` gets, as JSON, the count when the
    training loop starts and the total at exit."""
    import shutil as shutil_module

    import torch

    torch.set_num_threads(threads)  # the same in every attempt: thread counts can change float sums
    counter = {"n": 0}
    modules = {"os": os, "shutil": shutil_module}

    def wrap(module_name, name):
        original = getattr(modules[module_name], name)

        def wrapper(*args, **kwargs):
            counter["n"] += 1
            if counter["n"] == kill_at_io:
                where = [f.name for f in traceback.extract_stack()[:-1] if f"{os.sep}zoo{os.sep}" in f.filename]
                with open(io_log, "a") as handle:
                    handle.write(json.dumps({"call": f"{module_name}.{name}", "stack": where}) + "\n")
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        return wrapper

    if kill_at_io:
        for module_name, name in IO_CALLS:
            setattr(modules[module_name], name, wrap(module_name, name))
    from zoo.cli.train import main
    from zoo.train.trainer import Trainer

    fit = Trainer.fit

    def counted_fit(self, *args, **kwargs):
        counter.setdefault("at_fit", counter["n"])
        return fit(self, *args, **kwargs)

    Trainer.fit = counted_fit
    code = main(train_args)
    if kill_at_io < 0:
        Path(io_log).write_text(json.dumps({"at_fit": counter.get("at_fit", 0), "total": counter["n"]}))
    return code


def _child_entry(train_args, kill_at_io, io_log, threads, output):  # a forked attempt's target
    sys.stdout = sys.stderr = open(output, "a", buffering=1)
    try:
        code = child(train_args, kill_at_io, io_log, threads)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code)


def _nothing():
    pass


class Launcher:
    """Starts attempts as forks of a preloaded server (fast) or as new Python processes (``exec``)."""

    def __init__(self, exec_mode: bool, threads: int, output: Path):
        self.exec_mode = exec_mode
        self.threads = threads
        self.output = output  # every attempt's stdout and stderr, appended
        if not exec_mode:
            self.context = multiprocessing.get_context("forkserver")
            # What an attempt would otherwise import first: the forks start in milliseconds.
            self.context.set_forkserver_preload(["zoo.cli.train", "zoo.train.trainer", "torch._dynamo",
                                                 "sklearn.datasets", "zoo.generators", "zoo.tokenizers"])
            warm_up = self.context.Process(target=_nothing)  # start the server now, not in a timed attempt
            warm_up.start()
            warm_up.join()

    def start(self, train_args: list[str], kill_at_io: int = 0, io_log: str = os.devnull):
        if self.exec_mode:
            cmd = [sys.executable, __file__, "_child", "--kill-at-io", str(kill_at_io), "--io-log", io_log,
                   "--threads", str(self.threads), "--", *train_args]
            with open(self.output, "a") as out:
                return _Exec(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
        process = self.context.Process(target=_child_entry,
                                       args=(train_args, kill_at_io, io_log, self.threads, str(self.output)))
        process.start()
        return _Forked(process)


class _Exec:
    def __init__(self, popen):
        self.popen = popen

    def alive(self):
        return self.popen.poll() is None

    def kill(self):
        self.popen.kill()

    def wait(self, timeout=None):
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


class _Forked:
    def __init__(self, process):
        self.process = process

    def alive(self):
        return self.process.is_alive()

    def kill(self):
        self.process.kill()

    def wait(self, timeout=None):
        self.process.join(timeout)
        return self.process.exitcode


# ---------------------------------------------------------------------------- checks


def _wait_for_a_checkpoint_after(run_dir: Path, step: int, attempt, timeout: float) -> None:
    """Until the run's ``latest`` names a step past ``step`` (or the attempt ends)."""
    pointer = run_dir / "checkpoints" / "latest"
    deadline = time.perf_counter() + timeout
    while attempt.alive() and time.perf_counter() < deadline:
        try:
            if int(pointer.read_text().strip().split("-")[1]) > step:
                return
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.002)


def load_latest(run_dir: Path) -> int | None:
    """Load every file of the run's latest checkpoint (raises if any is unreadable); its step."""
    from safetensors.torch import load_file

    from zoo.train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        return None
    state = ckpt.read_state(latest)
    for name in (ckpt.MODEL_NAME, ckpt.EMA_NAME):
        load_file(str(latest / name))
    ckpt.load_optimizer(latest / ckpt.OPTIMIZER_NAME)
    ckpt.load_rng_states(latest / ckpt.RNG_NAME)
    return int(state["step"])


def differences(reference: Path, run: Path) -> list[str]:
    """Everything in which ``run`` (finished) differs from ``reference``; empty when they are equal."""
    import torch
    from safetensors.torch import load_file

    from zoo.train import checkpoint as ckpt

    out = []
    a, b = ckpt.latest_checkpoint(reference), ckpt.latest_checkpoint(run)
    if a.name != b.name:
        return [f"latest checkpoint {b.name}, reference {a.name}"]
    pairs = [(a / n, b / n) for n in (ckpt.MODEL_NAME, ckpt.EMA_NAME)]
    pairs += [(reference / n, run / n) for n in ("model.safetensors", "model_raw.safetensors")]
    for left, right in pairs:
        x, y = load_file(str(left)), load_file(str(right))
        out += [f"{right}: {k}" for k in x if k not in y or not torch.equal(x[k], y[k])]
    x, y = ckpt.load_optimizer(a / ckpt.OPTIMIZER_NAME), ckpt.load_optimizer(b / ckpt.OPTIMIZER_NAME)
    if x["param_groups"] != y["param_groups"]:
        out.append("optimizer param_groups")
    for pid, values in x["state"].items():
        for key, value in values.items():
            other = y["state"].get(pid, {}).get(key)
            same = torch.equal(value, other) if torch.is_tensor(value) else value == other
            if not same:
                out.append(f"optimizer state {pid}.{key}")
    rng_a, rng_b = ckpt.load_rng_states(a / ckpt.RNG_NAME), ckpt.load_rng_states(b / ckpt.RNG_NAME)
    for rank, (x, y) in enumerate(zip(rng_a, rng_b)):
        for key in x:
            same = torch.equal(x[key], y[key]) if torch.is_tensor(x[key]) else x[key] == y[key]
            if not same:
                out.append(f"rng state rank {rank} {key}")
    keys = ("step", "epoch", "batch_in_epoch", "skipped_steps")
    x, y = ckpt.read_state(a), ckpt.read_state(b)
    out += [f"trainer_state {k}: {y.get(k)} vs {x.get(k)}" for k in keys if x.get(k) != y.get(k)]
    grid = Path("samples") / "final.png"
    if (reference / grid).read_bytes() != (run / grid).read_bytes():
        out.append(str(grid))
    if logged_losses(reference) != logged_losses(run):
        out.append("metrics.jsonl losses")
    return out


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["step"], row["loss"]) for row in rows]


# ---------------------------------------------------------------------------- the experiment


def run(recipe: str, overrides: list[str], *, kills: int, io_kills: int, work: Path, seed: int = 0,
        exec_mode: bool = False, threads: int = 1, timeout: float = 600.0) -> dict:
    """The whole experiment (see the module docstring); returns the report."""
    rng = random.Random(seed)
    output = work / "attempts.log"
    output.unlink(missing_ok=True)
    launcher = Launcher(exec_mode, threads, output)
    reference, run_dir = work / "reference", work / "killed"
    for path in (reference, run_dir):
        shutil.rmtree(path, ignore_errors=True)
    count_file = str(work / "io_count.txt")

    def args(path):
        return [recipe, *overrides, "--run-dir", str(path), "--resume", "--no-progress", "--cpu"]

    started = time.perf_counter()
    attempt = launcher.start(args(reference), kill_at_io=-1, io_log=count_file)
    first_checkpoint = None  # ~ start-up time plus one step
    while attempt.alive() and time.perf_counter() - started < timeout:
        if first_checkpoint is None and (reference / "checkpoints" / "latest").is_file():
            first_checkpoint = time.perf_counter() - started
        time.sleep(0.005)
    code = attempt.wait(timeout)
    reference_seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the reference run failed (exit {code}): {output.read_text()[-3000:]}")
    counts = json.loads(Path(count_file).read_text())
    io_total = counts["total"]
    steps = max(1, len(logged_losses(reference)))
    # A fifth of the random kills land in the start-up (building, resuming); the others after the
    # attempt's first new checkpoint, within twice the run's share of steps per kill (at least one),
    # so that every attempt moves the run on and the kills spread over all of it, its end included.
    per_kill = max(1.0, steps / max(1, kills + io_kills))
    step_seconds = (reference_seconds - (first_checkpoint or 0.0)) / max(1, steps - 1)
    startup = max(0.0, (first_checkpoint or 0.0) - step_seconds)
    calls_per_step = (io_total - counts["at_fit"]) / steps
    io_window = counts["at_fit"] + max(1, int(2 * per_kill * calls_per_step))

    io_log = work / "io_kills.jsonl"
    io_log.unlink(missing_ok=True)
    plan = ["random"] * kills + ["io"] * io_kills
    rng.shuffle(plan)
    report = {"recipe": recipe, "overrides": overrides, "mode": "exec" if exec_mode else "fork",
              "reference_seconds": round(reference_seconds, 2), "steps": steps, "io_calls_per_run": io_total,
              "random_kills": 0, "io_kills": 0, "finished_before_kill": 0, "mid_write_leftovers": 0,
              "latest_steps": [], "kill_points": {}}
    last_step = -1
    for kind in plan:
        if kind == "random":
            attempt = launcher.start(args(run_dir))
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0.0, startup))
            else:
                _wait_for_a_checkpoint_after(run_dir, last_step, attempt, timeout)
                time.sleep(rng.uniform(0.0, 2 * (per_kill - 1) * step_seconds + step_seconds))
            if not attempt.alive():
                report["finished_before_kill"] += 1
                attempt.wait(timeout)
                continue
            attempt.kill()
            attempt.wait(timeout)
            report["random_kills"] += 1
        else:
            attempt = launcher.start(args(run_dir), kill_at_io=rng.randint(1, io_window), io_log=str(io_log))
            code = attempt.wait(timeout)
            if code not in (-signal.SIGKILL, 128 + signal.SIGKILL):
                report["finished_before_kill"] += 1  # the run was already further than that call
                continue
            report["io_kills"] += 1
        root = run_dir / "checkpoints"
        if root.is_dir() and any(p.name.endswith((".tmp", ".trash")) for p in root.iterdir()):
            report["mid_write_leftovers"] += 1
        step = load_latest(run_dir)  # raises if the latest checkpoint does not load
        step = -1 if step is None else step
        if step < last_step:
            raise AssertionError(f"the latest checkpoint went back from step {last_step} to {step}")
        last_step = step
        report["latest_steps"].append(step)
    for line in io_log.read_text().splitlines() if io_log.is_file() else []:
        point = json.loads(line)
        # The innermost step of a save that names what was being written.
        known = ("_discard", "save_optimizer", "save_rng_states", "write_checkpoint", "save_model_dir",
                 "clean_partial", "_truncate_log", "write_sample_grid", "save")
        inside = next((f for f in reversed(point["stack"]) if f in known),
                      point["stack"][-1] if point["stack"] else "start-up")
        key = f"{point['call']} in {inside}"
        report["kill_points"][key] = report["kill_points"].get(key, 0) + 1
    attempt = launcher.start(args(run_dir))
    code = attempt.wait(timeout)
    if code != 0:
        raise RuntimeError(f"the final resume failed (exit {code}): {output.read_text()[-3000:]}")
    report["kills"] = report["random_kills"] + report["io_kills"]
    report["differences"] = differences(reference, run_dir)
    report["equal"] = not report["differences"]
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--kill-at-io", type=int, default=0)
        parser.add_argument("--io-log", default=os.devnull)
        parser.add_argument("--threads", type=int, default=1)
        parser.add_argument("train_args", nargs=argparse.REMAINDER)
        args = parser.parse_args(argv[1:])
        train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
        return child(train_args, args.kill_at_io, args.io_log, args.threads)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="extra key.path=value overrides")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help="the recipe (default: the default recipe's DiT made tiny; another recipe runs as it "
                             "is, with a checkpoint and a log line every step, plus your overrides)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train.max_steps of the run (default: one per kill, at least 30)")
    parser.add_argument("--kills", type=int, default=20, help="kills at random instants")
    parser.add_argument("--io-kills", type=int, default=10, help="kills just before a random durability call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plan")
    parser.add_argument("--exec", action="store_true", help="a new python process per attempt (slower)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per attempt")
    parser.add_argument("--work-dir", help="where the two runs go (default: a temporary folder)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    tiny = TINY if args.recipe == DEFAULT_RECIPE else []
    steps = args.steps or max(30, args.kills + args.io_kills)
    overrides = [*tiny, *EVERY_STEP, f"train.max_steps={steps}", *args.overrides]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="zoo-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    report = run(args.recipe, overrides, kills=args.kills, io_kills=args.io_kills, work=work, seed=args.seed,
                 exec_mode=args.exec, threads=args.threads)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if report["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
