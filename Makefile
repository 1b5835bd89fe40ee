# The book and its code come from llm.org. Edit llm.org, then:
#   make pdf     the book (pdf/llm.pdf)
#   make test    tangle llm.org into build/ and test it
#   make results recompute the book's frozen results (pdf/results/)
#   make bench   measure this machine's speed; the Speed chapter reads pdf/results/bench.*
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ORG := llm.org

.PHONY: help setup tangle test pdf results bench check clean train finetune tested-by
.PHONY: finetune-classify finetune-instruct finetune-dpo

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

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

results: $(STAMP) ## recompute the frozen results under pdf/results/ (NAMES="a b" for some)
	$(PY) results.py $(ORG) $(NAMES)

# `make tested-by`: the whole suite once more, under coverage.py, to learn which tests run which
# block; writes pdf/tested-by.json, which the book's chunk labels and its test appendix print
# (slow: not part of `make test`, which only checks that the record matches the code).
tested-by: tangle ## record which tests run which block of code (pdf/tested-by.json; slow)
	$(PY) tested_by.py $(ORG)

# `make bench` measures this machine into runs/bench.*; BENCH_OUT=pdf/results re-records the
# run the Speed chapter cites (its prose is then checked against the new numbers).
BENCH_OUT ?= runs
bench: tangle ## measure speed: peaks, tokens/s and MFU, profile, fast paths (into runs/bench.*)
	mkdir -p $(BENCH_OUT)
	PYTHONPATH=build $(PY) -m llm bench model --switch-threads 1 --json $(BENCH_OUT)/bench.json --plot $(BENCH_OUT)/bench.png

test: tangle ## tangle, then run the whole test suite
	$(PY) -m pytest -q tests

# `make train`: the default model on the default corpus. DATA, RUN and ARGS can be changed:
#   make train ARGS="--max-steps 500"      make train ARGS=--overwrite      make train ARGS=--resume
DATA ?= data/shakespeare-bpe
RUN ?= runs/shakespeare
ARGS ?=
# glibc hands large freed blocks back to the OS after every step and faults them in again
# (13% of a CPU step in page faults, measured); these settings keep them.
MALLOC := GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

train: tangle ## train the default model on Shakespeare (about 10 min on a laptop CPU) into runs/
	test -f $(DATA)/meta.json || PYTHONPATH=build $(PY) -m llm prepare
	$(MALLOC) PYTHONPATH=build $(PY) -m llm train --preset cpu --data $(DATA) --out $(RUN) $(ARGS)

# `make finetune`: the finetuning chapters' demonstrations, from the `make train` model, each a
# few minutes on a laptop CPU, into runs/finetune/ (the book's frozen results read their reports):
#   make finetune-classify   comedy, history or tragedy: all weights, the top block, LoRA
#   make finetune-instruct   a chat model (then: python -m llm chat --checkpoint runs/finetune/chat)
#   make finetune-dpo        DPO: true lines preferred to ones with two words swapped
FT_OUT ?= runs/finetune
LLM := $(MALLOC) PYTHONPATH=build $(PY) -m llm

finetune: finetune-classify finetune-instruct finetune-dpo ## finetune the default model: classifier, LoRA, chat, DPO (runs/finetune/)

# The three classifiers train side by side, one thread each, so that their step times compare.
finetune-classify: tangle
	pids=""; for mode in all top lora; do \
	  OMP_NUM_THREADS=1 $(LLM) finetune classify --checkpoint $(RUN) \
	    --out $(FT_OUT)/classify-$$mode --train $$mode --overwrite $(ARGS) & pids="$$pids $$!"; \
	done; for pid in $$pids; do wait $$pid || exit 1; done

finetune-instruct: tangle
	$(LLM) finetune instruct --checkpoint $(RUN) --out $(FT_OUT)/chat --overwrite $(ARGS)

finetune-dpo: tangle
	$(LLM) finetune dpo --checkpoint $(RUN) --out $(FT_OUT)/dpo --overwrite $(ARGS)

check: $(STAMP) ## fail if build/ differs from llm.org; test the literate tools
	$(PY) tangle.py --check $(ORG)
	$(PY) -m pytest -q tests/test_tangle.py tests/test_literate.py

clean: ## remove everything generated
	rm -rf build pdf/llm.pdf pdf/llm.typ .$(basename $(ORG)).tangle.json .pytest_cache
