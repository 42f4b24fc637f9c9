"""zoo-convert and official:NAME pulls: checkpoints in the official layouts (built here from our own
models, which keep the official key names, at tiny sizes) convert into model directories that give
the same outputs; pickles that would run code are refused without running."""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo.config import ConfigError
from zoo.hub.convert import convert, diffusers_dit_to_official
from zoo.hub.safe_load import UnsafeCheckpointError, load_checkpoint, safe_relative_path
from zoo.pipeline import Pipeline
from zoo.registry import create_model, create_tokenizer

from .hub_server import HubServer, point_client_at


def randomized(module: torch.nn.Module, seed: int = 0, keep: tuple[str, ...] = ()) -> torch.nn.Module:
    """Random weights everywhere but ``keep`` (zero-initialised gates would hide mixed-up tensors)."""
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        if name not in keep:
            p.data.normal_(0, 0.05)
    return module.eval()


def tiny_dit(in_channels: int = 3, learn_sigma: bool = True):
    return randomized(create_model("dit-s/2", depth=2, hidden_size=32, num_heads=2, input_size=8,
                                   in_channels=in_channels, num_classes=5, learn_sigma=learn_sigma),
                      keep=("pos_embed",))  # DiT's fixed sin-cos table


def dit_output(model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, model.in_channels, 8, 8, generator=g)
    return model(x, torch.tensor([3, 700]), torch.tensor([1, 4]))


def tiny_kl_state(seed: int = 0):
    tok = randomized(create_tokenizer("kl-vae", ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4,
                                      embed_dim=4, encoder_attn_levels=(2,)), seed)
    return tok, tok.vae.state_dict()


# ------------------------------------------------------------------------------------------------ DiT


def test_a_dit_training_checkpoint_converts_to_a_model_with_the_same_outputs(tmp_path):
    ema, raw = tiny_dit(), randomized(tiny_dit(), seed=5, keep=("pos_embed",))
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}},
                "args": argparse.Namespace(model="DiT-S/2", image_size=16)}, tmp_path / "0100000.pt")
    out = convert(tmp_path / "0100000.pt", "dit", tmp_path / "m", overrides=["num_heads=2"])
    pipe = zoo.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert {k: config["generator"][k] for k in ("depth", "hidden_size", "patch_size", "input_size", "in_channels",
                                                 "num_classes", "learn_sigma")} == dict(
        depth=2, hidden_size=32, patch_size=2, input_size=8, in_channels=3, num_classes=5, learn_sigma=True)
    assert config["tokenizer"]["name"] == "pixel" and config["objective"]["learn_sigma"] is True
    assert torch.equal(dit_output(pipe.generator), dit_output(ema))  # the EMA weights, exactly


def test_heads_are_asked_for_when_the_shapes_match_no_released_size(tmp_path):
    torch.save(tiny_dit().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ConfigError, match=r"the weights do not tell num_heads .*give it with --set num_heads="):
        convert(tmp_path / "bare.pt", "dit", tmp_path / "m")


def official_to_diffusers_dit(state: dict) -> dict:
    """facebookresearch/DiT names -> diffusers DiTTransformer2DModel names (diffusers' conversion script)."""
    out, depth = {}, 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    top = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
           "final_layer.linear": "proj_out_2"}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module in top:
            out[f"{top[module]}.{param}"] = tensor
        elif key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            if rest.startswith("attn.qkv."):
                for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                    out[f"transformer_blocks.{i}.attn1.to_{name}.{param}"] = part
                continue
            rest = (rest.replace("adaLN_modulation.1", "norm1.linear").replace("attn.proj", "attn1.to_out.0")
                    .replace("mlp.fc1", "ff.net.0.proj").replace("mlp.fc2", "ff.net.2"))
            out[f"transformer_blocks.{i}.{rest}"] = tensor
    for i in range(depth):
        for ours, theirs in (("t_embedder.mlp.0", "timestep_embedder.linear_1"),
                             ("t_embedder.mlp.2", "timestep_embedder.linear_2")):
            for param in ("weight", "bias"):
                out[f"transformer_blocks.{i}.norm1.emb.{theirs}.{param}"] = state[f"{ours}.{param}"].clone()
        out[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"] = \
            state["y_embedder.embedding_table.weight"].clone()
    return out  # no pos_embed: diffusers recomputes the sin-cos table


def test_a_diffusers_dit_folder_converts_to_the_same_model(tmp_path):
    model = tiny_dit()
    diffusers_state = official_to_diffusers_dit(model.state_dict())
    assert diffusers_dit_to_official(diffusers_state).keys() == model.state_dict().keys() - {"pos_embed"}
    folder = tmp_path / "pipeline" / "transformer"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in diffusers_state.items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2,
                                                    "attention_head_dim": 16, "num_layers": 2, "sample_size": 8,
                                                    "patch_size": 2, "in_channels": 3, "out_channels": 6}))
    pipe = zoo.from_pretrained(convert(tmp_path / "pipeline", "diffusers-dit", tmp_path / "m"))
    assert torch.equal(dit_output(pipe.generator), dit_output(model))


def test_dit_with_a_diffusers_vae_converts_to_a_pipeline_that_samples_the_same_images(tmp_path):
    """The official DiT set-up: DiT weights plus the SD-VAE as a diffusers folder (here tiny)."""
    from .test_kl_vae import TINY_DIFFUSERS_CONFIG, diffusers_names, write_diffusers_dir

    vae = randomized(create_tokenizer("kl-vae", **read_diffusers_fields(TINY_DIFFUSERS_CONFIG)))
    folder = write_diffusers_dir(tmp_path / "sd-vae", diffusers_names(vae.vae.state_dict(), 2, "to_q"),
                                 TINY_DIFFUSERS_CONFIG, "safetensors")
    dit = randomized(create_model("dit-s/2", depth=2, hidden_size=32, num_heads=2, input_size=4, in_channels=4,
                                  num_classes=5), keep=("pos_embed",))
    torch.save(dit.state_dict(), tmp_path / "DiT-tiny.pt")
    out = convert(tmp_path / "DiT-tiny.pt", "dit", tmp_path / "m", tokenizer=folder,
                  overrides=["num_heads=2", "sample.steps=4", "sample.sampler=ddim"])
    pipe = zoo.from_pretrained(out)
    assert pipe.image_size == 8 and pipe.sample_config.steps == 4
    source = Pipeline(dit, vae, pipe.sample_config, num_classes=5, image_size=8)
    labels = torch.tensor([1, 4])
    assert torch.equal(pipe.generate(labels, seed=2), source.generate(labels, seed=2))
    tok_dir = convert(folder, "diffusers-vae", tmp_path / "vae-dir")
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(zoo.from_pretrained(tok_dir).vae.encode(x).mean, vae.vae.encode(x).mean)


def read_diffusers_fields(config: dict) -> dict:
    from zoo.tokenizers.kl_vae import diffusers_config_fields

    return diffusers_config_fields(config)


def test_a_meanflow_state_dict_converts_with_the_same_outputs(tmp_path):
    model = randomized(create_model("mfdit-s/2", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                                    num_classes=4))
    torch.save(model.state_dict(), tmp_path / "step_0001000.pt")
    pipe = zoo.from_pretrained(convert(tmp_path / "step_0001000.pt", "meanflow", tmp_path / "m",
                                       overrides={"num_heads": 2}))
    x, t, r, y = torch.randn(2, 1, 8, 8), torch.tensor([0.9, 0.5]), torch.tensor([0.1, 0.5]), torch.tensor([0, 4])
    assert torch.equal(pipe.generator(x, t, r, y), model(x, t, r, y))
    assert pipe.num_classes == 4 and pipe.image_size == 8


# ------------------------------------------------------------------------------------------------ VAR


def tiny_var_pair():
    var = randomized(create_model("var-d2", patch_nums=(1, 2, 4), vocab_size=16, Cvae=8, num_classes=5))
    vq = randomized(create_tokenizer("msvq", vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 2),
                                     v_patch_nums=(1, 2, 4)), seed=1)
    return var, vq


def test_var_and_its_vqvae_convert_with_patch_nums_read_from_the_weights(tmp_path):
    var, vq = tiny_var_pair()
    torch.save(var.state_dict(), tmp_path / "var_d2.pth")
    torch.save(vq.state_dict(), tmp_path / "vae_tiny.pth")
    out = convert(tmp_path / "var_d2.pth", "var", tmp_path / "m", tokenizer=tmp_path / "vae_tiny.pth")
    config = json.loads((out / "config.json").read_text())
    assert config["generator"]["patch_nums"] == [1, 2, 4] and config["tokenizer"]["v_patch_nums"] == [1, 2, 4]
    assert config["generator"]["num_heads"] == 2 and config["generator"]["vocab_size"] == 16
    assert config["data"]["image_size"] == 8
    pipe = zoo.from_pretrained(out)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(pipe.tokenizer.encode(x), vq.encode(x))
    gt, x_in = vq.training_inputs(x)
    labels = torch.tensor([0, 3])
    assert torch.equal(pipe.generator(labels, x_in), var(labels, x_in))
    source = Pipeline(var, vq, pipe.sample_config, num_classes=5, image_size=8)
    assert torch.equal(pipe.generate(labels, seed=0), source.generate(labels, seed=0))


def test_a_generator_with_a_tokenizer_from_another_model_is_refused(tmp_path):
    var, _ = tiny_var_pair()
    other = randomized(create_tokenizer("msvq", vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2),
                                        v_patch_nums=(1, 2, 4)))
    torch.save(var.state_dict(), tmp_path / "var.pth")
    torch.save(other.state_dict(), tmp_path / "vae.pth")
    with pytest.raises(ConfigError, match="vocab_size is 16, but the tokenizer .* has vocab_size 32"):
        convert(tmp_path / "var.pth", "var", tmp_path / "m", tokenizer=tmp_path / "vae.pth")


def test_a_generator_without_its_tokenizer_weights_is_refused(tmp_path):
    var, _ = tiny_var_pair()
    torch.save(var.state_dict(), tmp_path / "var.pth")
    with pytest.raises(ConfigError, match="give it with --tokenizer"):
        convert(tmp_path / "var.pth", "var", tmp_path / "m")


def test_a_varsr_trainer_checkpoint_converts_with_its_architecture_read_from_the_weights(tmp_path):
    _, vq = tiny_var_pair()
    sr = randomized(create_model("var-sr", depth=2, patch_nums=(1, 2, 4), vocab_size=16, Cvae=8, refiner_depth=1,
                                 refiner_width=32, stem_channels=(8, 16), num_classes=3))
    torch.save({"trainer": {"var_wo_ddp": sr.state_dict()}, "args": argparse.Namespace(depth=2)},
               tmp_path / "VARSR.pth")
    torch.save({"trainer": {"vae_local": vq.state_dict()}}, tmp_path / "VQVAE.pth")
    out = convert(tmp_path / "VARSR.pth", "var-sr", tmp_path / "m", tokenizer=tmp_path / "VQVAE.pth")
    config = json.loads((out / "config.json").read_text())["generator"]
    assert {k: config[k] for k in ("patch_nums", "stem_channels", "num_classes", "refiner_depth", "refiner_width",
                                   "cond_mode")} == dict(patch_nums=[1, 2, 4], stem_channels=[8, 16], num_classes=3,
                                                         refiner_depth=1, refiner_width=32, cond_mode="prefix")
    pipe = zoo.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(pipe.generator.state_dict().values(), sr.state_dict().values()))


# ------------------------------------------------------------------------------------------------ MAR


def test_a_mar_checkpoint_converts_its_ema_weights_with_kl16_style_vae(tmp_path):
    kl, kl_state = tiny_kl_state()
    ema = randomized(create_model("mar-t", img_size=16, vae_stride=4, vae_embed_dim=4, class_num=5, buffer_size=4))
    raw = randomized(create_model("mar-t", img_size=16, vae_stride=4, vae_embed_dim=4, class_num=5, buffer_size=4),
                     seed=7)
    torch.save({"model": raw.state_dict(), "model_ema": ema.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="mar_tiny")}, tmp_path / "checkpoint-last.pth")
    torch.save({"model": kl_state}, tmp_path / "kl16.ckpt")  # MAR's kl16.ckpt layout
    out = convert(tmp_path / "checkpoint-last.pth", "mar", tmp_path / "m", tokenizer=tmp_path / "kl16.ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["generator"]["name"] == "mar-t"
    assert {k: config["generator"][k] for k in ("img_size", "vae_stride", "patch_size", "buffer_size", "class_num",
                                                 "diffloss_d", "diffloss_w", "encoder_num_heads")} == dict(
        img_size=16, vae_stride=4, patch_size=1, buffer_size=4, class_num=5, diffloss_d=2, diffloss_w=128,
        encoder_num_heads=4)
    pipe = zoo.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(pipe.generator.state_dict().values(), ema.state_dict().values()))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(pipe.tokenizer.vae.encode(x).mean, kl.vae.encode(x).mean)


def test_an_unknown_kl_vae_warns_that_its_latent_scale_is_not_known(tmp_path, capsys):
    _, kl_state = tiny_kl_state()
    torch.save({"state_dict": kl_state}, tmp_path / "vae.ckpt")
    convert(tmp_path / "vae.ckpt", "kl-vae", tmp_path / "a")
    assert "scale_factor stays at 0.18215" in capsys.readouterr().err
    out = convert(tmp_path / "vae.ckpt", "kl-vae", tmp_path / "b", overrides=["scale_factor=0.3"])
    assert "scale_factor" not in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["tokenizer"]["scale_factor"] == 0.3


# ------------------------------------------------------------------------------------------------ safety


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    zipped, legacy = tmp_path / "model.pth", tmp_path / "legacy.ckpt"
    torch.save({"ema": {"w": torch.zeros(1)}, "x": RunsCode(marker)}, zipped)  # torch.save's zip container
    legacy.write_bytes(pickle.dumps({"state_dict": {"w": torch.zeros(1)}, "x": RunsCode(marker)}, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(UnsafeCheckpointError, match="refused: .* could run arbitrary code.*Nothing from it was "
                                                        "executed"):
            load_checkpoint(path)
    from zoo.cli.convert import main

    assert main([str(zipped), "--format", "dit", "--out", str(tmp_path / "m")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_argparse_namespace_is_the_only_class_allowed_in_a_checkpoint(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "ok.pth")
    assert load_checkpoint(tmp_path / "ok.pth")["args"].lr == 1e-4
    torch.save({"model": {"w": torch.ones(1)}, "args": Path("x")}, tmp_path / "other.pth")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(tmp_path / "other.pth")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "C:\\x", "a\\..\\b", ""])
def test_file_names_that_leave_the_repository_are_refused(name):
    with pytest.raises(ConfigError, match="unsafe file name"):
        safe_relative_path(name)


# ------------------------------------------------------------------------------------------------ official


def test_the_official_table_names_formats_and_tokenizers_that_exist():
    from zoo.hub.convert import FORMATS, TOKENIZER_FORMATS
    from zoo.hub.official import OFFICIAL

    for model in OFFICIAL.values():
        assert model.format in FORMATS
        assert model.source.repo or model.source.url
        if model.format not in TOKENIZER_FORMATS:
            assert OFFICIAL[model.tokenizer].format in TOKENIZER_FORMATS
    assert {"dit-xl-2-256", "dit-xl-2-512", "sd-vae-ft-ema", "sd-vae-ft-mse", "var-d16", "var-d30", "var-vqvae",
            "mar-b", "mar-l", "mar-h", "mar-kl16", "varsr"} <= set(OFFICIAL)


def test_pull_official_fetches_from_the_hub_and_a_url_and_converts(tmp_path, monkeypatch):
    """official:NAME end to end with a test entry: the generator from a Hub repo (the loopback Hub),
    its tokenizer from a URL (file://); converted into $HF_HOME/zoo/official/NAME."""
    from huggingface_hub import HfApi

    from zoo.hub import official
    from zoo.hub.official import OfficialModel, OfficialSource

    from .test_hub import TOKEN

    var, vq = tiny_var_pair()
    torch.save(var.state_dict(), tmp_path / "var_d2.pth")
    torch.save(vq.state_dict(), tmp_path / "vae.pth")
    entries = {
        "tiny-var": OfficialModel("tiny-var", "test", "var", OfficialSource(repo="org/var", files=("var_d2.pth",)),
                                  tokenizer="tiny-vae", sample={"top_k": 3}),
        "tiny-vae": OfficialModel("tiny-vae", "test", "vqvae",
                                  OfficialSource(url=(tmp_path / "vae.pth").as_uri(), filename="vae.pth")),
    }
    monkeypatch.setattr(official, "OFFICIAL", entries)
    with HubServer(tokens={TOKEN}) as server:
        point_client_at(server, tmp_path / "hf_home", monkeypatch, token=TOKEN)
        api = HfApi(token=TOKEN)
        api.create_repo("org/var")
        api.upload_file(path_or_fileobj=str(tmp_path / "var_d2.pth"), path_in_repo="var_d2.pth", repo_id="org/var")
        from zoo.cli.pull import main

        assert main(["official:tiny-var"]) == 0
        out = Path(os.environ["HF_HOME"]) / "zoo" / "official" / "tiny-var"
        pipe = zoo.from_pretrained(out)
        assert pipe.sample_config.top_k == 3
        x_in = vq.training_inputs(torch.rand(1, 3, 8, 8) * 2 - 1)[1]
        assert torch.equal(pipe.generator(torch.tensor([2]), x_in), var(torch.tensor([2]), x_in))
        assert (Path(os.environ["HF_HOME"]) / "zoo" / "downloads" / "tiny-vae" / "vae.pth").is_file()
        card = (out / "README.md").read_text()
        assert "base_model: org/var" in card and "zoo-convert --format var" in card
