# The two commands of the README:   make demo   (the main job on built-in local data)   make test
PYTHON ?= python3.11
VENV := .venv
# A second, light environment with transformers 5.x: the export is checked to load there too.
HF5_VENV := .venv-hf5
HF5_PACKAGES ?= torch==2.13.0 transformers==5.17.0 safetensors numpy pytest pytest-timeout
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean-demo
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $@

$(HF5_VENV)/.installed:
	@test -x $(HF5_VENV)/bin/python || $(PYTHON) -m venv $(HF5_VENV)
	$(HF5_VENV)/bin/pip install -q $(HF5_PACKAGES)
	@touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/modernbert-train demo $(ARGS)

test: $(VENV)/.installed $(HF5_VENV)/.installed
	@echo "== model code on torch 2.13 + transformers 5.x (what GPU machines run) =="
	$(HF5_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/model tests/bench
	@echo "== full suite on the pinned stack (torch 2.7, composer 0.32.1, transformers 4.x) =="
	$(VENV)/bin/python -m pytest -q $(ARGS)

# Deletes demo_out/ only if it holds nothing but what the demo writes (modernbert_train/safety.py).
clean-demo: $(VENV)/.installed
	$(VENV)/bin/modernbert-train demo --clean --out demo_out
