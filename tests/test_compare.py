"""zoo-compare: the grid layout, the report's files, and models of different families in one call."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tests.test_eval import TINY_DIT, make_model_dir
from tests.test_mar import RECIPE as MAR_RECIPE
from tests.test_var import RECIPE as VAR_RECIPE
from zoo.eval.report import comparison_grid

TINY_VAR = {**VAR_RECIPE, "train": {"batch_size": 8}, "sample": {"cfg_scale": 1.5, "batch_size": 8}}
TINY_MAR = {**MAR_RECIPE, "model": {**MAR_RECIPE["model"], "num_sampling_steps": "3", "encoder_embed_dim": 32,
                                     "decoder_embed_dim": 32, "encoder_depth": 1, "decoder_depth": 1,
                                     "encoder_num_heads": 2, "decoder_num_heads": 2, "diffloss_d": 1,
                                     "diffloss_w": 32},
            "sample": {"cfg_scale": 1.0, "num_iter": 2, "batch_size": 8}}


def test_grid_has_a_row_per_model_and_a_column_per_label():
    rows = [torch.full((3, 1, 8, 8), -1.0), torch.full((3, 1, 8, 8), 0.0)]
    rows[1][2] = 1.0  # model 1, label 2: white
    image, layout = comparison_grid(rows, ["dit", "var"], ["0", "1", "2"], tile=32, padding=2)
    assert (layout.rows, layout.columns, layout.tile) == (2, 3, 32)
    assert image.size == layout.size == (layout.left + 2 + 3 * 34, layout.top + 2 + 2 * 34)
    pixels = np.asarray(image.convert("L"))

    def tile(r, c):
        x, y = layout.origin(r, c)
        return pixels[y:y + 32, x:x + 32]

    assert (tile(0, 0) == 0).all() and (tile(0, 2) == 0).all()  # black, -1
    assert (tile(1, 0) == 128).all() and (tile(1, 2) == 255).all()  # grey 0, white 1
    assert (pixels[layout.origin(1, 0)[1] - 1, layout.origin(1, 0)[0]:layout.origin(1, 1)[0] - 2] == 255).all()


def test_grid_refuses_rows_of_different_lengths():
    with pytest.raises(ValueError, match="every row needs 3 images"):
        comparison_grid([torch.zeros(3, 1, 8, 8), torch.zeros(2, 1, 8, 8)], ["a", "b"], ["0", "1", "2"])


@pytest.fixture(scope="module")
def three_families(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    dit = make_model_dir(root / "dit", TINY_DIT)
    # A run's training log, as the trainer writes it (metrics.jsonl), for the loss plot.
    (dit / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n"
                                               for s in (2, 4, 6)))
    return [dit, make_model_dir(root / "var", TINY_VAR), make_model_dir(root / "mar", TINY_MAR)]


def test_models_of_three_families_compare_in_one_call(three_families, tmp_path):
    from zoo.eval.compare import compare

    result = compare(three_families, out=tmp_path / "cmp", labels="0,3,7", num=6, batch_size=3, train_steps=1,
                     train_batch=4, device="cpu", isolate=False, progress=False)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["dit", "var", "mar"]
    assert [rows[n]["generator"] for n in rows] == ["dit-s/2", "var-d2", "mar-t"]
    # NFE: DiT's 3 DDIM steps, VAR's 3 scales, MAR's 2 unmasking iterations.
    assert [rows[n]["nfe_per_image"] for n in rows] == [3, 3, 2]
    for row in rows.values():
        assert row["params"] > 0 and row["gflops_per_image"] > 0 and row["sample_images_per_s"] > 0
        assert row["train_images_per_s"] > 0 and row["sample_peak_mb"] >= 0
        assert 0 <= row["agreement"] <= 1 and row["fd_digits"] > 0
    assert rows["var"]["tokenizer_params"] > 0 and rows["dit"]["tokenizer_params"] == 0
    assert rows["dit"]["final_loss"] == pytest.approx(1 / 6) and "final_loss" not in rows["var"]
    assert all("train_minutes" not in row for row in rows.values())  # model directories: no checkpoints
    grid = result["files"]["grid"]
    from PIL import Image

    with Image.open(grid) as image:
        _, layout = comparison_grid([torch.zeros(3, 1, 8, 8)] * 3, list(rows), ["0", "3", "7"])
        assert image.size == layout.size  # three rows, three columns
    table = json.loads((tmp_path / "cmp" / "table.json").read_text())
    assert table["labels"] == [0, 3, 7] and len(table["rows"]) == 3
    assert "| dit |" in (tmp_path / "cmp" / "table.md").read_text()


def test_the_report_embeds_its_images_and_links_only_existing_files(three_families, tmp_path):
    from zoo.eval.compare import compare

    out = tmp_path / "cmp"
    compare(three_families[:2], out=out, labels="1,2", num=0, batch_size=2, train_steps=0, device="cpu",
            isolate=False, progress=False)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # the grid and the loss curves
    links = re.findall(r'href="([^"]+)"', page)
    assert {"table.md", "table.json", "grid.png", "losses.png"} <= set(links)
    assert all((out / link).is_file() for link in links)
    assert "dit" in page and "var" in page


def test_zoo_compare_cli_measures_each_model_in_its_own_process(three_families, tmp_path, capsys):
    from zoo.cli import compare as compare_cli

    out = tmp_path / "cli"
    assert compare_cli.main([str(three_families[0]), "--labels", "5", "--num", "0",
                             "--batch-size", "2", "--train-steps", "1", "--train-batch", "4", "--device", "cpu",
                             "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| dit |" in printed and "report.html" in printed
    (row,) = json.loads((out / "table.json").read_text())["rows"]
    assert row["memory_method"] and row["train_peak_mb"] >= 0 and row["train_batch"] == 4


def test_zoo_compare_refuses_a_label_a_model_does_not_have(three_families, tmp_path, capsys):
    from zoo.cli import compare as compare_cli

    assert compare_cli.main([str(three_families[0]), "--labels", "12", "--out", str(tmp_path)]) == 2
    assert "label 12 is outside 0..9" in capsys.readouterr().err


def test_a_run_directory_reports_its_train_minutes_with_its_tokenizers(tmp_path):
    from zoo.eval.compare import _train_minutes
    from zoo.train import checkpoint as ckpt

    def checkpoint(run_dir, seconds):
        ckpt.write_checkpoint(run_dir, 4, {}, {"step": 4, "train_seconds": seconds}, keep=1)

    run = tmp_path / "run"
    checkpoint(run, 90.0)
    assert _train_minutes(run) == {"train_minutes": pytest.approx(1.5)}
    checkpoint(run / "tokenizer", 30.0)  # a tokenizer the run trained first
    assert _train_minutes(run) == {"train_minutes": pytest.approx(2.0), "tokenizer_train_minutes": pytest.approx(0.5)}
    assert _train_minutes(tmp_path / "not-a-run") == {}
