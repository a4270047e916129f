# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# make demo FAMILY=qwen2_5_vl: the same demo on a tiny Qwen2.5-VL (demo/pretrain_base.py lists the bases).
FAMILY ?= paligemma
BASE   := base/tiny-$(FAMILY)
DEMO   := $(if $(filter paligemma,$(FAMILY)),configs/demo.toml,configs/demo_$(FAMILY).toml)
RUN    := $(if $(filter paligemma,$(FAMILY)),runs/demo,runs/demo-$(FAMILY))
DATA   := data/shapes-qa
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: browser demo test mutants base data digits prefs dpo-demo grpo-data grpo-demo pairs-data pairs-demo video-data video-demo bench bench-gpu walkthrough readme-check venv clean

venv: $(STAMP)
# torch first, on its own, as pinned in pyproject.toml: on this machine's index, the CPU wheel. Then
# minivlm itself, editable, with the test extra (the trackers, the web page and the test oracles).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

# The tiny base VLM (PaliGemma architecture, or FAMILY's), pretrained here on synthetic captions.
base: $(BASE)/config.json
base/tiny-%/config.json: $(STAMP) demo/shapes.py demo/pretrain_base.py
	$(PY) demo/pretrain_base.py --family $* --out base/tiny-$*

# The demo's fine-tuning data: a question type the base never saw, written as an imagefolder.
data: $(DATA)/train/metadata.jsonl
$(DATA)/train/metadata.jsonl: $(STAMP) demo/shapes.py demo/make_data.py
	$(PY) demo/make_data.py --out $(DATA)

demo: base data
	rm -rf $(RUN)
	$(PY) train.py --config $(DEMO)

# Answers the base never wrote ("0"-"9"): it learns them, as it would a user's own words.
digits: base/tiny-paligemma/config.json
	$(PY) demo/make_data.py --task digits --out data/digits
	rm -rf runs/digits
	$(PY) train.py --config configs/digits.toml

# One real training step of the demo, printed in the order of docs/qlora.md (about 15 s).
walkthrough: base/tiny-paligemma/config.json data
	$(PY) walkthrough.py

# DPO: teach the tiny base to prefer the English caption when asked a bare "caption" (docs in the
# README's DPO section). The pairs are written by demo/make_data.py --task prefs.
prefs: data/shapes-prefs/train/metadata.jsonl
data/shapes-prefs/train/metadata.jsonl: $(STAMP) demo/shapes.py demo/make_data.py
	$(PY) demo/make_data.py --task prefs --out data/shapes-prefs

dpo-demo: base/tiny-paligemma/config.json prefs
	rm -rf runs/dpo-demo
	$(PY) train.py --config configs/dpo_demo.toml

# GRPO: teach the tiny base to caption from the prompt "en" alone, from a reward (demo/rewards.py)
# and never a label (the README's GRPO section). The images are written by make_data.py --task en.
grpo-data: data/shapes-en/train/metadata.jsonl
data/shapes-en/train/metadata.jsonl: $(STAMP) demo/shapes.py demo/make_data.py
	$(PY) demo/make_data.py --task en --out data/shapes-en

grpo-demo: base/tiny-paligemma/config.json grpo-data
	rm -rf runs/grpo-demo
	$(PY) train.py --config configs/grpo_demo.toml

# Several images per sample: teach the tiny Qwen2.5-VL base which of two images holds the red shape
# (the README's "Several images" section). LLaVA JSON written by make_data.py --task pairs.
pairs-data: data/shapes-pairs/pairs.json
data/shapes-pairs/pairs.json: $(STAMP) demo/shapes.py demo/make_data.py
	$(PY) demo/make_data.py --task pairs --train 1600 --test 200 --out data/shapes-pairs

pairs-demo: base/tiny-qwen2_5_vl/config.json pairs-data
	rm -rf runs/pairs-demo
	$(PY) train.py --config configs/pairs_demo.toml

# Video: teach the tiny Qwen2.5-VL base which way a shape moves in a 4-frame clip (the README's
# "Video" paragraph). MPEG-4 clips and JSON Lines written by make_data.py --task clips.
video-data: data/shapes-clips/clips.jsonl
data/shapes-clips/clips.jsonl: $(STAMP) demo/shapes.py demo/make_data.py
	$(PY) demo/make_data.py --task clips --train 1600 --test 200 --out data/shapes-clips

video-demo: base/tiny-qwen2_5_vl/config.json video-data
	rm -rf runs/video-demo
	$(PY) train.py --config configs/video_demo.toml

test: $(STAMP) browser
	$(PY) -m pytest -q tests

# tests/test_web.py drives the web page in a real browser: Debian's Chromium (Playwright cannot
# download its own browsers without the network), installed here where it is missing.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  chromium >/dev/null) || (echo "make: tests/test_web.py needs Chromium; install Debian's package: sudo apt-get \
	install chromium" >&2; exit 1)

# Break the core one small way at a time and check that the tests notice (tests/mutants.py, about
# 15 minutes; not part of CI: run it before a restructuring and after).
mutants: $(STAMP)
	$(PY) tests/mutants.py

# minivlm against PEFT + the transformers Trainer on the same QLoRA job: speed, memory, loss curves
# (bench/README.md). Results go to bench/results/.
bench: $(STAMP) data
	$(PY) bench/compare.py

# On one CUDA GPU, meant to take under 8 minutes: compare.py at PaliGemma-3B's shape, --dry-run's plans against
# the measured peaks, and a packing on/off pair on the tiny Qwen2.5-VL (bench/gpu.py). `bench/gpu.py --quick` is
# its CPU smoke test (tests/test_bench.py).
bench-gpu: $(STAMP) base data base/tiny-qwen2_5_vl/config.json
	$(PY) bench/gpu.py

# Every README command marked <!-- readme-check -->, run as printed (needs make demo first).
readme-check: $(STAMP)
	$(PY) tests/readme_check.py

clean:
	rm -rf runs base data
