# The two commands a user needs: `make demo` and `make test`. Both install what they need first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: deps test test-fast demo bench lint clean

deps:
	@bash scripts/deps.sh

test: deps
	$(PY) -m pytest -q

# The quick loop: everything but the chains and Postgres starts.
test-fast: deps
	$(PY) -m pytest -q -m 'not slow'

demo: deps
	$(PY) -m kloset_blocks.demo

bench: deps
	$(PY) -m pytest bench -q --benchmark-enable --benchmark-only

lint: deps
	$(VENV)/bin/ruff check kloset_blocks nbdplugin tests bench
	$(VENV)/bin/ruff format --check kloset_blocks nbdplugin tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
