"""Progress bars: rate and ETA on a terminal, nothing in a log file or a pipe, nothing under --quiet."""

import io
import sys

import pytest


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def model_dir(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "bad_inputs"))
    import weights

    return weights._model_dir(tmp_path / "model")


def run(main, argv, monkeypatch, terminal):
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(argv) == 0
    return err.getvalue()


def test_sampling_several_batches_shows_one_bar_with_rate_and_eta_on_a_terminal(model_dir, tmp_path, monkeypatch):
    from zoo.cli.sample import main

    err = run(main, [str(model_dir), "--num", "4", "--batch-size", "2", "--out", str(tmp_path / "a.png")],
              monkeypatch, terminal=True)
    assert "sampling" in err and "2/2" in err and "batch/s" in err and "<" in err  # [elapsed<remaining, rate]


def test_one_batch_shows_the_samplers_step_bar(model_dir, tmp_path, monkeypatch):
    from zoo.cli.sample import main

    err = run(main, [str(model_dir), "--num", "2", "--steps", "3", "--out", str(tmp_path / "a.png")], monkeypatch,
              terminal=True)
    assert "steps:" in err and "/3 [" in err and "step/s" in err  # cleared when done (leave=False)


def test_no_bar_when_stderr_is_not_a_terminal_or_under_quiet(model_dir, tmp_path, monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled

    from zoo.cli.sample import main

    argv = [str(model_dir), "--num", "4", "--batch-size", "2", "--out", str(tmp_path / "a.png")]
    assert "sampling" not in run(main, argv, monkeypatch, terminal=False)
    assert run(main, [*argv, "--quiet"], monkeypatch, terminal=True) == ""
    assert are_progress_bars_disabled()  # the Hub's transfer bars too
    run(main, argv, monkeypatch, terminal=True)
    assert not are_progress_bars_disabled()


def test_training_shows_steps_with_rate_and_eta_and_is_quiet_on_request(tiny_recipe_file, tmp_path, monkeypatch):
    from zoo.cli.train import main

    args = [str(tiny_recipe_file), "--cpu", "train.max_steps=3"]
    err = run(main, [*args, "--run-dir", str(tmp_path / "a")], monkeypatch, terminal=True)
    assert "3/3" in err and ("step/s" in err or "s/step" in err)
    assert "it/s" not in err
    err = run(main, [*args, "--run-dir", str(tmp_path / "b"), "-q"], monkeypatch, terminal=True)
    assert "step/s" not in err and "s/step" not in err
