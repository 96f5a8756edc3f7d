# `make demo` and `make test` create and reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A tiny qwen3_moe trained on Python's standard library (daemon/tools/train.py; committed, never rebuilt).
DEMO_MODEL ?= models/stdlib-qwen3_moe

.PHONY: venv tools demo test test-all bench bench-serve bench-big bench-routing train-demo clean

venv: $(STAMP)

# tmux drives the `moed top` test; installed when missing and we may (root with apt-get).
tools:
	@command -v tmux >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -qq tmux >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && \
		 apt-get install -y -qq tmux >/dev/null 2>&1)); } || echo "tmux not installed: the live TUI test will skip"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# The main job: a synthetic model, the daemon, a streamed answer, stats, stop.
demo: venv
	test -f $(DEMO_MODEL)/config.json || $(BIN)/moed make-model $(DEMO_MODEL) --arch qwen3_5_moe --preset tiny
	$(BIN)/moed pack $(DEMO_MODEL)
	$(BIN)/moed plan --model $(DEMO_MODEL) --cache-fraction 0.25 --context 4096 --no-measure
	$(BIN)/moed generate --model $(DEMO_MODEL) --prompt "def read_config(path):" --max-tokens 48 --cache-fraction 0.25 \
		--temp 0.7 --seed 1
	MOED_RUNTIME_DIR=$(CURDIR)/.moed-run $(BIN)/moed start --model $(DEMO_MODEL) --cache-fraction 0.25
	MOED_RUNTIME_DIR=$(CURDIR)/.moed-run $(BIN)/moed run "import os" --max-tokens 48 --temp 0.7 --seed 1 -v || \
		{ MOED_RUNTIME_DIR=$(CURDIR)/.moed-run $(BIN)/moed stop; exit 1; }
	MOED_RUNTIME_DIR=$(CURDIR)/.moed-run $(BIN)/moed ps
	MOED_RUNTIME_DIR=$(CURDIR)/.moed-run $(BIN)/moed stop

test: venv tools
	$(BIN)/python -m pytest -q

test-all: venv tools
	$(BIN)/python -m pytest -q -m ""

MED := models/med-qwen3_moe
BIG := models/big40-qwen3_moe
R := bench/results
# Every figure the README quotes; each writes its own provenance file under bench/results/.
bench: venv
	$(BIN)/moed make-model $(MED) --arch qwen3_moe --preset med --skip-existing
	$(BIN)/moed pack $(MED)
	$(BIN)/moed bench --model $(MED) --out $(R)/med-paged.json --cold --sampling random,greedy
	$(BIN)/moed bench --model $(MED) --out $(R)/med-repeat.json --cold --cache-fractions 0.25,0.1 \
		--sampling random --repeat 3 --skip-io
	$(BIN)/moed bench --model $(MED) --out $(R)/med-pack.json --cold --cache-fractions 0.25,0.1 \
		--layouts stacked,packed --io buffered,direct --skip-io
	$(BIN)/moed bench --model $(MED) --out $(R)/med-lookahead.json --cold --cache-fractions 0.5,0.25,0.1 \
		--sampling random,greedy --lookahead off,on --skip-io
	$(BIN)/moed bench --model $(MED) --out $(R)/med-prefill.json --cold --cache-fractions 0.25 \
		--prompt-tokens 512 --max-tokens 8 --sampling greedy --skip-io
	$(BIN)/moed bench --model $(MED) --out $(R)/med-ranks.json --cold --ranks 1,2 --cache-fractions 0.25 \
		--sampling random,greedy
	$(BIN)/moed bench --model $(MED) --out $(R)/med-concurrency.json --cold --concurrency 1,2,4 \
		--cache-fractions 0.25 --sampling random,greedy
	$(BIN)/moed bench --model $(MED) --out $(R)/med-top-k.json --cold --top-k 8,6,4,2 --cache-fractions 0.25
	$(BIN)/moed trace --model $(MED) --out $(R)/med-trace-256.json --max-tokens 256
	$(BIN)/moed policy $(R)/med-trace-256.json --fractions 0.1,0.25,0.5 --out $(R)/med-policy.json
	$(MAKE) bench-serve

# Serving: moed's HTTP API next to mlx_lm.server on the same model (README "Serving: chats, agents, a
# second app"): the tiny qwen3_moe for every chunk size, then small (22 prompt tokens/s here) for the issue's figures.
SERVE := models/tiny-qwen3_moe
bench-serve: venv
	$(BIN)/moed make-model $(SERVE) --arch qwen3_moe --preset tiny --skip-existing
	$(BIN)/moed pack $(SERVE)
	$(BIN)/moed bench --workload chat --model $(SERVE) --cache-fractions 0.25 --max-tokens 32 --repeat 3 \
		--out $(R)/serve-chat.json
	$(BIN)/moed bench --workload agent --model $(SERVE) --cache-fractions 0.25 --max-tokens 32 --repeat 2 \
		--out $(R)/serve-agent.json
	$(BIN)/moed bench --workload contention --model $(SERVE) --cache-fractions 0.25 \
		--prefill-chunks 16,32,64,128,256,512 --repeat 2 --out $(R)/serve-contention.json
	$(BIN)/moed bench --workload contention --model $(SERVE) --cache-fractions 0.25 \
		--prefill-chunks 64:0,512:2,512:3,512:4 --repeat 2 --out $(R)/serve-contention-paced.json
	$(BIN)/moed bench --workload contention --model $(SERVE) --cache-fractions 0.25 \
		--prefill-chunks 64:0,512:1,512:2 --repeat 2 --out $(R)/serve-contention-paced-2.json
	$(BIN)/moed make-model models/small-qwen3_moe --arch qwen3_moe --preset small --skip-existing
	$(BIN)/moed pack models/small-qwen3_moe
	$(BIN)/moed bench --workload contention --model models/small-qwen3_moe --cache-fractions 0.25 \
		--prefill-chunks 32,64,256 --prompt-tokens 1000 --out $(R)/serve-contention-small.json
	$(BIN)/moed bench --workload contention --model models/small-qwen3_moe --cache-fractions 0.25 \
		--prefill-chunks 512:1,512:2,512:3 --prompt-tokens 1000 --repeat 2 --out $(R)/serve-contention-small-paced.json
	$(BIN)/moed bench --workload chat --model models/small-qwen3_moe --cache-fractions 0.25 --max-tokens 32 --repeat 2 \
		--out $(R)/serve-chat-small.json
	$(BIN)/moed bench --workload agent --model models/small-qwen3_moe --cache-fractions 0.25 --max-tokens 32 --repeat 2 \
		--out $(R)/serve-agent-small.json

# Routing like a real model's (README "Routing like a real model's"): calibrated traces, the trained
# model's trace and statistics, the policies on both, lookahead under forced routing, top-k quality.
TRAINED := models/stdlib-qwen3_moe
bench-routing: venv
	$(BIN)/python -m moed.daemon.tools.tracesynth calibrate --out $(R)/synth-calibration.json > /dev/null
	$(BIN)/moed trace synth --experts 512 --top-k 4 --layers 16 --tokens 256 --out $(R)/synth-512-top4-trace.json
	$(BIN)/moed trace synth --experts 512 --top-k 10 --layers 16 --tokens 220 --out $(R)/synth-512-top10-trace.json
	$(BIN)/moed trace --model $(TRAINED) --out $(R)/stdlib-trace-256.json --max-tokens 256 \
		--prompt "$$(printf 'import os\nimport sys\n\n\ndef main(argv):\n    ')"
	$(BIN)/python -m moed.daemon.tools.tracesynth report --trace trained=$(R)/stdlib-trace-256.json \
		--trace random-weights-med=$(R)/med-trace-256.json --recall-model $(TRAINED) --out $(R)/routing-stats.json > /dev/null
	$(BIN)/moed policy $(R)/synth-512-top4-trace.json --fractions 0.03125,0.0625,0.125,0.25 --out $(R)/synth-512-top4-policy.json
	$(BIN)/moed policy $(R)/synth-512-top10-trace.json --fractions 0.0586,0.125,0.25 --out $(R)/synth-512-top10-policy.json
	$(BIN)/moed policy $(R)/stdlib-trace-256.json --fractions 0.25,0.5 --out $(R)/stdlib-policy.json
	$(BIN)/moed trace synth --model $(MED) --tokens 256 --out $(R)/synth-med-trace.json
	$(BIN)/moed bench --model $(MED) --routing $(R)/synth-med-trace.json --cache-fractions 0.25,0.1 --lookahead off,on \
		--evictions lru --sampling random --max-tokens 32 --repeat 2 --skip-io --out $(R)/med-forced-lookahead.json
	$(BIN)/moed policy $(R)/synth-med-trace.json --fractions 0.1,0.25 --policies lru,fwlru,belady --layouts per_layer \
		--out $(R)/synth-med-policy.json
	$(BIN)/moed bench --model $(MED) --routing $(R)/synth-med-trace.json --cache-fractions 0.25,0.1 --lookahead off \
		--evictions lru,fwlru --sampling random --max-tokens 32 --repeat 2 --skip-io --out $(R)/med-forced-eviction.json
	$(BIN)/moed bench --model $(MED) --routing $(R)/synth-med-trace.json --cache-fractions 0.25 --lookahead off \
		--evictions lru,fwlru,lfuda,dlfu,hotlru --sampling random --max-tokens 96 --repeat 3 --skip-io --skip-mlx-lm \
		--out $(R)/engine-policies.json
	$(BIN)/python -m moed.daemon.tools.train $(TRAINED) --top-k 8,6,4,2 --provenance $(R)/stdlib-top-k-quality.json > /dev/null
	$(BIN)/moed bench --model $(TRAINED) --top-k 8,6,4,2 --cache-fractions 0.25 --out $(R)/stdlib-top-k.json
	$(BIN)/moed bench --workload warm-start --model $(TRAINED) --cache-fractions 0.125,0.25,0.5 --max-tokens 100 \
		--out $(R)/stdlib-warm-start.json
	$(BIN)/moed bench --workload warm-start --model $(MED) --routing $(R)/synth-med-trace.json --cache-fractions 0.1,0.25 \
		--max-tokens 100 --out $(R)/med-forced-warm-start.json
	$(BIN)/python -m moed.daemon.tools.forecast --out $(R)/forecast-published.json

# Retrain the demo model (~20 min of CPU; writes a new checkpoint, then commit it).
train-demo: venv
	nice -n 10 $(BIN)/python -m moed.daemon.tools.train $(TRAINED) --provenance $(R)/stdlib-train.json

# A checkpoint larger than this machine's RAM (40 GB; ~15 min to write), decoded from a 2 GB cache.
bench-big: venv
	$(BIN)/moed make-model $(BIG) --arch qwen3_moe --preset med --size-gb 40 --skip-existing
	$(BIN)/moed bench --model $(BIG) --out $(R)/big40.json --cold --skip-mlx-lm --cache-fractions 0.05 \
		--sampling random --max-tokens 16
	$(BIN)/moed trace synth --model $(BIG) --tokens 128 --out $(R)/synth-big40-trace.json
	$(BIN)/moed bench --model $(BIG) --routing $(R)/synth-big40-trace.json --cold --cache-fractions 0.3,0.15,0.05 \
		--lookahead off --io buffered,direct --sampling random --max-tokens 48 --skip-io --skip-mlx-lm \
		--out $(R)/big40-page-cache-split.json
	$(BIN)/moed bench --model $(BIG) --routing $(R)/synth-big40-trace.json --cache-fractions 0.3,0.15,0.05 \
		--lookahead off --io buffered,direct --sampling random --max-tokens 48 --repeat 2 --skip-io --skip-mlx-lm \
		--out $(R)/big40-page-cache-split-warm.json

clean:  # keeps the committed trained demo model (its moed-pack is rebuilt)
	rm -rf $(VENV) $(filter-out models/stdlib-qwen3_moe,$(wildcard models/*)) models/stdlib-qwen3_moe/moed-pack
