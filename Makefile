# Two commands: `make demo` and `make test` set everything up (a .venv) on first use.
# Install order matters: torch/torchvision first (the only pair that works together here, and pip takes it
# from this machine's disk), then the project with its extras.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1
PIP    := pip==26.3
DEMO   ?= demo_out
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,viz]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mmctr demo --out $(DEMO) --overwrite --config configs/tiny.yaml --set train.epochs=3

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO) .pytest_cache
