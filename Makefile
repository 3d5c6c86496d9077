# Every target sets itself up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: venv demo test test-fast lint typecheck families-table bench bench-ray bench-quality clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all]'
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
	$(BIN)/ruff check rewriter planners ray_jobs bench_io profiling quality tests

typecheck: $(STAMP)
	$(BIN)/mypy rewriter planners ray_jobs

# Model-level truth and the streamed-vs-whole profile for every MoE model type of the installed
# transformers, then docs/families.json and the README's families table from their results.
families-table: $(STAMP)
	rm -f .families-results.jsonl
	rm -f .streamed-results.jsonl
	REWRITER_FAMILY_RESULTS=.families-results.jsonl $(BIN)/pytest -q -m slow tests/test_every_family.py || true
	REWRITER_STREAMED_RESULTS=.streamed-results.jsonl $(BIN)/pytest -q -m slow tests/test_streamed_families.py || true
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
