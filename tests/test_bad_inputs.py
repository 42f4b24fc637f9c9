"""The bad-input corpus: every malformed recipe and weight file fails before any work, in one line.

Recipes live in tests/bad_inputs/recipes/ (each says in comments the error it must give, any
command-line overrides, and what the message must name when it is not the file); weight files are
built by tests/bad_inputs/weights.py. Each case runs the command-line tool in this process and must
exit with status 2, print exactly one line that starts with ``PROG: error:``, name the file (or the
override), match the expected text, and show no traceback; training must not have started.
"""

import atexit
import importlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "bad_inputs"
RECIPES = sorted((HERE / "recipes").glob("*.yaml"))
sys.path.insert(0, str(HERE))
import weights  # noqa: E402

CLI = {"zoo-sample": "zoo.cli.sample", "zoo-convert": "zoo.cli.convert", "zoo-reconstruct": "zoo.cli.reconstruct",
       "zoo-train": "zoo.cli.train"}


def header(path: Path, key: str) -> str | None:
    return next((line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                 if line.startswith(f"# {key}:")), None)


def assert_one_clear_line(prog, code, err, expect, names):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert re.search(expect, lines[0]), f"{expect!r} not in {lines[0]!r}"
    assert names in lines[0], f"{names!r} not named in {lines[0]!r}"


def test_the_corpus_is_large_enough(tmp_path):
    assert len(RECIPES) >= 20
    assert len(weights.build(tmp_path)) >= 10


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_a_bad_recipe_fails_before_training_with_one_clear_line(path, tmp_path, capsys, monkeypatch):
    from zoo.cli.train import main
    from zoo.train import trainer

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer.Trainer, "train_step", never)
    overrides = (header(path, "args") or "").split()
    code = main([str(path), *overrides, "--run-dir", str(tmp_path / "run"), "--no-progress", "--cpu"])
    err = capsys.readouterr().err
    assert_one_clear_line("zoo-train", code, err, header(path, "expect"), header(path, "names") or path.name)
    assert not (tmp_path / "run" / "checkpoints").exists()


CORPUS = Path(tempfile.mkdtemp(prefix="zoo-bad-weights-"))
atexit.register(shutil.rmtree, CORPUS, True)
CASES = weights.build(CORPUS)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_weight_file_fails_before_any_work_with_one_clear_line(case, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(Path, "home", lambda: tmp_path)  # nothing may touch a Hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main = importlib.import_module(CLI[case.command]).main
    code = main(case.argv)
    assert_one_clear_line(case.command, code, capsys.readouterr().err, case.expect, case.names)
    assert not Path("/tmp/zoo-pwned").exists()
