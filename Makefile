# The book and its code come from llm.org. Edit llm.org, then:
#   make pdf     the book (pdf/llm.pdf)
#   make test    tangle llm.org into build/ and test it
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ORG := llm.org

.PHONY: help setup tangle test pdf check clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install the pinned requirements (once)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@# The venv finds the tangled package in build/, so `.venv/bin/python -m llm` works from here.
	echo "$(CURDIR)/build" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llm-book.pth"
	touch $@

tangle: $(STAMP) ## write build/ from llm.org
	$(PY) tangle.py $(ORG)

pdf: $(STAMP) ## weave llm.org into the book, pdf/llm.pdf
	$(PY) tangle.py weave $(ORG)

test: tangle ## tangle, then run the whole test suite
	$(PY) -m pytest -q tests

check: $(STAMP) ## fail if build/ differs from llm.org; test the literate tools
	$(PY) tangle.py --check $(ORG)
	$(PY) -m pytest -q tests/test_tangle.py

clean: ## remove everything generated
	rm -rf build pdf/llm.pdf pdf/llm.typ .$(basename $(ORG)).tangle.json .pytest_cache
