# The two commands of the README:
#   make demo   — set up .venv and train the default recipe (DiT on the embedded digits), print the sample grid
#   make test   — set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# timm needs torchvision; these two builds match each other (the registry's torchvision loads
# only beside the registry's torch, which also runs on a CPU).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup lint bench clean

$(BIN)/.zoo-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.zoo-installed

demo: setup
	$(BIN)/zoo-train recipes/dit_digits.yaml

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check zoo tests tools

bench: setup
	$(BIN)/python tools/bench.py recipes/dit_digits.yaml

clean:
	rm -rf $(VENV) runs
