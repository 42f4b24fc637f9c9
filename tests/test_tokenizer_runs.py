"""Tokenizer recipes (zoo-train trains the tokenizer itself) and generator recipes that take their
tokenizer ``from`` a tokenizer recipe, a run directory or a model directory."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zoo.config import ConfigError
from zoo.hub.model_dir import load_tokenizer_dir, read_model_config
from zoo.recipe import load_recipe, recipe_from_dict
from zoo.train.trainer import Trainer

TOKENIZER_RECIPE = {
    "tokenizer": {"name": "msvq", "ch": 32, "ch_mult": [1, 2], "vocab_size": 32, "z_channels": 8,
                  "v_patch_nums": [1, 2, 4], "image_channels": 1},
    "data": {"name": "digits", "image_size": 8},
    "train": {"batch_size": 16, "max_steps": 3, "lr": 1e-3, "log_every": 1, "tensorboard": False,
              "ema_decay": 0.5},
    "sample": {"num": 12, "batch_size": 12},
}

VAR_RECIPE = {
    "model": {"name": "var-d2", "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10,
              "patch_nums": [1, 2, 4], "vocab_size": 32, "Cvae": 8},
    "tokenizer": {"from": "tok.yaml"},
    "data": {"name": "digits", "image_size": 8},
    "train": {"batch_size": 16, "max_steps": 2, "lr": 1e-3, "log_every": 1, "tensorboard": False,
              "ema_decay": 0.5},
    "sample": {"num": 10, "batch_size": 10, "cfg_scale": 1.5, "top_k": 5},
}


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tokenizer_recipe_file(tmp_path):
    return write(tmp_path / "tok.yaml", copy.deepcopy(TOKENIZER_RECIPE))


@pytest.fixture
def var_recipe_file(tmp_path, tokenizer_recipe_file):
    return write(tmp_path / "var.yaml", copy.deepcopy(VAR_RECIPE))


def test_a_recipe_without_model_trains_its_tokenizer(tmp_path, tokenizer_recipe_file, capsys):
    recipe = load_recipe(tokenizer_recipe_file)
    assert recipe.trains_tokenizer and recipe.objective is None
    run = tmp_path / "run"
    grid = Trainer(recipe, run, progress=False).fit()
    assert grid == run / "samples" / "final.png" and grid.is_file()
    report = json.loads(grid.with_suffix(".json").read_text())
    assert report["num_images"] == 12 and 0 < report["codebook_usage"] <= 1 and report["psnr"] > 0
    assert "PSNR" in capsys.readouterr().out or "psnr" in report
    config = read_model_config(run)
    assert "generator" not in config and config["tokenizer"]["name"] == "msvq"
    assert (run / "tokenizer.safetensors").is_file() and (run / "tokenizer_raw.safetensors").is_file()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert {"loss", "usage", "perplexity"} <= set(logged[-1])
    # The written weights are the EMA copy, and they load strictly into a fresh tokenizer.
    tokenizer = load_tokenizer_dir(run)
    saved = load_file(str(run / "tokenizer.safetensors"))
    assert all(torch.equal(tokenizer.state_dict()[k], v) for k, v in saved.items())


def test_zoo_reconstruct_and_zoo_sample_check_a_tokenizer_run(tmp_path, tokenizer_recipe_file, capsys):
    from zoo.cli.reconstruct import main as reconstruct
    from zoo.cli.sample import main as sample

    run = tmp_path / "run"
    Trainer(load_recipe(tokenizer_recipe_file), run, progress=False).fit()
    capsys.readouterr()
    assert reconstruct([str(run), "--num", "7", "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "codebook usage" in out
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 7
    assert sample([str(run), "--num", "5", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert sample([str(run), "--out", str(tmp_path / "s.npz")]) == 2
    assert "holds a tokenizer" in capsys.readouterr().err


def test_generator_recipe_trains_its_tokenizer_recipe_first_then_reuses_it(tmp_path, var_recipe_file, capsys):
    recipe = load_recipe(var_recipe_file)
    assert recipe.tokenizer_source.kind == "recipe" and recipe.tokenizer.name == "msvq"
    run = tmp_path / "run"
    trainer = Trainer(recipe, run, progress=False)
    assert "training" in capsys.readouterr().out
    tok_run = run / "tokenizer"
    assert (tok_run / "tokenizer.safetensors").is_file()
    trained = load_file(str(tok_run / "tokenizer.safetensors"))
    assert all(torch.equal(trainer.tokenizer.state_dict()[k].cpu(), v) for k, v in trained.items())
    assert not any(p.requires_grad for p in trainer.tokenizer.parameters())
    grid = trainer.fit()
    assert grid.is_file()
    # The generator's run directory is self-contained: its tokenizer weights are the trained ones.
    copied = load_file(str(run / "tokenizer.safetensors"))
    assert all(torch.equal(copied[k], v) for k, v in trained.items())
    # zoo-sample drives VAR's sampler: its flags reach it, and the diffusion-only ones are refused.
    from zoo.cli.sample import main as sample

    out = tmp_path / "var.png"
    assert sample([str(run), "--num", "4", "--labels", "3", "--top-k", "3", "--top-p", "0.9", "--cfg-scale", "1.5",
                   "--more-smooth", "--out", str(out)]) == 0 and out.is_file()
    assert sample([str(run), "--num", "2", "--steps", "10", "--out", str(out)]) == 2
    assert "takes no 'steps'" in capsys.readouterr().err
    # A second trainer on the same run directory reuses the finished tokenizer instead of retraining.
    Trainer(recipe, run, resume=True, progress=False)
    assert "reusing" in capsys.readouterr().out
    # The saved recipe names the tokenizer recipe by absolute path and reads back anywhere.
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["tokenizer"] == {"from": str(var_recipe_file.parent.resolve() / "tok.yaml")}
    assert "objective" not in saved
    recipe_from_dict(saved, source=str(run / "recipe.yaml"))


def test_a_changed_tokenizer_recipe_is_not_silently_reused(tmp_path, var_recipe_file, tokenizer_recipe_file):
    run = tmp_path / "run"
    Trainer(load_recipe(var_recipe_file), run, progress=False)
    changed = copy.deepcopy(TOKENIZER_RECIPE)
    changed["train"]["lr"] = 5e-4
    write(tokenizer_recipe_file, changed)
    with pytest.raises(ConfigError, match="different recipe"):
        Trainer(load_recipe(var_recipe_file), run, resume=True, progress=False)


def test_a_tokenizer_differing_only_in_sampling_defaults_is_reused(tmp_path, capsys, var_recipe_file,
                                                                   tokenizer_recipe_file):
    run = tmp_path / "run"
    Trainer(load_recipe(var_recipe_file), run, progress=False)
    changed = copy.deepcopy(TOKENIZER_RECIPE)
    changed.setdefault("sample", {})["num"] = 3  # sampling defaults do not change the trained weights
    write(tokenizer_recipe_file, changed)
    capsys.readouterr()
    Trainer(load_recipe(var_recipe_file), run, progress=False)
    assert "reusing" in capsys.readouterr().out


def test_generator_recipe_takes_its_tokenizer_from_a_run_directory(tmp_path, tokenizer_recipe_file):
    tok_run = tmp_path / "tok_run"
    Trainer(load_recipe(tokenizer_recipe_file), tok_run, progress=False).fit()
    raw = copy.deepcopy(VAR_RECIPE)
    raw["tokenizer"] = {"from": str(tok_run)}
    recipe = recipe_from_dict(raw, source=str(tmp_path / "v.yaml"))
    assert recipe.tokenizer_source.kind == "model_dir"
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    saved = load_file(str(tok_run / "tokenizer.safetensors"))
    assert all(torch.equal(trainer.tokenizer.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("change, message", [
    (lambda r: r["tokenizer"].update(name="msvq"), "with 'from' the tokenizer's name and fields come from"),
    (lambda r: r["tokenizer"].update({"from": "missing.yaml"}), "tokenizer recipe 'missing.yaml' not found"),
    (lambda r: r["tokenizer"].update({"from": "./nowhere"}), "neither a tokenizer recipe"),
    (lambda r: r.update(objective={"name": "gaussian"}), "uses no objective; remove the section"),
])
def test_tokenizer_source_errors_name_the_key(tmp_path, tokenizer_recipe_file, change, message):
    raw = copy.deepcopy(VAR_RECIPE)
    change(raw)
    path = write(tmp_path / "v.yaml", raw)
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_from_must_name_a_tokenizer_recipe_not_a_generator_recipe(tmp_path, tiny_recipe_dict, tokenizer_recipe_file):
    write(tmp_path / "gen.yaml", tiny_recipe_dict)
    raw = copy.deepcopy(VAR_RECIPE)
    raw["tokenizer"] = {"from": "gen.yaml"}
    with pytest.raises(ConfigError, match="is a generator recipe"):
        load_recipe(write(tmp_path / "v.yaml", raw))


def test_a_model_less_recipe_needs_a_trainable_tokenizer(tmp_path):
    raw = copy.deepcopy(TOKENIZER_RECIPE)
    raw["tokenizer"] = {"name": "pixel", "channels": 1}
    with pytest.raises(ConfigError, match="cannot be trained by zoo-train"):
        load_recipe(write(tmp_path / "t.yaml", raw))


def test_tokenizer_recipe_channels_must_match_the_data(tmp_path):
    raw = copy.deepcopy(TOKENIZER_RECIPE)
    raw["tokenizer"]["image_channels"] = 3
    with pytest.raises(ConfigError, match="1-channel images"):
        load_recipe(write(tmp_path / "t.yaml", raw))


def assert_same_training(plain, cached, steps):
    """Two trainers take ``steps`` steps: the same losses, then the same weights, bit for bit."""
    plain_iter, cached_iter = iter(plain._loader()), iter(cached._loader())
    for _ in range(steps):
        a, b = plain.train_step(plain_iter), cached.train_step(cached_iter)
        assert a["loss"] == b["loss"]
    for (name, p), q in zip(plain.model.named_parameters(), cached.model.parameters()):
        assert torch.equal(p, q), name


def test_cached_tokens_train_exactly_like_encoding_every_step(tmp_path, var_recipe_file):
    tok_run = tmp_path / "tok"
    Trainer(load_recipe(tmp_path / "tok.yaml"), tok_run, progress=False).fit()
    overrides = [f"tokenizer.from={tok_run}", "train.max_steps=3"]
    plain = Trainer(load_recipe(var_recipe_file, overrides), tmp_path / "plain", progress=False)
    cached = Trainer(load_recipe(var_recipe_file, [*overrides, "train.cache_tokens=true"]), tmp_path / "cached",
                     progress=False)
    assert cached.token_cache.shape == (1797, 1 + 4 + 16) and cached.token_cache.dtype == torch.int16
    assert (tmp_path / "cached" / "token_cache.npy").is_file()
    assert_same_training(plain, cached, steps=3)
    # A second trainer on the same run directory reads the cache instead of encoding again.
    again = Trainer(load_recipe(var_recipe_file, [*overrides, "train.cache_tokens=true"]), tmp_path / "cached",
                    progress=False)
    assert torch.equal(again.token_cache, cached.token_cache)


def test_cache_tokens_needs_a_cacheable_tokenizer_and_a_generator_recipe(tmp_path, tiny_recipe_dict,
                                                                         tokenizer_recipe_file):
    tiny_recipe_dict["train"]["cache_tokens"] = True
    recipe = recipe_from_dict(tiny_recipe_dict, source="tiny.yaml")
    with pytest.raises(ConfigError, match="cannot cache its training inputs"):
        Trainer(recipe, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="no frozen tokenizer output to cache"):
        Trainer(load_recipe(tokenizer_recipe_file, ["train.cache_tokens=true"]), tmp_path / "run2", progress=False)


def test_a_hub_repo_id_that_cannot_be_fetched_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from zoo.config import ConfigError
    from zoo.hub.model_dir import read_hub_config

    raw = copy.deepcopy(VAR_RECIPE)
    raw["tokenizer"] = {"from": "some-org/no-such-tokenizer"}
    with pytest.raises(ConfigError, match="tokenizer.from: some-org/no-such-tokenizer: not a local directory, and "
                                          "the Hub repo could not be fetched"):
        recipe_from_dict(copy.deepcopy(raw), source=str(tmp_path / "v.yaml"), fetch_config=read_hub_config)
    # The recipe layer itself knows nothing of the Hub: without a fetcher it says what to pass.
    with pytest.raises(ConfigError, match="is a Hub repo id, and this recipe was loaded without a way to fetch"):
        recipe_from_dict(raw, source=str(tmp_path / "v.yaml"))


def test_a_tokenizer_run_resumes_exactly_including_its_hit_statistics(tmp_path, tokenizer_recipe_file):
    recipe = load_recipe(tokenizer_recipe_file, ["train.max_steps=4", "tokenizer.restart_dead_codes=true"])
    Trainer(recipe, tmp_path / "whole", progress=False).fit()
    Trainer(recipe, tmp_path / "split", progress=False).fit(stop_at=2)
    Trainer(recipe, tmp_path / "split", resume=True, progress=False).fit()
    for name in ("tokenizer.safetensors", "tokenizer_raw.safetensors"):
        whole, split = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "split" / name))
        assert whole.keys() == split.keys()
        for key in whole:
            assert torch.equal(whole[key], split[key]), (name, key)


def test_cached_kl_moments_train_exactly_like_encoding_every_step(tmp_path, tiny_recipe_dict):
    """kl-vae caches the posterior's moments; the draw happens per step from the step's RNG, so a
    DiT trained from the cache sees the very latents it would see encoding every step."""
    raw = tiny_recipe_dict
    raw["tokenizer"] = {"name": "kl-vae", "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 2,
                        "embed_dim": 2, "image_channels": 1, "scale_factor": 0.5}
    raw["model"].update(input_size=4, in_channels=2)
    raw["train"]["max_steps"] = 3
    plain = Trainer(recipe_from_dict(copy.deepcopy(raw), source="kl.yaml"), tmp_path / "plain", progress=False)
    raw["train"]["cache_tokens"] = True
    cached = Trainer(recipe_from_dict(raw, source="kl.yaml"), tmp_path / "cached", progress=False)
    # Rows are (mean, log-variance) per image and flip variant.
    assert cached.token_cache.shape == (1797 * cached.dataset.num_variants, 4, 4, 4)
    assert cached.token_cache.dtype == torch.float32
    assert_same_training(plain, cached, steps=3)


def test_kl_vae_inputs_from_cache_refuse_moments_of_another_tokenizer():
    from zoo import create_tokenizer

    tok = create_tokenizer("kl-vae", ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=2, embed_dim=2,
                           image_channels=1).eval()
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    torch.manual_seed(0)
    direct = tok.training_inputs(images)
    torch.manual_seed(0)
    assert torch.equal(tok.inputs_from_cache(tok.cache_inputs(images)), direct)
    with pytest.raises(ValueError, match=r"cached moments must be \(N, 4, h, w\)"):
        tok.inputs_from_cache(torch.zeros(3, 2, 4, 4))
