# Two set-up commands, both working on a fresh machine with only Python 3.11:
#   make demo   creates .venv if missing, installs edgepack with its dependencies, runs the embedded demo offline
#   make test   same environment, runs the linters and the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
# torch is not pinned in pyproject.toml (users bring CUDA / Jetson builds); this machine type installs the local
# CPU build. Override, e.g.: make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,onnx,genai,tune,serve,ssh,plot,eval,gguf
BIN := $(VENV)/bin

.PHONY: demo test install lint clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	EDGEPACK_INVOKED_AS="make demo" $(BIN)/edgepack demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .

test: $(BIN)/.installed lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf edgepack-runs .pytest_cache
