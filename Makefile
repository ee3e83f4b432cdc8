# Two commands for a fresh machine (see README):
#   make demo   set up, fetch the embedded model, convert it, answer a prompt
#   make test   set up and run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench clean
setup:
	bash .ci/setup.sh

test: setup
	$(PY) -m pytest -q

demo:
	EXTRAS= bash .ci/setup.sh
	$(PY) examples/convert_and_chat.py

bench: setup
	$(PY) benchmarks/runtime_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
