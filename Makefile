# g3n: Gemma 3n -> LiteRT bundles.  `make demo` to see it work, `make test` to check it.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := out/demo

.PHONY: setup adb test fuzz demo artifacts bench clean

setup: $(STAMP)

# torch and torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1); everything comes from the package registries.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	@$(MAKE) --no-print-directory adb
	touch $(STAMP)

# g3n-push drives the platform's adb client: install Debian's where it is missing and we may.
adb:
	@if command -v adb >/dev/null 2>&1; then \
	  echo "adb: $$(command -v adb)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q adb >/dev/null \
	  || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q adb >/dev/null); \
	  command -v adb >/dev/null && echo "adb: installed $$(command -v adb)" || echo "adb: apt-get could not install it"; \
	else \
	  echo "adb: not found and cannot install it here (needs root and apt); install Android's platform-tools" \
	       "(Debian / Ubuntu: sudo apt install adb) for g3n-push and its tests"; \
	fi

# The tiny bundle folder the tests convert is kept under artifacts/ (CI publishes it).
test: setup
	G3N_ARTIFACTS=artifacts $(BIN)/python -m pytest -q --durations=20

# The long fuzz run (a short one is part of make test): a table of counts in docs/RELIABILITY.md.
FUZZ_CASES ?= 200
fuzz: setup
	$(BIN)/python -m tests.support.fuzz --per-family $(FUZZ_CASES) --seed 1 --report docs/RELIABILITY.md

demo: setup
	$(BIN)/python -m tests.support.tiny_checkpoint $(DEMO)/checkpoint
	$(BIN)/g3n-convert --checkpoint $(DEMO)/checkpoint --out $(DEMO)/bundle --prefill-lengths 8,32 --cache-length 256
	$(BIN)/g3n-convert verify $(DEMO)/bundle
	@echo; echo "manifest.json (bundles):"
	@$(BIN)/python -c "import json; m = json.load(open('$(DEMO)/bundle/manifest.json')); \
	[print(f\"  {k:<10} {v['file']:<18} {v['bytes']:>10,d} bytes  {v['parameters']:>10,d} params  signatures: {', '.join(v['signatures'])}\") for k, v in m['bundles'].items()]"
	$(BIN)/g3n-convert --checkpoint $(DEMO)/checkpoint --out $(DEMO)/bundle-int4 --quant int4 --prefill-lengths 8,32 --cache-length 256
	$(BIN)/g3n-run $(DEMO)/bundle-int4 --prompt "Tell me about foxes." --max-new-tokens 24 --stats
	$(BIN)/python -c "from PIL import Image; Image.radial_gradient('L').convert('RGB').save('$(DEMO)/picture.png')"
	$(BIN)/g3n-run $(DEMO)/bundle-int4 --prompt "What is in the picture?" --image $(DEMO)/picture.png --max-new-tokens 12 --stats

artifacts: setup
	$(BIN)/python -m tests.support.tiny_checkpoint artifacts/tiny-checkpoint
	$(BIN)/g3n-convert --checkpoint artifacts/tiny-checkpoint --out artifacts/tiny --prefill-lengths 8,32 --cache-length 256

bench: setup
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/run.py --out docs/BENCHMARKS.md
	$(BIN)/python bench/matformer.py --out docs/MATFORMER.md
	$(BIN)/python bench/context.py --out docs/CONTEXT.md --e4b
	$(BIN)/python bench/litertlm_settings.py --out docs/LITERTLM_SETTINGS.md
	$(BIN)/python bench/llamacpp.py --out docs/LLAMACPP.md
	$(BIN)/python bench/export_hf.py --out docs/EXPORT_HF.md
	$(BIN)/python bench/e4b.py --out docs/E4B.md
	$(BIN)/python bench/summary.py --page docs/BENCHMARKS.md

clean:
	rm -rf out artifacts .pytest_cache
