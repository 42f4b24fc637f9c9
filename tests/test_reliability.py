"""Faults during training: kills at any instant, a full disk, NaN losses and gradients, failing logs."""

import errno
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.errors import NonFiniteError, WriteError
from zoo.recipe import load_recipe
from zoo.train import Trainer
from zoo.train import checkpoint as ckpt

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name):
    if str(TOOLS) not in sys.path:  # the forked attempts import it by name
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_thirty_sigkills_at_random_instants_and_inside_writes_lose_nothing(tmp_path):
    kill_test = load_tool("kill_test")
    overrides = [*kill_test.TINY, *kill_test.EVERY_STEP, "train.max_steps=30"]
    report = kill_test.run(kill_test.DEFAULT_RECIPE, overrides, kills=20, io_kills=10, work=tmp_path, seed=0)
    # Every kill was followed by a load of the latest checkpoint (run() raises otherwise) whose step
    # never went back; the finished run equals the uninterrupted one in every saved tensor.
    assert report["random_kills"] + report["io_kills"] >= 20, report
    assert report["differences"] == [], report
    assert report["mid_write_leftovers"] >= 1, report  # some kills did land inside a checkpoint write
    assert any("write_checkpoint" in point or "save_" in point for point in report["kill_points"]), report
    assert report["latest_steps"][-1] > 0


def test_checkpoint_files_load_without_pickle_and_hold_every_processes_rng(tiny_recipe_file, tmp_path):
    run = tmp_path / "run"
    Trainer(load_recipe(tiny_recipe_file, ["train.ckpt_every=2"]), run, progress=False, cpu=True).fit()
    latest = ckpt.latest_checkpoint(run)
    assert sorted(p.name for p in latest.iterdir()) == sorted(
        [ckpt.MODEL_NAME, ckpt.EMA_NAME, ckpt.OPTIMIZER_NAME, ckpt.RNG_NAME, ckpt.STATE_NAME])
    state = ckpt.read_state(latest)
    assert state["step"] == 6 and state["pieces"] == 1 and state["epoch"] == 0 and state["batch_in_epoch"] == 6
    optimizer = ckpt.load_optimizer(latest / ckpt.OPTIMIZER_NAME)
    assert optimizer["state"][0]["exp_avg"].dtype == torch.float32 and len(optimizer["param_groups"]) >= 1
    (rng,) = ckpt.load_rng_states(latest / ckpt.RNG_NAME)
    assert rng["torch"].dtype == torch.uint8 and rng["numpy"].numel() == 624
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-0000004", "step-0000006"]  # keep 2


def test_a_save_writes_renames_points_and_only_then_prunes(tmp_path, monkeypatch):
    events = []
    real_replace, real_discard = ckpt.os.replace, ckpt._discard
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)),
                                                          real_replace(a, b))[1])
    monkeypatch.setattr(ckpt, "_discard", lambda folder: (events.append(("prune", folder.name)),
                                                          real_discard(folder))[1])

    def write(path):
        path.write_text("x")

    for step in (1, 2, 3):
        ckpt.write_checkpoint(tmp_path, step, {"a.txt": write}, {"step": step}, keep=2)
    third = events[events.index(("rename", "step-0000003")):]
    assert [e for e in third if e[1] in ("step-0000003", "latest", "step-0000001")] == [
        ("rename", "step-0000003"), ("rename", "latest"), ("prune", "step-0000001")]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000003"
    with pytest.raises(ValueError, match="already the latest checkpoint"):
        ckpt.write_checkpoint(tmp_path, 3, {}, {"step": 3}, keep=2)


def test_a_broken_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    for step in (1, 2):
        ckpt.write_checkpoint(tmp_path, step, {}, {"step": step}, keep=3)
    (tmp_path / "checkpoints" / "latest").write_text("step-0000009\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000002"
    assert "names 'step-0000009', which is incomplete or missing" in capsys.readouterr().err
    (tmp_path / "checkpoints" / "latest").unlink()
    (tmp_path / "checkpoints" / "step-0000003.tmp").mkdir()  # a save killed half way
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000002"


@pytest.mark.parametrize("code, where", [(errno.ENOSPC, "save_safetensors"), (errno.EACCES, "replace")])
def test_disk_full_or_no_permission_while_saving_keeps_the_previous_checkpoint(tiny_recipe_file, tmp_path,
                                                                                monkeypatch, code, where):
    run = tmp_path / "run"
    trainer = Trainer(load_recipe(tiny_recipe_file, ["train.ckpt_every=2"]), run, progress=False, cpu=True)
    trainer.fit(stop_at=2)
    if where == "save_safetensors":
        def fail(path, tensors, metadata=None):
            raise OSError(code, "No space left on device", str(path))
        monkeypatch.setattr(ckpt, "save_safetensors", fail)
    else:
        real = ckpt.os.replace

        def fail(src, dst):
            if Path(dst).name.startswith("step-"):
                raise PermissionError(code, "Permission denied", str(dst))
            return real(src, dst)
        monkeypatch.setattr(ckpt.os, "replace", fail)
    resumed = Trainer(load_recipe(tiny_recipe_file, ["train.ckpt_every=2"]), run, resume=True, progress=False,
                      cpu=True)
    with pytest.raises(WriteError) as caught:
        resumed.fit()
    message = str(caught.value)
    assert "checkpoint step-0000004 was not saved" in message
    assert "step-0000002 is still the latest checkpoint" in message
    assert ("No space left on device" if code == errno.ENOSPC else "Permission denied") in message
    assert ckpt.latest_checkpoint(run).name == "step-0000002"
    assert not list((run / "checkpoints").glob("*.tmp"))
    load_file(str(ckpt.latest_checkpoint(run) / ckpt.MODEL_NAME))


def test_zoo_train_reports_a_full_disk_in_one_line_with_exit_status_1(tiny_recipe_file, tmp_path, monkeypatch,
                                                                      capsys):
    from zoo.cli.train import main

    def fail(path, tensors, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "save_safetensors", fail)
    code = main([str(tiny_recipe_file), "--run-dir", str(tmp_path / "run"), "--no-progress", "--cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith("zoo-train: error: checkpoint step-0000006 was not saved") and "no earlier checkpoint" in err


def _poison_loss_at(trainer, step, term="vb"):
    net = trainer.generator
    real = net.loss

    def loss(*args, **kwargs):
        terms = real(*args, **kwargs)
        if trainer.step == step:
            terms[term] = terms[term] * float("nan")
            terms["loss"] = terms["loss"] + terms[term].mean()
        return terms

    net.loss = loss


def test_a_nan_loss_stops_the_run_naming_step_and_term_and_keeps_the_last_checkpoint(tiny_recipe_file, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(load_recipe(tiny_recipe_file, ["train.ckpt_every=2"]), run, progress=False, cpu=True)
    _poison_loss_at(trainer, 3)
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite loss term vb = nan, loss = nan; the step was "
                                             r"not applied") as caught:
        trainer.fit()
    assert "step-0000002 (step 2) is still the latest checkpoint" in str(caught.value)
    assert ckpt.latest_checkpoint(run).name == "step-0000002"
    assert all(torch.isfinite(p).all() for p in trainer.generator.parameters())


def test_a_nan_gradient_is_caught_and_names_the_parameter(tiny_recipe_file, tmp_path):
    trainer = Trainer(load_recipe(tiny_recipe_file), tmp_path / "run", progress=False, cpu=True)
    weight = trainer.generator.final_layer.linear.weight
    weight.register_hook(lambda grad: grad * float("inf") if trainer.step == 1 else grad)
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite gradient .*final_layer\.linear\.weight"):
        trainer.fit()


def test_skip_mode_skips_and_counts_a_nan_step_then_trains_on(tiny_recipe_file, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(load_recipe(tiny_recipe_file, ["train.nonfinite=skip", "train.log_every=1"]), run,
                      progress=False, cpu=True)
    _poison_loss_at(trainer, 3)
    unchanged = []
    real_step = trainer.train_step

    def step(batches):
        before = [p.clone() for p in trainer.generator.parameters()]
        terms = real_step(batches)
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, trainer.generator.parameters())))
        return terms

    trainer.train_step = step
    trainer.fit()
    assert unchanged == [False, False, False, True, False, False]  # the 4th step applied nothing
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [4]
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.generator.parameters())


def test_skip_mode_still_stops_after_too_many_in_a_row(tiny_recipe_file, tmp_path):
    trainer = Trainer(load_recipe(tiny_recipe_file, ["train.nonfinite=skip", "train.nonfinite_max_skips=2"]),
                      tmp_path / "run", progress=False, cpu=True)
    for step in range(1, 6):
        _poison_loss_at(trainer, step)
    with pytest.raises(NonFiniteError, match="step 4: .* 2 steps in a row were already skipped"):
        trainer.fit()


def test_zoo_train_reports_a_diverged_loss_in_one_line(tiny_recipe_file, tmp_path, capsys, monkeypatch):
    from zoo.cli import train as cli
    from zoo.train import trainer as trainer_module

    real_init = trainer_module.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        _poison_loss_at(self, 2)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", init)
    code = cli.main([str(tiny_recipe_file), "--run-dir", str(tmp_path / "run"), "--no-progress", "--cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "zoo-train: error: step 3: non-finite loss term" in err


def test_a_failing_training_log_is_reported_once_and_training_goes_on(tiny_recipe_file, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)  # appending to it fails at every log line
    grid = Trainer(load_recipe(tiny_recipe_file, ["train.log_every=1"]), run, progress=False, cpu=True).fit()
    err = capsys.readouterr().err
    assert grid.is_file() and ckpt.latest_checkpoint(run).name == "step-0000006"
    assert err.count("could not write the training log") == 1


def test_a_log_line_cut_short_by_a_kill_is_dropped_on_resume(tiny_recipe_file, tmp_path):
    run = tmp_path / "run"
    Trainer(load_recipe(tiny_recipe_file, ["train.log_every=1"]), run, progress=False, cpu=True).fit(stop_at=3)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "loss": 0.')  # the kill came mid-line
    Trainer(load_recipe(tiny_recipe_file, ["train.log_every=1"]), run, resume=True, progress=False, cpu=True).fit()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_checkpoint_starts_from_step_zero(tiny_recipe_file, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    trainer = Trainer(load_recipe(tiny_recipe_file), run, resume=True, progress=False, cpu=True)
    assert trainer.step == 0 and "has no checkpoint yet; starting from step 0" in capsys.readouterr().out
