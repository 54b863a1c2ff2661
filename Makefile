# Two commands: `make demo` and `make test`. Each sets up .venv (CPU torch) when needed.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo_out
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup models models-all demo test test-fast bench quality lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/mmllm models pull minilm efficientnet-lite0 whisper-tiny.en > /dev/null

models-all: $(STAMP)
	$(BIN)/mmllm models pull --all > /dev/null

demo: models
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/mmllm prepare sample_data/manifest.csv --output $(DEMO)/prepared > $(DEMO)/prepare.json
	$(BIN)/mmllm finetune $(DEMO)/prepared --output $(DEMO)/checkpoint --epochs 10 --patience 3 > $(DEMO)/finetune.json
	$(BIN)/mmllm eval model $(DEMO)/checkpoint $(DEMO)/prepared --split test --output $(DEMO)/metrics.json > /dev/null
	$(BIN)/python -c "import json; m=json.load(open('$(DEMO)/metrics.json')); print(json.dumps({k: m[k] for k in ('split','n','accuracy','macro_f1','ece')}))"
	$(BIN)/python -c "import csv, json; rows = [r for r in csv.DictReader(open('sample_data/manifest.csv')) if r['split'] == 'test'][:5]; [print(json.dumps({'id': r['id'], 'text': r['text'], 'image': 'sample_data/' + r['image'], 'audio': 'sample_data/' + r['audio']})) for r in rows]" > $(DEMO)/few.jsonl
	$(BIN)/mmllm predict $(DEMO)/checkpoint - --top-k 2 < $(DEMO)/few.jsonl

test: models-all
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow"

# full run: updates bench/results.json and BENCHMARKS.md; `make bench BENCH_ARGS=--quick` (about a minute) writes
# under a temporary folder instead (or BENCH_ARGS="--quick --out DIR")
bench: models
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# quality suite on real public data (bench/quality_data.py fetches it with apt-get download into quality_data/,
# git-ignored): writes bench/quality.json and bench/QUALITY.md; about 25 minutes on 2 cores
quality: models
	$(BIN)/python bench/quality.py $(QUALITY_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mmllm tests

clean:
	rm -rf $(DEMO) .pytest_cache
