# PyTorch reference fixtures for the parity tests; included from the Makefile (run from the repo root).
#
#   make fixtures   ->  tests/fixtures/reference_tiny.npz, tests/fixtures/tiny_diffusers_manifest.json
#
# torch, diffusers and transformers go into a scratch venv ($(REF_VENV)) only: they are never
# dependencies of the project or its tests, which read the committed fixtures with numpy.
# The tiny checkpoint is made by our own tool with the project venv, then converted and run by
# diffusers/transformers in the scratch venv.

REF_PYTHON        ?= python3.11
REF_VENV          ?= .venv-ref
REF_PY            := $(REF_VENV)/bin/python
PROJECT_PY        ?= .venv/bin/python
REF_TORCH_PIN     := torch==2.13.0
REF_PINS          := diffusers==0.35.2 transformers==4.57.1 safetensors numpy
TINY_CKPT         ?= $(REF_VENV)/tiny_sdxl_seed0.safetensors
REF_DIFFUSERS_DIR ?= $(REF_VENV)/tiny_diffusers

.PHONY: fixtures
fixtures: $(REF_VENV)/.installed
	@test -x $(PROJECT_PY) || { echo "fixtures: $(PROJECT_PY) not found; create the project venv first" >&2; exit 1; }
	$(PROJECT_PY) tools/make_tiny_sdxl.py --out $(TINY_CKPT) --seed 0
	$(REF_PY) tools/make_reference_fixtures.py --ckpt $(TINY_CKPT) --out tests/fixtures \
		--diffusers_dir $(REF_DIFFUSERS_DIR)

# torch first and alone, pinned, so that nothing later pulls another build of it.
$(REF_VENV)/.installed:
	$(REF_PYTHON) -m venv $(REF_VENV)
	$(REF_PY) -m pip install --quiet $(REF_TORCH_PIN)
	$(REF_PY) -m pip install --quiet $(REF_TORCH_PIN) $(REF_PINS)
	touch $@
