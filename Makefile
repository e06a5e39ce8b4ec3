# Two commands a newcomer needs: `make run` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck bench bench-proxy clean

install: $(STAMP)

# Re-install only when the project's metadata changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,otel]'
	touch $(STAMP)

# HOST, PORT, DB_PATH and every other setting come from the environment
# (defaults 127.0.0.1, 8080, ./data/events.duckdb): `PORT=18501 make run`.
run: install
	$(PY) server.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: install
	$(PY) bench/pipeline_bench.py
	$(PY) bench/store_bench.py
	$(PY) bench/fairness_bench.py
	$(PY) bench/fanout_bench.py
	$(PY) bench/taps_bench.py

# The hot path against a bare proxy and LiteLLM (installed by the bench into its own venv
# under /tmp, never into .venv): several minutes.
bench-proxy: install
	$(PY) bench/proxy_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
