# Two commands for a fresh machine (see README):
#   make demo   set up, fetch the embedded model, convert it, answer a prompt
#   make test   set up, lint, and run the whole test suite (what CI runs: .ci/run)
# and for working on it:
#   make fast   the fast tier (pytest -m "not slow", a couple of minutes)
#   make report regenerate benchmarks/README.md from benchmarks/out/*.json
VENV ?= .venv
PY := $(VENV)/bin/python
# two pytest-xdist workers, a whole file each (tests/conftest.py)
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

.PHONY: setup test fast demo bench report clean
setup:
	bash .ci/setup.sh

test: setup
	$(PY) -m ruff check .
	$(PYTEST)

fast: setup
	$(PY) -m ruff check .
	$(PYTEST) -m "not slow"

demo:
	EXTRAS= bash .ci/setup.sh
	$(PY) examples/convert_and_chat.py

bench: setup
	$(PY) benchmarks/runtime_bench.py

report:
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) build *.egg-info
