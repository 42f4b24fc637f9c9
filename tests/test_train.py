"""The trainer end to end: a tiny run, exact resume, atomic checkpoints, data order, schedules."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zoo.optim import lr_at, param_groups
from zoo.recipe import load_recipe
from zoo.train import Trainer
from zoo.train.checkpoint import latest_checkpoint
from zoo.train.data import StepBatchSampler


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_a_model_directory_grid_and_logs(tiny_recipe_file, tmp_path):
    run = tmp_path / "run"
    grid = Trainer(load_recipe(tiny_recipe_file), run, progress=False, cpu=True).fit()
    assert grid == run / "samples" / "final.png" and grid.stat().st_size > 0
    for name in ("config.json", "model.safetensors", "model_raw.safetensors", "recipe.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert latest_checkpoint(run).name == "step-0000006"
    config = json.loads((run / "config.json").read_text())
    assert config["generator"]["name"] == "dit-s/2" and config["data"]["num_classes"] == 10
    ema, raw = load_file(run / "model.safetensors"), load_file(run / "model_raw.safetensors")
    assert not torch.equal(ema["final_layer.linear.weight"], raw["final_layer.linear.weight"])


def test_resumed_run_equals_the_uninterrupted_one_mid_epoch(tiny_recipe_file, tmp_path):
    # 600-image batches: 2 steps an epoch, so stopping at step 3 stops in the middle of epoch 1.
    overrides = ["train.batch_size=600", "train.max_steps=6", "train.log_every=1", "train.lr_schedule=cosine",
                 "train.warmup_steps=2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Trainer(load_recipe(tiny_recipe_file, overrides), whole, progress=False, cpu=True).fit()
    Trainer(load_recipe(tiny_recipe_file, overrides), parts, progress=False, cpu=True).fit(stop_at=3)
    assert not (parts / "samples" / "final.png").exists()
    Trainer(load_recipe(tiny_recipe_file, overrides), parts, resume=True, progress=False, cpu=True).fit()
    assert losses(parts) == losses(whole)
    for name in ("model.safetensors", "model_raw.safetensors"):
        a, b = load_file(whole / name), load_file(parts / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_checkpoints_record_the_train_time_of_their_steps_across_sessions(tiny_recipe_file, tmp_path, monkeypatch):
    import time

    from zoo.train.checkpoint import read_state, recorded_train_seconds

    clock = {"now": 100.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr("zoo.train.trainer.Trainer.train_step",
                        lambda self, batch_iter: (clock.__setitem__("now", clock["now"] + 2.0),
                                                  setattr(self, "step", self.step + 1),
                                                  {"loss": 1.0, "lr": 1e-3})[-1])
    run = tmp_path / "run"
    assert recorded_train_seconds(run) is None
    Trainer(load_recipe(tiny_recipe_file), run, progress=False, cpu=True).fit(stop_at=2)
    assert recorded_train_seconds(run) == pytest.approx(4.0)  # two steps of 2 s each
    clock["now"] += 1000.0  # time between the sessions is not training
    Trainer(load_recipe(tiny_recipe_file), run, resume=True, progress=False, cpu=True).fit()
    state = read_state(latest_checkpoint(run))
    assert state["step"] == 6 and state["train_seconds"] == pytest.approx(12.0)


def test_starting_over_an_existing_run_without_resume_is_refused(tiny_recipe_file, tmp_path):
    from zoo.config import ConfigError

    run = tmp_path / "run"
    Trainer(load_recipe(tiny_recipe_file, ["train.max_steps=1"]), run, progress=False, cpu=True).fit()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        Trainer(load_recipe(tiny_recipe_file), run, progress=False, cpu=True)


def test_a_half_written_checkpoint_is_ignored_on_resume(tiny_recipe_file, tmp_path):
    run = tmp_path / "run"
    Trainer(load_recipe(tiny_recipe_file), run, progress=False, cpu=True).fit(stop_at=2)
    crashed = run / "checkpoints" / "step-0000004.tmp"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"\x00" * 10)  # a crash mid-write
    trainer = Trainer(load_recipe(tiny_recipe_file), run, resume=True, progress=False, cpu=True)
    assert trainer.step == 2 and not crashed.exists()


def test_batch_order_is_a_function_of_seed_and_step():
    full = StepBatchSampler(10, 4, seed=3)
    it = iter(full)
    first_five = [next(it) for _ in range(5)]
    resumed = iter(StepBatchSampler(10, 4, seed=3, start_step=3))
    assert [next(resumed) for _ in range(2)] == first_five[3:]
    # within an epoch (2 steps of 4 out of 10 items) no index repeats
    assert len(set(first_five[0] + first_five[1])) == 8


def test_batches_split_across_accumulation_and_processes_cover_the_global_batch():
    shards = [iter(StepBatchSampler(12, 8, seed=0, accum=2, rank=r, world=2)) for r in range(2)]
    pieces = [next(s) for _ in range(2) for s in shards]  # 2 micro-batches x 2 processes
    assert all(len(p) == 2 for p in pieces)
    whole = next(iter(StepBatchSampler(12, 8, seed=0)))
    assert sorted(sum(pieces, [])) == sorted(whole)


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    kw = dict(base_lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(60, schedule="constant", **kw) == 1.0


def test_no_weight_decay_on_norms_biases_and_embeddings_and_lr_scales_apply(tiny_dit_overrides):
    import zoo

    model = zoo.create_model("dit-s/2", **tiny_dit_overrides)
    groups = param_groups(model, weight_decay=0.05, lr_scale={"y_embedder.*": 0.1})
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    for name in ("blocks.0.attn.qkv.bias", "y_embedder.embedding_table.weight", "x_embedder.proj.weight"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["y_embedder.embedding_table.weight"]["lr_scale"] == 0.1
    assert "pos_embed" not in by_name  # frozen
    with pytest.raises(ValueError, match="pattern 'nothing.*' matches no parameter"):
        param_groups(model, 0.0, {"nothing.*": 2.0})


def test_gradient_accumulation_equals_the_full_batch_step(tiny_recipe_file, tmp_path):
    def one_step(accum):
        recipe = load_recipe(tiny_recipe_file, ["train.batch_size=64", "model.class_dropout_prob=0",
                                                f"train.grad_accum_steps={accum}"])
        trainer = Trainer(recipe, tmp_path / f"accum{accum}", progress=False, cpu=True)
        net = trainer.generator
        torch.manual_seed(0)
        with torch.no_grad():  # leave the zero init so the output depends on every weight
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        fixed_t = torch.full((64,), 300)
        # A deterministic loss (fixed timestep, no noise) so that the two runs see identical maths.
        net.loss = lambda latents, cond: {"loss": net(latents, fixed_t[: len(latents)], cond).square().mean()}
        trainer.train_step(iter(trainer._loader()))
        return {k: v.clone() for k, v in net.state_dict().items()}

    full, accumulated = one_step(1), one_step(2)
    for key in full:
        torch.testing.assert_close(accumulated[key], full[key], rtol=1e-4, atol=1e-6)


def test_ctrl_c_finishes_the_step_checkpoints_and_resumes(tiny_recipe_file, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli.train", str(tiny_recipe_file), "--run-dir", str(run),
                             "--no-progress", "--cpu", "train.max_steps=100000", "train.log_every=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "continue with --run-dir" in out
    latest = latest_checkpoint(run)
    assert latest is not None and 0 < int(latest.name.split("-")[1]) < 100000
    assert not (run / "samples" / "final.png").exists()
    trainer = Trainer(load_recipe(tiny_recipe_file, ["train.max_steps=100000"]), run, resume=True, progress=False,
                      cpu=True)
    assert trainer.step == int(latest.name.split("-")[1])


def test_var_follows_its_release_weight_decay_list():
    from zoo.optim import param_groups
    from zoo.registry import create_model

    model = create_model("var-d2", embed_dim=32, num_heads=2, num_classes=10, patch_nums=(1, 2), vocab_size=16,
                         Cvae=4)
    groups = param_groups(model, 0.05, {})
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert {"word_embed.weight", "class_emb.weight", "head.weight"} <= decayed
    assert not decayed & {"pos_1LC", "pos_start", "lvl_embed.weight", "head.bias"}
    assert not any("scale_mul" in n for n in decayed)
