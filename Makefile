# The two commands of the README:   make demo   (the main job on built-in local data)   make test
PYTHON ?= python3.11
VENV := .venv
# A second environment on current torch + transformers 5.x (what GPU users run; torch's varlen attention needs
# torch >= 2.10): composer and streaming pin older torch in their metadata but run there, so they are installed
# with --no-deps (requirements/current-torch.txt). The model, the trainer and FSDP2 are tested there too, and
# exported folders are checked to load in transformers 5.x.
CURRENT_VENV := .venv-current
CURRENT_TORCH ?= torch==2.14.1 torchvision==0.29.1 transformers==5.17.0
# No pip cache: a fresh machine holds the two environments (about 14 GB, mostly torch's CUDA wheels) but not
# a second copy of every wheel; CI once ran out of disk while installing.
export PIP_NO_CACHE_DIR := 1
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-scale install clean-demo
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $@

$(CURRENT_VENV)/.installed: pyproject.toml requirements/current-torch.txt
	@test -x $(CURRENT_VENV)/bin/python || $(PYTHON) -m venv $(CURRENT_VENV)
	$(CURRENT_VENV)/bin/pip install -q $(CURRENT_TORCH)
	$(CURRENT_VENV)/bin/pip install -q --no-deps composer==0.32.1 mosaicml-streaming==0.13.0
	$(CURRENT_VENV)/bin/pip install -q -r requirements/current-torch.txt pytest pytest-timeout
	$(CURRENT_VENV)/bin/pip install -q --no-deps -e .
	@touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/modernbert-train demo $(ARGS)

test: $(VENV)/.installed $(CURRENT_VENV)/.installed
	@echo "== model, trainer and FSDP2 on torch 2.14 + transformers 5.x (what GPU users run) =="
	$(CURRENT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/model tests/bench tests/train/test_fsdp.py \
	  tests/train/test_exact_resume.py tests/train/test_composer_model.py tests/train/test_optim_fsdp2.py \
	  tests/train/test_metrics_sync_free.py
	@echo "== full suite on the pinned stack (torch 2.7, composer 0.32.1, transformers 4.x) =="
	$(VENV)/bin/python -m pytest -q --durations=25 --ignore=tests/scale $(ARGS)

# The cluster rehearsal (tests/scale/, minutes each; skipped by `make test`): faults injected into 4-rank jobs
# under the real launcher (SCALE_RESULTS=file.jsonl collects the fault table's figures), and
# launch/slurm_phase.sbatch under a real SLURM that the tests start on 127.0.0.1 (slurmctld, two slurmd, munged),
# jobs of 1 and 2 nodes requeued mid-run (~12 min on a loaded 2-core VM). Installs Debian's slurm-wlm and munge
# first (as root, as in CI's container); without them the SLURM tests skip, saying why.
test-scale: $(VENV)/.installed
	bash tests/scale/install_slurm.sh
	SCALE_TESTS=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/scale $(ARGS)

# Deletes demo_out/ only if it holds nothing but what the demo writes (modernbert_train/common/safety.py).
clean-demo: $(VENV)/.installed
	$(VENV)/bin/modernbert-train demo --clean --out demo_out
