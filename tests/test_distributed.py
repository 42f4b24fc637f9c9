"""Several processes through ``accelerate launch`` (gloo on this CPU): the same weights as one process.

A global batch is cut into ``grad_accum_steps × processes`` pieces, piece ``k = micro · processes +
rank`` seeded by ``k``; so 2 processes with one micro-batch each draw exactly what 1 process with
``grad_accum_steps=2`` draws. What may differ is only the order of the gradient sums (DDP's all-reduce
against accumulation in one process): the weights agree to fp32 reduction noise, which over the 6
AdamW steps of these tests stays below ATOL (measured: about 1e-7).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_mar import RECIPE as MAR_TINY
from zoo.recipe import load_recipe
from zoo.train import Trainer
from zoo.train import checkpoint as ckpt
from zoo.train.data import StepBatchSampler

WORKER = Path(__file__).with_name("dist_worker.py")
ATOL = 2e-5
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))

pytestmark = [pytest.mark.slow, pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not installed")]

MAR_RECIPE = {**MAR_TINY,
              "train": {"batch_size": 32, "max_steps": 6, "lr": 1e-3, "log_every": 1, "tensorboard": False,
                        "ema_decay": 0.9},
              "sample": {"num": 10, "batch_size": 10, "num_iter": 2, "steps": 5}}


def launch(recipe, run_dir, report_dir, *extra, processes=2):
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(WORKER), str(recipe), str(run_dir), str(report_dir), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((Path(report_dir) / f"rank{r}.json").read_text()) for r in range(processes)]


def weights(run_dir):
    return {name: load_file(str(Path(run_dir) / name)) for name in ("model.safetensors", "model_raw.safetensors")}


def assert_close_weights(a, b, atol=ATOL):
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=atol, msg=f"{name}: {key}")


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def dit_recipe(tiny_recipe_dict, tmp_path):
    recipe = dict(tiny_recipe_dict, train={**tiny_recipe_dict["train"], "log_every": 1, "ckpt_every": 3})
    path = tmp_path / "dit.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def one_process(recipe, run_dir, accum=2):
    Trainer(load_recipe(recipe, [f"train.grad_accum_steps={accum}"]), run_dir, progress=False, cpu=True).fit()


def test_two_processes_give_the_weights_of_one_with_the_same_pieces_and_read_disjoint_shards(dit_recipe, tmp_path):
    reports = launch(dit_recipe, tmp_path / "two", tmp_path / "report")
    one_process(dit_recipe, tmp_path / "one")
    assert_close_weights(weights(tmp_path / "two"), weights(tmp_path / "one"))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    # A different cut of the batch draws other noise: that is far outside the tolerance above.
    one_process(dit_recipe, tmp_path / "one-piece", accum=1)
    with pytest.raises(AssertionError):
        assert_close_weights(weights(tmp_path / "two"), weights(tmp_path / "one-piece"))

    # Each process loaded its own half of every global batch, and together all of it.
    n = len(load_recipe(dit_recipe).data.build())
    stream = iter(StepBatchSampler(n, 32, seed=0))
    for step in range(6):
        halves = [set(r["loaded"][str(step)]) for r in reports]
        assert len(halves[0]) == len(halves[1]) == 16 and not halves[0] & halves[1]
        assert {key % n for key in halves[0] | halves[1]} == set(next(stream))
    # Only the main process wrote anything under the run directory.
    assert reports[1]["writes"] == []
    assert ckpt.latest_checkpoint(tmp_path / "two").name == "step-0000006"


def test_a_two_process_run_resumes_across_launches_exactly(dit_recipe, tmp_path):
    launch(dit_recipe, tmp_path / "whole", tmp_path / "r0")
    launch(dit_recipe, tmp_path / "parts", tmp_path / "r1", "--stop-at", "3")
    assert ckpt.latest_checkpoint(tmp_path / "parts").name == "step-0000003"
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "parts"))["processes"] == 2
    reports = launch(dit_recipe, tmp_path / "parts", tmp_path / "r2", "--resume")
    assert sorted(int(s) for s in reports[0]["loaded"]) == [3, 4, 5]
    assert_close_weights(weights(tmp_path / "parts"), weights(tmp_path / "whole"), atol=0)
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    # The same checkpoint also continues in one process with two micro-batches.
    shutil.copytree(tmp_path / "parts" / "checkpoints", tmp_path / "single" / "checkpoints")
    (tmp_path / "single" / "checkpoints" / "latest").write_text("step-0000003\n")
    Trainer(load_recipe(dit_recipe, ["train.grad_accum_steps=2"]), tmp_path / "single", resume=True,
            progress=False, cpu=True).fit()
    assert_close_weights(weights(tmp_path / "single"), weights(tmp_path / "whole"))


def test_mar_on_two_processes_matches_one_process(tmp_path):
    recipe = tmp_path / "mar.yaml"
    recipe.write_text(yaml.safe_dump(MAR_RECIPE))
    reports = launch(recipe, tmp_path / "two", tmp_path / "report")
    one_process(recipe, tmp_path / "one")
    assert_close_weights(weights(tmp_path / "two"), weights(tmp_path / "one"))
    assert reports[1]["writes"] == []
