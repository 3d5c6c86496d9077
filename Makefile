# Every target sets itself up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: venv demo test test-fast lint typecheck families-table bench bench-ray bench-quality clean

# llama-cpp-python is published as source only: pip compiles llama.cpp (38 minutes on a busy
# 2-core machine). Its wheel is built once (CPU only, portable, without llama.cpp's examples,
# tools, tests and llava) into .whl/ and kept in WHEEL_CACHE too, outside the clone, so that a
# fresh clone on the same machine (CI) installs it in seconds.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
WHEELS := .whl
WHEEL_CACHE ?= $(HOME)/.cache/moe-rewriter/wheels
LLAMA_WHEEL := llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	mkdir -p $(WHEELS) $(WHEEL_CACHE)
	ls $(WHEELS)/$(LLAMA_WHEEL) $(WHEEL_CACHE)/$(LLAMA_WHEEL) 2>/dev/null | grep -q . || \
		{ CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		  $(BIN)/pip wheel --quiet --no-deps llama-cpp-python==$(LLAMA_CPP_PYTHON) -w $(WHEELS) && \
		  cp $(WHEELS)/$(LLAMA_WHEEL) $(WHEEL_CACHE)/; }
	$(BIN)/pip install --quiet --find-links $(WHEELS) --find-links $(WHEEL_CACHE) -e '.[all]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/rewriter synth --preset small $(DEMO)/src
	$(BIN)/rewriter inspect $(DEMO)/src
	$(BIN)/rewriter synth-saliency $(DEMO)/src --out $(DEMO)/saliency.json --domain demo
	$(BIN)/rewriter plan $(DEMO)/src --saliency $(DEMO)/saliency.json --rank reap --keep-frac 0.5 \
		--keep-multiple 4 --max-shard-size 16MB --out $(DEMO)/plan.json
	$(BIN)/rewriter dry-run $(DEMO)/src --layer 0 --layer 2 --saliency $(DEMO)/saliency.json --keep-frac 0.5
	$(BIN)/rewriter run $(DEMO)/plan.json --out $(DEMO)/pruned
	$(BIN)/rewriter verify $(DEMO)/src $(DEMO)/pruned
	$(BIN)/rewriter inspect $(DEMO)/pruned

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check core rewriter planners ray_jobs bench_io profiling quality tests

typecheck: $(STAMP)
	$(BIN)/mypy core rewriter planners ray_jobs

# Model-level truth and the streamed-vs-whole profile for every MoE model type of the installed
# transformers, then docs/families.json and the README's families table from their results.
families-table: $(STAMP)
	rm -f .families-results.jsonl
	rm -f .streamed-results.jsonl
	REWRITER_FAMILY_RESULTS=.families-results.jsonl $(BIN)/pytest -q -m slow tests/e2e/test_every_family.py || true
	REWRITER_STREAMED_RESULTS=.streamed-results.jsonl $(BIN)/pytest -q -m slow tests/profiling/test_streamed_families.py || true
	$(BIN)/python -m tests.families_table --results .families-results.jsonl --streamed-results .streamed-results.jsonl
	rm -f .families-results.jsonl .streamed-results.jsonl

bench: $(STAMP)
	$(BIN)/python -m bench_io run

# Local executor vs run --ray with 1, 2 and 4 workers, and where the driver's time goes.
bench-ray: $(STAMP)
	$(BIN)/python -m bench_io.raybench

# Trains the reference MoE with 3 seeds (JOBS processes at once) and runs the whole grid: 3 x 3
# calibration draws x 45 pruned models, about 8.5 minutes on one H200 (training ~6.5 of them);
# DEADLINE=S stops after S seconds with the calibration draws finished; SIZE=toy runs on a CPU.
SIZE ?= full
JOBS ?= 3
bench-quality: $(STAMP)
	$(BIN)/python -m quality.benchmark --size $(SIZE) --jobs $(JOBS) $(if $(DEADLINE),--deadline $(DEADLINE))

clean:
	rm -rf $(VENV) $(DEMO) bench-work quality-work .pytest_cache
