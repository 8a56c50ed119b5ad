# Two entry points that set up what they need on a fresh machine (a virtualenv in .venv).
#   make demo   - the main job: `writesae demo` on the bundled toy model and its WriteSAE
#   make test   - the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The dashboard's browser test drives the system Chromium (Debian's chromium + chromium-driver):
# installed here when missing and we are root with apt-get; otherwise that one test is skipped.
.PHONY: demo test browser
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else echo "note: chromium/chromedriver missing: the dashboard browser test will be skipped"; fi; \
	fi

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m writesae_lens.cli demo

test: $(VENV)/.installed browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q --nbmake tests tutorials
