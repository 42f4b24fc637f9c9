"""Command-line smoke tests: zoo-train and zoo-sample as a user calls them."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from zoo.cli import sample as sample_cli
from zoo.cli import train as train_cli


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import yaml

    from tests.conftest import TINY_RECIPE

    root = tmp_path_factory.mktemp("cli")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    run = root / "run"
    assert train_cli.main([str(recipe), "--run-dir", str(run), "--no-progress", "--cpu", "train.max_steps=3"]) == 0
    return run


def test_zoo_train_prints_the_run_dir_and_grid(trained_run, capsys):
    assert (trained_run / "samples" / "final.png").is_file()


def test_zoo_sample_writes_adm_npz_with_cycled_labels(trained_run, tmp_path):
    out = tmp_path / "s.npz"
    assert sample_cli.main([str(trained_run), "--num", "12", "--labels", "all", "--steps", "3", "--out", str(out),
                            "--device", "cpu"]) == 0
    data = np.load(out)
    assert data["arr_0"].shape == (12, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1] and data["arr_1"].dtype == np.int64


def test_zoo_sample_is_deterministic_for_a_seed(trained_run, tmp_path):
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    common = ["--num", "4", "--labels", "3,7", "--steps", "3", "--sampler", "ddpm", "--device", "cpu"]
    sample_cli.main([str(trained_run), *common, "--seed", "5", "--out", str(a)])
    sample_cli.main([str(trained_run), *common, "--seed", "5", "--out", str(b)])
    sample_cli.main([str(trained_run), *common, "--seed", "6", "--out", str(c)])
    assert np.array_equal(np.load(a)["arr_0"], np.load(b)["arr_0"])
    assert not np.array_equal(np.load(a)["arr_0"], np.load(c)["arr_0"])
    assert np.load(a)["arr_1"].tolist() == [3, 7, 3, 7]


def test_zoo_sample_png_grid_has_a_column_per_class(trained_run, tmp_path):
    out = tmp_path / "grid.png"
    assert sample_cli.main([str(trained_run), "--num", "20", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    image = Image.open(out)
    assert image.width > image.height  # 10 columns, 2 rows


def test_zoo_sample_refuses_a_label_outside_the_classes(trained_run, tmp_path, capsys):
    code = sample_cli.main([str(trained_run), "--labels", "12", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert code == 2 and "label 12 is outside 0..9" in capsys.readouterr().err


def test_zoo_sample_refuses_a_directory_that_is_not_a_model(tmp_path, capsys):
    code = sample_cli.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert code == 2 and "not a model directory" in capsys.readouterr().err


def test_zoo_sample_refuses_an_option_the_generator_does_not_take(trained_run, tmp_path, capsys):
    code = sample_cli.main([str(trained_run), "--sampler", "euler", "--steps", "2", "--out", str(tmp_path / "x.png"),
                            "--device", "cpu"])
    assert code == 2 and "ddpm" in capsys.readouterr().err


def test_zoo_train_reports_recipe_errors_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  name: dit-q/2\n")
    assert train_cli.main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"zoo-train: error: {recipe}: model.name: 'dit-q/2' is not a registered generator")
    assert "Traceback" not in err


def test_zoo_train_list_models_shows_every_dit_size(capsys):
    assert train_cli.main(["--list-models", "dit-*"]) == 0
    out = capsys.readouterr().out
    assert all(f"dit-{s}/{p}" in out for s in ("s", "b", "l", "xl") for p in (2, 4, 8))


def test_console_script_entry_points_run():
    out = subprocess.run([sys.executable, "-m", "zoo.cli.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "accelerate launch" in out.stdout
