# One entry for everything. `make test` and `make demo` set up the host first (idempotent, cached).
PY := $(CURDIR)/.venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean-host

setup:
	@bash scripts/setup_host.sh

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) benchmarks/overhead.py

clean-host:
	rm -rf .host .venv
