# The book and its code come from llm.org. Edit llm.org, then:
#   make pdf     the book (pdf/llm.pdf)
#   make html    the web book (html/index.html); make notebooks: a notebook per chapter
#   make test    tangle llm.org into build/ and test it
#   make results recompute the book's frozen results (pdf/results/)
#   make bench   measure this machine's speed; the Speed chapter reads pdf/results/bench.*
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ORG := llm.org

.PHONY: help setup tangle test test-notebooks pdf html notebooks results bench check clean
.PHONY: train finetune speedrun speedrun-table tested-by
.PHONY: finetune-classify finetune-instruct finetune-dpo

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

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

html: $(STAMP) ## the web book, html/ (open html/index.html): MathML, no JavaScript, offline
	$(PY) web.py $(ORG)

notebooks: tangle ## a Jupyter notebook per chapter, notebooks/NN-chapter.ipynb (they import build/)
	$(PY) notebooks.py $(ORG)

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
	PYTHONPATH=build $(PY) -m llm bench gpu

test: tangle ## tangle, then run the whole test suite
	$(PY) -m pytest -q tests

test-notebooks: tangle ## run every chapter notebook in a fresh kernel (minutes; CI runs it)
	$(PY) -m pytest -q -m slow tests/test_notebooks.py

# `make train`: the default model on the default corpus. DATA, RUN and ARGS can be changed:
#   make train ARGS="--max-steps 500"      make train ARGS=--overwrite      make train ARGS=--resume
DATA ?= data/shakespeare-bpe
RUN ?= runs/shakespeare
ARGS ?=
# glibc hands large freed blocks back to the OS after every step and faults them in again.
# `train` needs no setting: its loop calls keep_freed_memory() (Speed, Page faults), and the
# same settings from the environment measured only 1.01-1.03x on its step. The finetuning
# loops do not call it, so they get the settings here.
MALLOC := GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

# The cpu preset with the speedrun's lessons: rotary positions, and two blocks instead of four,
# with 12 sequences a step, which fits the run in ten minutes on two cores (llm.org, "Training
# the default model").
DEFAULT_RUN := --preset cpu --pos rope --n-layers 2 --batch-size 12 --micro-batch 12
train: tangle ## train the default model on Shakespeare (about 9 min on a 2-core CPU) into runs/
	test -f $(DATA)/meta.json || PYTHONPATH=build $(PY) -m llm prepare
	PYTHONPATH=build $(PY) -m llm train $(DEFAULT_RUN) --data $(DATA) --out $(RUN) $(ARGS)

# `make speedrun`: the best model this package trains in BUDGET seconds (100) on character-level
# text, scored on all of its last 10%: the corpus's plays as tiny Shakespeare, or TEXT=FILE.
#   make speedrun TEXT=input.txt       make speedrun BUDGET=30 ARGS="--row 3"
BUDGET ?= 100
TEXT ?=
speedrun: tangle ## the best model in 100 seconds on character-level Shakespeare (runs/speedrun/)
	$(LLM) speedrun --budget $(BUDGET) $(if $(TEXT),--text $(TEXT)) $(ARGS)

# `make speedrun-table`: every row of the speedrun's table, one BUDGET-second run each (about
# two minutes a row), into runs/speedrun-table/; `make results NAMES=r-speedrun` then records it.
speedrun-table: tangle
	mkdir -p runs/speedrun-table
	rows=$$(PYTHONPATH=build $(PY) -c 'from llm.speedrun import RECIPE; print(len(RECIPE))'); \
	for k in $$(seq 0 $$((rows - 1))); do \
	  $(LLM) speedrun --row $$k --budget $(BUDGET) --out runs/speedrun-table/work \
	    --json runs/speedrun-table/row-$$k.json || exit 1; \
	done

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
	@# The editions and the browser test's screenshots, each only if web.py, notebooks.py or
	@# the tests made it (a folder of the same name that they did not make stays).
	test ! -f html/.weave-web || rm -rf html
	test ! -f notebooks/.weave-notebooks || rm -rf notebooks
	rm -f test-artifacts/web-*.png test-artifacts/notebook-times.json; rmdir test-artifacts 2>/dev/null || true
