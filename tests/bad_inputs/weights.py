"""Malformed weight files, built on demand (a corpus of bytes is easier to read as the code that makes it).

:func:`build` writes every case under a folder and returns them as :class:`Case`: the zoo command to
run on it and a regex its one-line error must match. test_bad_inputs.py runs them all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_DIT = dict(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=True, cfg_channels="all")


@dataclasses.dataclass
class Case:
    name: str
    command: str  # zoo-sample | zoo-convert | zoo-reconstruct
    argv: list[str]
    expect: str  # regex on the error line
    names: str  # the file (or tensor) the message must name


class RunsCode:
    """Unpickling calls os.system: a file that would run a command when loaded unsafely."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/zoo-pwned",))


def _model_dir(path: Path) -> Path:
    """A valid tiny DiT model directory (config.json + model.safetensors)."""
    import zoo
    from zoo.hub.model_dir import save_model_dir

    model = zoo.create_model("dit-s/2", **TINY_DIT)
    config = {"generator": {"name": "dit-s/2", **TINY_DIT}, "tokenizer": {"name": "pixel", "channels": 1},
              "objective": {"name": "gaussian", "learn_sigma": True},
              "data": {"name": "digits", "image_size": 8, "channels": 1, "num_classes": 10},
              "sample": {"sampler": "ddim", "steps": 2, "num": 2, "batch_size": 2}}
    save_model_dir(path, config, model.state_dict())
    return path


def _variant(root: Path, name: str, good: Path) -> Path:
    path = root / name
    shutil.copytree(good, path)
    return path


def build(root: Path) -> list[Case]:
    root.mkdir(parents=True, exist_ok=True)
    good = _model_dir(root / "good")
    weights = good / "model.safetensors"
    state = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(weights)).items()}
    cases: list[Case] = []

    def sample_case(name, expect, names):
        cases.append(Case(name, "zoo-sample", [str(root / name), "--num", "2", "--out", str(root / f"{name}.png")],
                          expect, names))

    d = _variant(root, "truncated_safetensors", good)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    sample_case(d.name, r"not a readable safetensors file", "truncated_safetensors/model.safetensors")

    d = _variant(root, "garbage_safetensors", good)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    sample_case(d.name, r"not a readable safetensors file", "garbage_safetensors/model.safetensors")

    d = _variant(root, "empty_safetensors", good)
    (d / "model.safetensors").write_bytes(b"")
    sample_case(d.name, r"not a readable safetensors file", "empty_safetensors/model.safetensors")

    d = _variant(root, "wrong_shape", good)
    bad = dict(state, **{"final_layer.linear.weight": torch.zeros(3, 32)})
    save_file(bad, str(d / "model.safetensors"))
    sample_case(d.name, r"tensor 'final_layer\.linear\.weight' has shape \(3, 32\), the config needs \(8, 32\)",
                "wrong_shape/model.safetensors")

    d = _variant(root, "missing_tensor", good)
    save_file({k: v for k, v in state.items() if k != "y_embedder.embedding_table.weight"},
              str(d / "model.safetensors"))
    sample_case(d.name, r"missing \['y_embedder\.embedding_table\.weight'\]", "missing_tensor/model.safetensors")

    d = _variant(root, "unexpected_tensor", good)
    save_file(dict(state, extra_head=torch.zeros(2)), str(d / "model.safetensors"))
    sample_case(d.name, r"unexpected \['extra_head'\]", "unexpected_tensor/model.safetensors")

    d = _variant(root, "wrong_family", good)
    import zoo

    var = zoo.create_model("var-d2", embed_dim=32, num_heads=2, num_classes=10, patch_nums=(1, 2), vocab_size=16,
                           Cvae=4)
    save_file({k: v.contiguous() for k, v in var.state_dict().items()}, str(d / "model.safetensors"))
    sample_case(d.name, r"weights do not fit the config: missing .*unexpected", "wrong_family/model.safetensors")

    d = _variant(root, "config_not_json", good)
    (d / "config.json").write_text('{"generator": {"name": "dit-s/2",')
    sample_case(d.name, r"not valid JSON", "config_not_json/config.json")

    d = _variant(root, "config_unknown_generator", good)
    config = json.loads((d / "config.json").read_text())
    config["generator"]["name"] = "dit-q/9"
    (d / "config.json").write_text(json.dumps(config))
    sample_case(d.name, r"generator: 'dit-q/9' is not a registered generator", "config_unknown_generator/config.json")

    d = _variant(root, "config_wrong_type", good)
    config = json.loads((d / "config.json").read_text())
    config["generator"]["hidden_size"] = "wide"
    (d / "config.json").write_text(json.dumps(config))
    sample_case(d.name, r"generator\.hidden_size: expected an integer, got 'wide'", "config_wrong_type/config.json")

    d = _variant(root, "shard_outside", good)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"pos_embed": "../../etc/passwd"}}))
    sample_case(d.name, r"unsafe file name '\.\./\.\./etc/passwd'", "shard_outside/model.safetensors.index.json")

    def convert_case(name, file_name, expect):
        out = root / f"{name}_out"
        cases.append(Case(name, "zoo-convert", [str(root / file_name), "--format", "dit", "--out", str(out)],
                          expect, file_name))

    with open(root / "runs_code.pt", "wb") as handle:
        pickle.dump({"model": RunsCode()}, handle)
    torch.save({"model": RunsCode()}, root / "runs_code_zip.pt")
    convert_case("pickle_runs_code", "runs_code.pt", r"refused: reading this pickle would .* Nothing from it was "
                                                     r"executed")
    convert_case("torch_save_runs_code", "runs_code_zip.pt", r"refused: reading this pickle would .* Nothing from it "
                                                             r"was executed")

    import numpy as np

    torch.save({"model": {"w": np.zeros(3)}}, root / "numpy_inside.pt")
    convert_case("pickle_with_numpy", "numpy_inside.pt", r"refused: reading this pickle")

    torch.save(dict(state), root / "ok.pt")
    data = (root / "ok.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 3])
    convert_case("truncated_pickle", "truncated.pt", r"not a readable checkpoint")

    (root / "text.pth").write_text("this is not a checkpoint\n")
    convert_case("text_file", "text.pth", r"not a readable checkpoint")

    torch.save([torch.zeros(2), torch.ones(2)], root / "a_list.pt")
    convert_case("a_list_not_a_state_dict", "a_list.pt", r"expected a dict of weights, got list")

    save_file({k: v.contiguous() for k, v in var.state_dict().items()}, str(root / "var_weights.safetensors"))
    convert_case("wrong_family_for_the_format", "var_weights.safetensors",
                 r"no tensor 'x_embedder\.proj\.weight', so this is not a 'dit' checkpoint")

    d = root / "tokenizer_bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"tokenizer": {"name": "msvq", "vocab_size": 16, "z_channels": 4,
                                                             "ch": 32, "ch_mult": [1, 1], "v_patch_nums": [1, 2],
                                                             "image_channels": 1}}))
    (d / "tokenizer.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    cases.append(Case("tokenizer_bad_header", "zoo-reconstruct", [str(d)], r"not a readable safetensors file",
                      "tokenizer_bad/tokenizer.safetensors"))
    return cases
