# The two commands of the README: `make train` (the main job, offline) and `make test` (the suite, what .ci/run
# runs). Both create $(VENV) on first use with the tested versions (requirements.txt, pinned by requirements.lock)
# and reinstall when either file changes.
#
# torch comes from TORCH_INDEX, PyTorch's CPU wheel index by default, so the CPU build is installed even where the
# ordinary package index serves the CUDA build of torch (PyPI on Linux does). For a GPU machine pick a CUDA build:
#   make train TORCH_INDEX=https://download.pytorch.org/whl/cu128
# TORCH_INDEX= (empty) takes torch from the ordinary package index, whatever build it serves.

PYTHON ?= python3
VENV ?= .venv
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
DATA_DIR ?= ../shared/data
CONFIG ?= configs/quick.yaml
LAUNCH_CONFIG ?= configs/accelerate/one_process.yaml
PYTEST_ARGS ?= -q
ST_ONNX_VENV ?= .venv-st-onnx
SEEDS ?= 42 1 2
SOUP_DIR ?= runs/soup

BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TORCH_SOURCE := $(if $(strip $(TORCH_INDEX)),--index-url $(TORCH_INDEX))

.PHONY: train test soup venv lock st-onnx-venv

train: $(VENV)/.installed
	$(OFFLINE) $(BIN)/accelerate launch --config_file $(LAUNCH_CONFIG) train.py $(CONFIG) --data_dir $(DATA_DIR)

test: $(VENV)/.installed
	$(OFFLINE) $(BIN)/python -m pytest $(PYTEST_ARGS)

# The main job once per seed of $(SEEDS), into $(SOUP_DIR)/seed<N>, then the uniform average of the runs' weights,
# scored beside each run and saved as a model folder, $(SOUP_DIR)/model (bench/seed_soup.py, bench/RESULTS.md).
soup: $(VENV)/.installed
	for seed in $(SEEDS); do \
	  $(OFFLINE) $(BIN)/accelerate launch --config_file $(LAUNCH_CONFIG) train.py $(CONFIG) --data_dir $(DATA_DIR) \
	    --seed $$seed --output_dir $(SOUP_DIR)/seed$$seed || exit 1; \
	done
	$(OFFLINE) $(BIN)/python bench/seed_soup.py $(foreach s,$(SEEDS),$(SOUP_DIR)/seed$(s)) --data_dir $(DATA_DIR) \
	  --save_dir $(SOUP_DIR)/model

venv: $(VENV)/.installed

# torch alone first, from TORCH_INDEX only (--index-url: the ordinary index's build is never considered), without its
# dependencies; then the requirements, which bring torch's dependencies from the ordinary index, all under the lock.
$(VENV)/.installed: requirements.txt requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps $(TORCH_SOURCE) torch -c requirements.lock
	$(BIN)/python -m pip install -q -r requirements.txt -c requirements.lock
	$(BIN)/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|datasets|evaluate|accelerate|huggingface.hub|sentence.transformers) '
	touch $@

# Rewrite requirements.lock from the packages installed in $(VENV) (after adding or upgrading a requirement there and
# running the tests); torch is pinned without its build label (+cpu, +cu128), which TORCH_INDEX chooses.
lock:
	@test -x $(BIN)/python || { echo "make lock: no $(VENV); run make venv first" >&2; exit 1; }
	{ echo "# The tested versions: pip install -r requirements.txt -c requirements.lock (see the Makefile)."; \
	  echo "# Regenerate with: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > requirements.lock

# The second environment of bench/inference.py's st_onnx_backend run (sentence-transformers' own ONNX backend, which
# needs transformers < 4.58): python bench/inference.py --st_onnx_python $(ST_ONNX_VENV)/bin/python
st-onnx-venv: $(ST_ONNX_VENV)/.installed

$(ST_ONNX_VENV)/.installed: bench/requirements-st-onnx.txt
	test -x $(ST_ONNX_VENV)/bin/python || $(PYTHON) -m venv $(ST_ONNX_VENV)
	$(ST_ONNX_VENV)/bin/python -m pip install -q --no-deps $(TORCH_SOURCE) torch -c bench/requirements-st-onnx.txt
	$(ST_ONNX_VENV)/bin/python -m pip install -q -r bench/requirements-st-onnx.txt
	touch $@
