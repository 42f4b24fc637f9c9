"""Model directories (sharding, cards), from_pretrained/save_pretrained, and push -> pull -> sample
through the real huggingface_hub client against the loopback Hub server of tests/hub_server.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import zoo
from zoo.config import ConfigError, config_to_dict
from zoo.hub.model_dir import load_model_dir, load_weights, save_model_dir, save_weights
from zoo.pipeline import Pipeline
from zoo.recipe import SampleConfig
from zoo.registry import create_model, create_tokenizer

from .hub_server import HubServer, point_client_at

TOKEN = "hf_test_token"
ROOT = Path(__file__).resolve().parents[1]


def tiny_pipeline(seed: int = 0) -> Pipeline:
    torch.manual_seed(seed)
    generator = create_model("dit-s/2", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                             num_classes=3, learn_sigma=False)
    for p in generator.parameters():  # non-trivial weights (adaLN-Zero starts at the identity)
        p.data.normal_(0, 0.05)
    tokenizer = create_tokenizer("pixel", channels=1)
    sample = SampleConfig(steps=3, sampler="ddim", num=2)
    return Pipeline(generator.eval(), tokenizer.eval(), sample, num_classes=3, image_size=8)


def fake_run_dir(path: Path, pipe: Pipeline) -> Path:
    """A run directory as the trainer leaves it (model files, recipe, log, checkpoints, grids)."""
    from zoo.hub.api import pipeline_config

    config = pipeline_config(pipe)
    config["data"] = {"name": "digits", "image_size": 8, "channels": 1, "num_classes": 3}
    state = pipe.generator.state_dict()
    save_model_dir(path, config, state, raw_state={k: v + 1 for k, v in state.items()},
                   tokenizer_state=pipe.tokenizer.state_dict())
    recipe = {"model": config["generator"], "tokenizer": config["tokenizer"], "objective": config["objective"],
              "data": {"name": "digits", "image_size": 8}, "sample": config["sample"]}
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (path / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 0.5}) + "\n")
    (path / "reconstructions.json").write_text(json.dumps({"psnr": 21.5, "num_images": 4}))
    (path / "checkpoints" / "step-0000010").mkdir(parents=True)
    (path / "checkpoints" / "step-0000010" / "optimizer.bin").write_bytes(b"x" * 100)
    (path / "samples.png").write_bytes(b"png")
    return path


def tiny_msvq(image_channels: int = 3):
    torch.manual_seed(0)
    return create_tokenizer("msvq", vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 4),
                            image_channels=image_channels).eval()


def images(pipe: Pipeline) -> torch.Tensor:
    return pipe.generate(torch.tensor([0, 1, 2]), seed=3, batch_size=3)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The loopback Hub, with huggingface_hub pointed at it and a fresh cache (HF_HOME in tmp)."""
    with HubServer(tokens={TOKEN}) as server:
        point_client_at(server, tmp_path / "hf_home", monkeypatch, token=TOKEN)
        yield server


# ------------------------------------------------------------------------------------------------ format


def test_weights_above_the_shard_size_are_sharded_with_an_index_and_read_back(tmp_path):
    state = {f"w{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    written = save_weights(tmp_path, "model.safetensors", state, max_shard_size=100)
    assert written == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                       "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200
    assert index["weight_map"]["w4"] == "model-00003-of-00003.safetensors"
    loaded, source = load_weights(tmp_path, "model.safetensors")
    assert source.endswith("model.safetensors.index.json")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # saved again below the threshold: one file, and no stale shard or index is left to mix in
    save_weights(tmp_path, "model.safetensors", state, max_shard_size="1MB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_shard_index_pointing_outside_the_directory_is_refused(tmp_path):
    save_weights(tmp_path, "model.safetensors", {"a": torch.zeros(4), "b": torch.ones(4)}, max_shard_size=16)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["a"] = "../evil.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"unsafe file name '\.\./evil\.safetensors'"):
        load_weights(tmp_path, "model.safetensors")


def test_a_mismatched_tensor_is_named_before_anything_is_loaded(tmp_path):
    pipe = tiny_pipeline()
    zoo.save_pretrained(pipe, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["generator"]["hidden_size"] = 64
    config["generator"]["num_heads"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model\.safetensors: tensor 'pos_embed' has shape \(1, 16, 32\), the "
                                          r"config needs \(1, 16, 64\)"):
        load_model_dir(tmp_path / "m")


def test_save_pretrained_writes_a_loadable_directory_with_a_model_card(tmp_path):
    pipe = tiny_pipeline()
    zoo.save_pretrained(pipe, tmp_path / "m", license="mit", tags=["digits-demo"], max_shard_size=100_000)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert len([n for n in names if n.startswith("model-0")]) >= 2
    assert "README.md" in names and "config.json" in names
    card = (tmp_path / "m" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "zoo" and front["license"] == "mit"
    assert front["pipeline_tag"] == "unconditional-image-generation"
    assert {"zoo", "dit", "pixel", "gaussian", "digits-demo"} <= set(front["tags"])
    loaded = zoo.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, Pipeline)
    assert torch.equal(images(loaded), images(pipe))


def test_a_tokenizer_directory_loads_as_the_tokenizer(tmp_path):
    torch.manual_seed(0)
    tokenizer = create_tokenizer("msvq", vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 4))
    zoo.save_pretrained(tokenizer, tmp_path / "tok")
    loaded = zoo.from_pretrained(tmp_path / "tok")
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert type(loaded).__name__ == "MSVQTokenizer"
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))
    front = yaml.safe_load((tmp_path / "tok" / "README.md").read_text().split("---")[1])
    assert "pipeline_tag" not in front and "image-tokenizer" in front["tags"]


def test_a_generator_directory_without_its_tokenizer_weights_is_refused(tmp_path):
    pipe = tiny_pipeline()
    pipe.tokenizer = create_tokenizer("kl-vae", ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=1, embed_dim=1,
                                      image_channels=1)
    zoo.save_pretrained(pipe, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.safetensors: missing, and the 'kl-vae' tokenizer"):
        load_model_dir(tmp_path / "m")


# ------------------------------------------------------------------------------------------------ the Hub


def test_push_pull_sample_round_trip_through_the_hub_client(hub, tmp_path):
    pipe = tiny_pipeline()
    run = fake_run_dir(tmp_path / "run", pipe)
    url = zoo.push_to_hub(str(run), "org/tiny-dit", private=True, commit_message="first")
    files = hub.files("org/tiny-dit")
    # no raw weights, checkpoints, logs or grids (and a pixel tokenizer has no weights)
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "recipe.yaml", "reconstructions.json"]
    assert url.startswith(f"{hub.url}/org/tiny-dit/commit/")
    assert hub.repos["org/tiny-dit"].private and TOKEN in hub.tokens_seen
    front = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert front["model-index"][0]["results"][0]["metrics"] == [{"type": "psnr", "name": "psnr", "value": 21.5}]
    assert "## Recipe" in files["README.md"].decode()

    pulled = zoo.from_pretrained("org/tiny-dit")
    assert torch.equal(images(pulled), images(pipe))
    copy = zoo.hub.pull("org/tiny-dit", to=tmp_path / "copy")
    assert (copy / "config.json").is_file() and not (copy / "config.json").is_symlink()
    assert torch.equal(images(zoo.from_pretrained(copy)), images(pipe))


def test_offline_mode_is_served_from_the_cache(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    pipe = tiny_pipeline()
    zoo.push_to_hub(pipe, "org/cached")
    expected = images(zoo.from_pretrained("org/cached"))  # fills the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    served = len(hub.requests)
    assert torch.equal(images(zoo.from_pretrained("org/cached")), expected)
    assert len(hub.requests) == served  # nothing asked of the Hub
    with pytest.raises(FileNotFoundError, match="org/never-pulled: not a local directory, and the Hub repo could "
                                                "not be fetched"):
        zoo.from_pretrained("org/never-pulled")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set"):
        zoo.push_to_hub(pipe, "org/cached")


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # inside huggingface_hub's LFS PUT
def test_safetensors_go_through_the_git_lfs_upload_when_the_hub_asks_for_it(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    with HubServer(tokens={TOKEN}, lfs_suffixes=(".safetensors",)) as server:
        point_client_at(server, tmp_path / "hf_home", monkeypatch, token=TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the LFS basic transfer, not Xet
        pipe = tiny_pipeline()
        zoo.push_to_hub(pipe, "org/lfs", max_shard_size=100_000)
        assert server.lfs_paths and all(path.endswith(".safetensors") for _, path in server.lfs_paths)
        assert any(method == "PUT" for method, _ in server.requests)
        assert torch.equal(images(zoo.from_pretrained("org/lfs")), images(pipe))


def test_a_push_to_a_branch_leaves_main_and_is_pulled_by_revision(hub, tmp_path):
    first, second = tiny_pipeline(0), tiny_pipeline(1)
    zoo.push_to_hub(first, "org/branches")
    zoo.push_to_hub(second, "org/branches", revision="v2", commit_message="second weights", max_shard_size=100_000)
    assert "model.safetensors" in hub.files("org/branches", "main")
    assert "model.safetensors.index.json" in hub.files("org/branches", "v2")
    assert "model.safetensors" not in hub.files("org/branches", "v2")  # no stale single file beside the shards
    assert torch.equal(images(zoo.from_pretrained("org/branches")), images(first))
    assert torch.equal(images(zoo.from_pretrained("org/branches", revision="v2")), images(second))
    with pytest.raises(FileNotFoundError, match="at revision 'nope' could not be fetched"):
        zoo.from_pretrained("org/branches", revision="nope")


def test_a_private_repo_is_not_served_without_the_token(hub, tmp_path, monkeypatch):
    zoo.push_to_hub(tiny_pipeline(), "org/secret", private=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(FileNotFoundError, match="org/secret: not a local directory"):
        zoo.from_pretrained("org/secret")


def test_cli_push_and_pull_honour_the_hf_environment_variables(hub, tmp_path):
    """zoo-push, zoo-pull and zoo-sample in a fresh process that knows the Hub only from HF_ENDPOINT,
    HF_TOKEN and HF_HOME."""
    run = fake_run_dir(tmp_path / "run", tiny_pipeline())
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "fresh_home"), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    script = (f"import sys\n"
              f"from zoo.cli import push, pull, sample\n"
              f"assert push.main([{str(run)!r}, 'org/cli', '--private', '--message', 'from the CLI']) == 0\n"
              f"assert pull.main(['org/cli', '--to', {str(tmp_path / 'pulled')!r}]) == 0\n"
              f"assert sample.main([{str(tmp_path / 'pulled')!r}, '--num', '3', '--out', "
              f"{str(tmp_path / 'grid.png')!r}, '--device', 'cpu']) == 0\n"
              f"assert pull.main(['org/cli', '--to', {str(tmp_path / 'pulled')!r}]) == 2\n")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pushed" in result.stdout and (tmp_path / "grid.png").is_file()
    assert "exists and is not an empty directory" in result.stderr
    assert hub.repos["org/cli"].commits[hub.repos["org/cli"].branches["main"]]["message"] == "from the CLI"
    assert (tmp_path / "fresh_home" / "hub" / "models--org--cli").is_dir()  # the HF cache under HF_HOME


def test_pipeline_config_of_a_pipeline_built_in_code_names_registry_entries():
    from zoo.hub.api import pipeline_config

    config = pipeline_config(tiny_pipeline())
    assert config["generator"]["name"].startswith("dit-") and config["generator"]["hidden_size"] == 32
    assert config["tokenizer"] == {"name": "pixel", **config_to_dict(create_tokenizer("pixel", channels=1).config)}
    assert config["objective"]["name"] == "gaussian" and config["objective"]["learn_sigma"] is False


def test_a_tokenizer_run_is_pushed_resharded_and_comes_back_as_the_tokenizer(hub, tmp_path):
    torch.manual_seed(0)
    tokenizer = create_tokenizer("msvq", vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 4))
    run = tmp_path / "tok_run"
    save_model_dir(run, {"tokenizer": {"name": "msvq", **config_to_dict(tokenizer.config)}}, None,
                   tokenizer_state=tokenizer.state_dict(), tokenizer_raw_state=tokenizer.state_dict())
    zoo.push_to_hub(str(run), "org/msvq", max_shard_size=200_000)
    files = hub.files("org/msvq")
    assert "tokenizer.safetensors.index.json" in files and "tokenizer_raw.safetensors" not in files
    assert "model.safetensors" not in files and len([f for f in files if f.startswith("tokenizer-0")]) >= 2
    loaded = zoo.from_pretrained("org/msvq")
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))


# ------------------------------------------------------------------------------------------------ tokenizers
# as zoo.from_pretrained returns them save and push themselves, like a Pipeline


def reconstruct(tokenizer, x: torch.Tensor) -> torch.Tensor:
    return tokenizer.decode(tokenizer.encode(x))


def test_a_loaded_tokenizer_saves_itself_and_loads_back_the_same(tmp_path):
    tokenizer = tiny_msvq()
    zoo.save_pretrained(tokenizer, tmp_path / "tok")
    loaded = zoo.from_pretrained(tmp_path / "tok")
    assert zoo.save_pretrained(loaded, tmp_path / "again", license="mit", tags=["mine"]) == tmp_path / "again"
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["README.md", "config.json",
                                                                      "tokenizer.safetensors"]
    front = yaml.safe_load((tmp_path / "again" / "README.md").read_text().split("---")[1])
    assert front["license"] == "mit" and {"image-tokenizer", "mine"} <= set(front["tags"])
    reloaded = zoo.from_pretrained(tmp_path / "again")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert type(reloaded) is type(tokenizer)
    assert torch.equal(reconstruct(reloaded, x), reconstruct(tokenizer, x))


def test_a_loaded_tokenizer_pushes_itself_to_the_hub_and_pulls_back_the_same_weights(hub, tmp_path):
    tokenizer = tiny_msvq()
    zoo.save_pretrained(tokenizer, tmp_path / "tok")
    loaded = zoo.from_pretrained(tmp_path / "tok")
    url = zoo.push_to_hub(loaded, "org/tok", private=True, revision="v1", commit_message="tokenizer v1",
                             max_shard_size=200_000)
    assert url.startswith(f"{hub.url}/org/tok/commit/") and hub.repos["org/tok"].private
    repo = hub.repos["org/tok"]
    assert repo.commits[repo.branches["v1"]]["message"] == "tokenizer v1"
    files = hub.files("org/tok", "v1")
    assert "tokenizer.safetensors.index.json" in files and "model.safetensors" not in files
    pulled = zoo.hub.pull("org/tok", revision="v1", to=tmp_path / "pulled")
    state, _ = load_weights(pulled, "tokenizer.safetensors")
    expected = tokenizer.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(reconstruct(zoo.from_pretrained("org/tok", revision="v1"), x), reconstruct(tokenizer, x))


# ------------------------------------------------------------------------------------------------ zoo-sample and
# zoo-reconstruct take Hub repo ids


def cli_samples(tmp_path: Path, *argv: str) -> np.ndarray:
    """``zoo-sample ARGV --num 2 --out …npz`` in-process; the images it wrote."""
    from zoo.cli.sample import main as sample

    out = Path(tempfile.mkdtemp(prefix="samples-", dir=tmp_path)) / "s.npz"
    assert sample([*argv, "--num", "2", "--out", str(out), "--device", "cpu"]) == 0
    with np.load(out) as arrays:
        return arrays["arr_0"]


def test_zoo_sample_takes_a_hub_repo_id_and_revision_and_a_local_path_wins(hub, tmp_path, monkeypatch, capsys):
    from zoo.cli.sample import main as sample

    first, second = tiny_pipeline(0), tiny_pipeline(1)
    zoo.push_to_hub(first, "org/sampled")
    zoo.push_to_hub(second, "org/sampled", revision="v2")
    monkeypatch.chdir(tmp_path)
    assert sample(["org/sampled", "--num", "2", "--out", "grid.png", "--device", "cpu"]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert "wrote 2 samples to grid.png" in capsys.readouterr().out
    from_hub = cli_samples(tmp_path, "org/sampled")
    from_hub_v2 = cli_samples(tmp_path, "org/sampled", "--revision", "v2")
    assert np.array_equal(from_hub, cli_samples(tmp_path, str(zoo.save_pretrained(first, tmp_path / "first"))))
    assert np.array_equal(from_hub_v2, cli_samples(tmp_path, str(zoo.save_pretrained(second, tmp_path / "second"))))
    assert not np.array_equal(from_hub, from_hub_v2)

    # A directory spelled like the repo id, relative to the working directory, is used instead of the Hub.
    zoo.save_pretrained(second, tmp_path / "org" / "sampled")
    asked = len(hub.requests)
    assert np.array_equal(cli_samples(tmp_path, "org/sampled"), from_hub_v2)
    assert len(hub.requests) == asked
    assert sample(["org/sampled", "--revision", "v2", "--out", "x.png"]) == 2
    assert "org/sampled: revision='v2' applies to Hub repos only" in capsys.readouterr().err

    # Neither an existing path nor a repo id, or a repo the Hub does not have: named in one line.
    for ref in ("no such/run dir", "missing_run", "runs/a/b"):
        assert sample([ref, "--out", "x.png"]) == 2
        assert f"zoo-sample: error: {ref}: no such directory, and not a Hub repo id (ORG/NAME)" in \
            capsys.readouterr().err
    assert sample(["org/missing", "--out", "x.png"]) == 2
    assert "org/missing: not a local directory, and the Hub repo could not be fetched" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_zoo_sample_of_a_hub_repo_is_served_from_the_cache_offline(hub, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    from zoo.cli.sample import main as sample

    zoo.push_to_hub(tiny_pipeline(), "org/offline")
    online = cli_samples(tmp_path, "org/offline")  # fills the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    asked = len(hub.requests)
    assert sample(["org/offline", "--num", "2", "--out", str(tmp_path / "grid.png"), "--device", "cpu"]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert np.array_equal(cli_samples(tmp_path, "org/offline"), online)
    assert len(hub.requests) == asked  # nothing asked of the Hub
    assert sample(["org/never-pulled", "--out", str(tmp_path / "never.png")]) == 2
    assert "org/never-pulled: not a local directory, and the Hub repo could not be fetched" in capsys.readouterr().err


def test_zoo_reconstruct_and_zoo_sample_take_a_hub_repo_holding_a_tokenizer(hub, tmp_path, capsys):
    from zoo.cli.reconstruct import main as reconstruct
    from zoo.cli.sample import main as sample

    tokenizer = tiny_msvq(image_channels=1)
    run = tmp_path / "tok_run"  # a tokenizer's run: its data section and recipe name the images to reconstruct
    save_model_dir(run, {"tokenizer": {"name": "msvq", **config_to_dict(tokenizer.config)},
                         "data": {"name": "digits", "image_size": 8, "channels": 1}}, None,
                   tokenizer_state=tokenizer.state_dict())
    (run / "recipe.yaml").write_text(yaml.safe_dump({"tokenizer": {"name": "msvq", **config_to_dict(tokenizer.config)},
                                                     "data": {"name": "digits", "image_size": 8}}))
    zoo.push_to_hub(str(run), "org/tok-run")
    capsys.readouterr()
    assert reconstruct(["org/tok-run", "--num", "4", "--device", "cpu"]) == 2
    assert "org/tok-run is a Hub repo; give --out PATH.png" in capsys.readouterr().err
    assert reconstruct(["org/tok-run", "--num", "4", "--device", "cpu", "--out", str(tmp_path / "hub.png")]) == 0
    assert reconstruct([str(run), "--num", "4", "--device", "cpu", "--out", str(tmp_path / "local.png")]) == 0
    assert (tmp_path / "hub.png").is_file()
    hub_report = json.loads((tmp_path / "hub.json").read_text())
    assert hub_report == json.loads((tmp_path / "local.json").read_text()) and hub_report["num_images"] == 4
    assert sample(["org/tok-run", "--num", "3", "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["num_images"] == 3
