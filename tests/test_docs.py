"""The documentation keeps up with the code: every recipe key is described, README commands exist."""

import dataclasses
import re
from pathlib import Path

import pytest

from zoo.recipe import SampleConfig, TrainConfig
from zoo.registry import KINDS, get_entry, list_entries

ROOT = Path(__file__).resolve().parent.parent
RECIPES_DOC = (ROOT / "docs" / "recipes.md").read_text()


def documented_keys() -> set[str]:
    return set(re.findall(r"`([a-z_0-9]+)`", RECIPES_DOC))


@pytest.mark.parametrize("config_cls", [TrainConfig, SampleConfig], ids=lambda c: c.__name__)
def test_every_train_and_sample_key_is_documented(config_cls):
    missing = {f.name for f in dataclasses.fields(config_cls)} - documented_keys()
    assert not missing, f"docs/recipes.md does not describe {sorted(missing)}"


@pytest.mark.parametrize("kind", KINDS)
def test_every_registered_component_and_its_keys_are_documented(kind):
    for name in list_entries(kind):
        if kind == "generator" and not name.startswith("dit-"):
            continue
        entry = get_entry(kind, name)
        missing = {f.name for f in dataclasses.fields(entry.config_cls)} - documented_keys()
        assert not missing, f"docs/recipes.md does not describe {kind} {name!r} keys {sorted(missing)}"


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "recipes/dit_digits.yaml" in makefile
