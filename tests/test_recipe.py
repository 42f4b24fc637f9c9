"""Recipes: parsing, type coercion, overrides and the errors a user sees."""

from pathlib import Path

import pytest
import yaml

from zoo.config import ConfigError
from zoo.recipe import load_recipe, parse_override, recipe_from_dict

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_strings_like_1e_minus_4_are_coerced_to_float(tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["train"]["lr"] = "1e-4"  # what PyYAML makes of an unsigned-exponent float
    recipe = load_recipe(write(tmp_path, tiny_recipe_dict))
    assert recipe.train.lr == pytest.approx(1e-4) and isinstance(recipe.train.lr, float)


def test_overrides_set_nested_fields_with_yaml_types(tiny_recipe_file):
    recipe = load_recipe(tiny_recipe_file, ["train.max_steps=12", "model.depth=3", "sample.cfg_scale=1.5",
                                            "train.lr_scale={'y_embedder.*': 0.1}"])
    assert recipe.train.max_steps == 12 and recipe.model.config.depth == 3
    assert recipe.sample.cfg_scale == 1.5 and recipe.train.lr_scale == {"y_embedder.*": 0.1}


def test_override_without_equals_sign_is_explained():
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        parse_override("train.lr")


def test_unknown_generator_names_file_key_and_closest_match(tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["model"]["name"] = "dit-q/2"
    path = write(tmp_path, tiny_recipe_dict, "x.yaml")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}: model.name: 'dit-q/2' is not a registered generator; "
                                     f"did you mean 'dit-s/2'?")


def test_unknown_key_names_the_key_path_and_allowed_keys(tiny_recipe_file):
    with pytest.raises(ConfigError, match=r"train\.max_step: unknown key; did you mean 'max_steps'\?"):
        load_recipe(tiny_recipe_file, ["train.max_step=5"])


def test_wrong_type_names_the_key(tiny_recipe_file):
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer, got 'many'"):
        load_recipe(tiny_recipe_file, ["train.batch_size=many"])


def test_negative_sample_counts_are_refused_by_name(tiny_recipe_file):
    with pytest.raises(ConfigError, match=r"back_projection must be >= 0 steps \(0 = off\), got -1"):
        load_recipe(tiny_recipe_file, ["sample.back_projection=-1"])
    with pytest.raises(ConfigError, match=r"tile_overlap must be >= 0"):
        load_recipe(tiny_recipe_file, ["sample.tile_overlap=-2"])


def test_value_outside_choices_lists_the_choices(tiny_recipe_file):
    with pytest.raises(ConfigError, match=r"train\.lr_schedule: 'cosin' is not allowed; choose one of "
                                          r"\['constant', 'cosine'\]; did you mean 'cosine'"):
        load_recipe(tiny_recipe_file, ["train.lr_schedule=cosin"])


def test_unknown_section_is_refused(tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["trian"] = {}
    with pytest.raises(ConfigError, match="trian: unknown section; did you mean 'train'"):
        load_recipe(write(tmp_path, tiny_recipe_dict))


def test_missing_model_name_is_explained(tmp_path, tiny_recipe_dict):
    del tiny_recipe_dict["model"]["name"]
    with pytest.raises(ConfigError, match="model.name: missing"):
        load_recipe(write(tmp_path, tiny_recipe_dict))


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)


def test_channel_mismatch_between_model_and_tokenizer_is_refused(tiny_recipe_file):
    with pytest.raises(ConfigError, match=r"model\.in_channels: 4 does not match the 1 latent channels"):
        load_recipe(tiny_recipe_file, ["model.in_channels=4"])


def test_input_size_must_match_data_size_over_tokenizer_stride(tiny_recipe_file):
    with pytest.raises(ConfigError, match=r"model\.input_size: 16 does not match the latent side 8"):
        load_recipe(tiny_recipe_file, ["model.input_size=16"])


def test_class_count_must_match_the_dataset(tiny_recipe_file):
    with pytest.raises(ConfigError, match=r"model\.num_classes: 5 but dataset 'digits' has 10 classes"):
        load_recipe(tiny_recipe_file, ["model.num_classes=5"])


def test_learn_sigma_must_agree_between_model_and_objective(tiny_recipe_file):
    with pytest.raises(ConfigError, match=r"objective\.learn_sigma: False disagrees with model\.learn_sigma=True"):
        load_recipe(tiny_recipe_file, ["objective.learn_sigma=false"])


def test_fp16_is_refused_on_a_cpu_before_training(tiny_recipe_file, tmp_path):
    from zoo.train import Trainer

    recipe = load_recipe(tiny_recipe_file, ["train.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="fp16 is not supported on a CPU"):
        Trainer(recipe, tmp_path / "run", cpu=True)


def test_resolved_recipe_round_trips_through_yaml(tiny_recipe_file, tmp_path):
    recipe = load_recipe(tiny_recipe_file)
    recipe.save(tmp_path / "resolved.yaml")
    again = recipe_from_dict(yaml.safe_load((tmp_path / "resolved.yaml").read_text()), "resolved.yaml")
    assert again.to_dict() == recipe.to_dict()
    assert again.objective.config.diffusion_steps == 1000  # defaults are spelled out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_builds_with_tiny_overrides(path, tmp_path):
    recipe = load_recipe(path)
    if recipe.model is None:  # a tokenizer recipe
        tokenizer = recipe.tokenizer.build()
        assert tokenizer.trainable and sum(p.numel() for p in tokenizer.parameters()) > 0
        return
    small = dict(depth=1, hidden_size=32, embed_dim=32, num_heads=2, encoder_depth=1, decoder_depth=1,
                 encoder_embed_dim=32, decoder_embed_dim=32, encoder_num_heads=2, decoder_num_heads=2,
                 diffloss_d=1, diffloss_w=32)
    tiny = {k: v for k, v in small.items() if hasattr(recipe.model.config, k)}
    fields = {k: v for k, v in recipe.model.to_dict().items() if k != "name"} | tiny
    objective = recipe.objective.build() if recipe.objective is not None else None
    model = recipe.model.entry.build(recipe.model.entry.make_config(fields), objective=objective)
    assert sum(p.numel() for p in model.parameters()) > 0
